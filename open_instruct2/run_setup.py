"""Building a run: everything `train` needs before its first step (the `Run` it holds), loaded, checked and started
here; input errors surface before anything is written. The loop itself is trainer.py."""

import json
import logging
import os
from dataclasses import dataclass, field

import torch

from . import checkpoint, state, verifiers
from .config import Config, Derived, chat_template_kwargs, check_run_dir_free, derive, judge_wanted
from .data import Prompt, PromptSampler, build_prompts, read_few_shot, read_system_prompt, row_settings, set_chat_template
from .errors import UserError
from .evaluation import eval_schedule, load_eval_prompts
from .generation_model import GenerationModel, make_generation_model
from .memory_profile import MemoryProfiler
from .policy import MasterWeights, load_policy, load_tokenizer, optimizer_groups, trainable_parameters
from .reference import Reference, make_reference
from .reward_funcs import RewardFunctions, load_reward_funcs
from .rollout import ignored_generation_settings
from .rollout_vllm import VLLMRollouts, make_vllm_rollouts
from .rubric_scorer import RubricScorer
from .rubrics import RUBRIC_VERIFIERS, make_judges, rubric_inputs
from .runtime import Runtime, apply_runtime, resolve_runtime, resolved_summary
from .tools import ToolUse, build_tools, template_tools
from .tracking import Tracker

log = logging.getLogger(__name__)


@dataclass
class Run:
    """Everything one training run holds."""

    cfg: Config
    derived: Derived
    runtime: Runtime
    tokenizer: object
    prompts: list[Prompt]
    sampler: PromptSampler
    policy: torch.nn.Module
    reference: Reference | None
    master: MasterWeights
    optimizer: torch.optim.Optimizer
    scheduler: object
    tracker: Tracker
    eval_prompts: list[Prompt]
    """Held-out prompts for evaluation during training (empty: no evaluation)."""
    eval_steps: set[int]
    """Steps after which to evaluate (0: before the first step)."""
    profiler: MemoryProfiler | None
    start_step: int = 0
    """The step a resumed run continues after (0: a new run)."""
    rubric_buffer: dict | None = None
    """Per-prompt rubric lists (plain JSON), saved with the training state; None until rubrics are on."""
    rollout_server: VLLMRollouts | None = None
    """--rollout_backend vllm: the vLLM server that samples rollouts (rollout_vllm.py); None: HF generate here."""
    generation: GenerationModel | None = None
    """What HF generate runs with (the policy, or a merged LoRA copy) and whether over a static cache."""
    nonfinite_streak: int = 0
    """Steps in a row whose update was skipped for a non-finite loss or gradient."""
    rubrics: RubricScorer | None = None
    """The LLM-judge rubric scorer, when a judge is configured."""
    reward_funcs: RewardFunctions | None = None
    """--reward_funcs: the reward is their weighted sum (reward_funcs/); None: today's verifiable reward."""
    judge_streak: int = 0
    """Steps in a row where every judge call failed."""
    reward_streak: int = 0
    """Steps in a row where every reward function failed (--reward_funcs_max_failed_steps stops the run)."""
    evals: list = field(default_factory=list)
    """(step, eval/ metrics) of this process's evaluations, for the before/after table at the end."""
    episodes: int = 0
    """Responses sampled so far, every round of --dynamic_sampling included (saved in the state)."""
    tools: ToolUse | None = None
    """--tools / --tool_module / --mcp_server_command: multi-turn rollouts that call them (tools/); None: single-turn."""

    def marking(self, step: int) -> MemoryProfiler | None:
        """The profiler, when this step gets memory markers."""
        m = self.cfg.memory
        return self.profiler if self.profiler is not None and m.memory_profile_mark_steps and step % m.memory_profile_step_interval == 0 else None


def start_memory_profiler(cfg: Config) -> MemoryProfiler | None:
    m = cfg.memory
    if not m.enable_memory_profile:
        return None
    secrets = tuple(v for v in (cfg.reference.reference_api_key,) if v)
    return MemoryProfiler(m.memory_profile_interval_s, m.memory_profile_top_n_children, m.memory_profile_enable_tracemalloc, secrets).start()




def make_run_dir(run_dir: str, resume: bool = False) -> str | None:
    """Create the run folder. An existing non-empty one is reused only to resume from its newest state
    (returned); otherwise it is refused (e.g. two runs started in the same second)."""
    try:
        os.makedirs(run_dir)
        return None
    except FileExistsError:
        if not check_run_dir_free(run_dir, resume):
            return None
    checkpoint.remove_partial_saves(run_dir)
    return checkpoint.newest_state(run_dir)


def prepare_rewards(prompts: list[Prompt], cfg: Config, max_steps: int) -> RewardFunctions | None:
    """The reward functions (None without --reward_funcs), checked against every row, and the verifiers prepared."""
    reward_funcs = load_reward_funcs(cfg.reward, cfg.rollout.response_length, max_steps)
    if reward_funcs is not None:
        reward_funcs.check_prompts(prompts)
    if cfg.reward.apply_verifiable_reward:
        prepare_verifiers(prompts, cfg, reward_funcs is not None)
    return reward_funcs


def make_rubric_scorer(cfg: Config) -> RubricScorer | None:
    """The LLM-judge rubric scorer, when a judge is configured."""
    if not judge_wanted(cfg.rubric):
        return None
    scorer = RubricScorer(cfg.rubric, *make_judges(cfg.rubric))
    log.info("rubrics: judge %s at %s (key from $%s)", cfg.rubric.llm_judge_model, scorer.judge.settings.base_url, cfg.rubric.llm_judge_api_key_env)
    return scorer


def prepare_verifiers(prompts: list[Prompt], cfg: Config, with_reward_funcs: bool = False) -> None:
    """Load user verifiers, apply --remap_verifier to every prompt, and refuse unknown names up front (and a
    TRL-format row nothing would score: no --verifier and no --reward_funcs)."""
    unverified = [p for p in prompts if not p.verifiers]
    if unverified and not with_reward_funcs:
        p = unverified[0]
        raise UserError(f"{p.source} row {p.row} is a TRL-format row (a prompt column) and nothing scores it: name a verifier and its "
                        "ground-truth column (--verifier gsm8k --ground_truth_column answer) or reward functions (--reward_funcs)")
    if cfg.reward.verifier_module:
        added = verifiers.load_verifier_module(cfg.reward.verifier_module)
        log.info("verifiers: %s added from %s", ", ".join(added), cfg.reward.verifier_module)
    remap = verifiers.parse_remap(cfg.reward.remap_verifier)
    for p in prompts:
        p.verifiers = verifiers.resolve_names(p.verifiers, remap)
    verifiers.check_known({v for p in prompts for v in p.verifiers} - set(RUBRIC_VERIFIERS))
    verifiers.check_ground_truths([(f"{p.source} row {p.row}", p.verifiers, p.ground_truth) for p in prompts])
    rubric_rows = [p for p in prompts if set(p.verifiers) & set(RUBRIC_VERIFIERS)]
    if rubric_rows and not judge_wanted(cfg.rubric):
        p = rubric_rows[0]
        raise UserError(f"{p.source} row {p.row} (and {len(rubric_rows) - 1} more) is a rubric row ({'/'.join(RUBRIC_VERIFIERS)}), "
                        "which an LLM judge scores: set --llm_judge_model (and --llm_judge_base_url)")
    for p in rubric_rows:
        try:
            rubric_inputs(p)
        except ValueError as e:
            raise UserError(f"{p.source} row {p.row}: {e}; fix the row's ground_truth") from None
    if {"math", "strict_math"} & {v for p in prompts for v in p.verifiers}:
        verifiers.VERIFIERS["math"]("\\boxed{1}", "1")  # pay math-verify's import and parser set-up now, not in step 1


def make_optimizer(groups: list[dict], lr: float) -> torch.optim.Optimizer:
    """AdamW, fused where torch has a fused kernel for the device (CPU included since torch 2.4): measured
    0.068 s against 0.314 s a step for 108M fp32 parameters on 2 cores (BENCHMARKS.md); else foreach."""
    try:
        return torch.optim.AdamW(groups, lr=lr, fused=True)
    except (RuntimeError, ValueError, TypeError):
        return torch.optim.AdamW(groups, lr=lr, foreach=True)


def log_generation_settings(policy, cfg: Config) -> None:
    r = cfg.rollout
    log.info("generation: temperature %g, top_p %g, top_k off, no penalties, at most %d new tokens, stop strings %s; "
             "log-probs at temperature %g", r.temperature, r.top_p, r.response_length, r.stop_strings or "none", r.temperature)
    ignored = ignored_generation_settings(policy)
    if ignored:
        log.info("generation: the model's generation_config.json also sets %s; rollouts ignore them (the update "
                 "models only temperature and top_p)", json.dumps(ignored))


def log_loss_settings(cfg: Config) -> None:
    """The policy loss, and a variant paired with other settings than its paper's (README 'Policy losses')."""
    op = cfg.optim
    log.info("loss: %s policy loss, %s aggregation, beta %g", op.policy_loss, op.loss_aggregation, op.beta)
    if op.policy_loss == "gspo" and op.loss_aggregation != "sequence_mean":
        log.warning("loss: GSPO's paper aggregates per sequence; --loss_aggregation %s weighs long responses more "
                    "(--loss_aggregation sequence_mean is GSPO's)", op.loss_aggregation)
    if op.policy_loss == "gspo" and op.clip_lower >= 0.01:
        log.warning("loss: GSPO clips a sequence's mean ratio, which moves far less than a token's; its paper uses "
                    "--clip_lower 3e-4 --clip_higher 4e-4, and %g / %g will rarely clip", op.clip_lower, op.clip_higher)


def setup(cfg: Config, profiler: MemoryProfiler | None = None) -> Run:
    """Resolve, load and build everything; input errors surface here before anything is written."""
    derived = derive(cfg)
    cfg.experiment.run_name = derived.run_name  # fixed once: later derive() calls agree
    runtime = resolve_runtime(cfg.runtime)
    apply_runtime(runtime, cfg.experiment.seed)
    log.info("runtime: %s", json.dumps(runtime.describe()))
    tokenizer = load_tokenizer(cfg)
    set_chat_template(tokenizer, cfg.model.chat_template_name)
    tools = build_tools(cfg, tokenizer)  # a bad corpus, module or MCP server stops here, before anything is written
    try:
        return _setup(cfg, profiler, derived, runtime, tokenizer, tools)
    except BaseException:
        if tools is not None:
            tools.runner.close()
        raise


def _setup(cfg: Config, profiler: MemoryProfiler | None, derived: Derived, runtime: Runtime, tokenizer, tools: ToolUse | None) -> Run:
    system_prompt = read_system_prompt(cfg.data.system_prompt_file)
    template_kwargs = {**chat_template_kwargs(cfg.model), **template_tools(tools, cfg.tools.tool_parser)}
    prompts = build_prompts(
        cfg.data.dataset_mixer_list, cfg.data.dataset_mixer_list_splits, tokenizer, cfg.data.max_prompt_token_length,
        system_prompt=system_prompt, add_bos=cfg.model.add_bos, template_kwargs=template_kwargs, settings=row_settings(cfg),
        few_shot=read_few_shot(cfg.data.few_shot_file),
    )
    eval_prompts = load_eval_prompts(cfg, tokenizer, system_prompt, template_kwargs, runtime.device.type)
    reward_funcs = prepare_rewards(prompts + eval_prompts, cfg, derived.num_training_steps)
    log.info("data: %d prompts%s", len(prompts), f", {len(eval_prompts)} held out for evaluation" if eval_prompts else "")
    policy = load_policy(cfg, runtime)
    master = MasterWeights(trainable_parameters(policy))
    created = not os.path.exists(derived.run_dir)
    resume_from = make_run_dir(derived.run_dir, cfg.experiment.resume)
    if resume_from:
        state.check_resumable(resume_from, runtime, master)  # before a server starts or a file is written
    reference = rollout_server = None
    try:
        reference = make_reference(cfg, runtime, policy, tokenizer, derived.run_dir)
        if resume_from:  # the KL must stay at the temperature it was trained at (an endpoint may have been restarted plainly)
            state.check_kl_temperature(resume_from, None if reference is None else reference.temperature)
        if cfg.rollout.rollout_backend == "vllm":
            rollout_server = make_vllm_rollouts(cfg, runtime, policy, tokenizer, derived.run_dir)
    except BaseException:
        if reference is not None:
            reference.close()
        if created and not os.listdir(derived.run_dir):  # a refused endpoint or a busy port leaves no empty run folder
            os.rmdir(derived.run_dir)
        raise
    if profiler is not None:
        profiler.attach(derived.run_dir)
    optimizer = make_optimizer(optimizer_groups(policy, master, cfg.optim.weight_decay), cfg.optim.learning_rate)
    from transformers import get_scheduler

    scheduler = get_scheduler(
        cfg.optim.lr_scheduler_type, optimizer, num_warmup_steps=derived.warmup_steps, num_training_steps=derived.num_training_steps
    )
    log_generation_settings(policy, cfg)
    log_loss_settings(cfg)
    summary = resolved_summary(cfg)
    if reference is not None:  # which temperature the KL term compares at (reference_vllm.log_kl_pairing)
        summary["kl_temperature"] = reference.temperature
    checkpoint.save_config(summary, derived.run_dir)
    meta = state.read_meta(resume_from) if resume_from else {}
    wandb_settings = None
    if cfg.tracking.with_tracking:
        wandb_settings = {"project": cfg.tracking.wandb_project_name, "entity": cfg.tracking.wandb_entity, "name": derived.run_name,
                          "config": summary, "secrets": [cfg.reference.reference_api_key],  # config already masked
                          "id": meta.get("wandb_id")}  # a resumed run continues its wandb run
    resumed_step = int(meta.get("step", 0))
    if resume_from:
        state.truncate_logs(derived.run_dir, resumed_step, derived.run_name)
    tracker = Tracker(derived.run_dir, derived.num_training_steps, "```\n" + json.dumps(summary, indent=2, default=str) + "\n```",
                      wandb_settings, first_step=resumed_step + 1)
    trainable = sum(p.numel() for p in trainable_parameters(policy))
    log.info("policy: %s, %.1fM trainable parameters, run folder %s", cfg.lora.train_mode, trainable / 1e6, derived.run_dir)
    run = Run(cfg, derived, runtime, tokenizer, prompts, PromptSampler(len(prompts), cfg.experiment.seed), policy, reference,
              master, optimizer, scheduler, tracker, eval_prompts, eval_schedule(derived.num_training_steps, derived.num_evals)
              if eval_prompts else set(), profiler)
    run.reward_funcs, run.rubrics = reward_funcs, make_rubric_scorer(cfg)
    if resume_from:
        run.start_step = state.restore(run, resume_from)
        log.info("resume: continuing %s from step %d (state %s)", derived.run_dir, run.start_step, resume_from)
    run.rollout_server = rollout_server
    run.tools = tools
    run.generation = make_generation_model(cfg, runtime, policy, max(len(p.prompt_ids) for p in prompts + eval_prompts),
                                           derived.num_training_steps)
    if resume_from and rollout_server is not None:
        rollout_server.weights_changed()  # it gets the restored weights before it generates
    return run
