"""The GRPO loop. `train_step` reads top to bottom: generate -> score -> advantages -> reference ->
update -> log. Setup is below it; the update's loops are in update.py, the math in losses.py.

Choices a reader comparing trainers should know (the update's own are in update.py):
- The learning-rate schedule follows training steps: warm-up and decay are counted in steps of this loop,
  and every optimizer step of a training step uses that step's rate. Counting optimizer steps instead
  would let the schedule fall behind whenever a step makes fewer (all groups filtered, fewer rows than
  mini-batches). `train/lr` is the rate the step used.
- Sampling, the ratio, the KL and the reference all use the sampling temperature (policy.py).
"""

import json
import logging
import os
import time
import warnings
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from . import checkpoint, verifiers
from .config import Config, Derived, chat_template_kwargs, check_run_dir_free, derive
from .data import Prompt, PromptSampler, build_prompts, next_batch, read_system_prompt, set_chat_template
from .losses import compute_advantages, zero_std_groups
from .policy import MasterWeights, load_policy, load_tokenizer, optimizer_groups, trainable_parameters
from .reference import Reference, make_reference
from .errors import UserError
from .reference_vllm import ReferenceFailure
from .rewards import Scores, compute_scores
from .rollout import Rollouts, generate_rollouts, ignored_generation_settings
from .runtime import Runtime, apply_runtime, resolve_runtime, resolved_summary
from .tracking import Tracker
from .update import LossRows, on_rows, select_rows, update_policy

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


class PhaseTimer:
    def __init__(self):
        self.seconds: dict[str, float] = {}

    @contextmanager
    def __call__(self, phase: str):
        start = time.perf_counter()
        yield
        self.seconds[phase] = self.seconds.get(phase, 0.0) + time.perf_counter() - start


def train_step(run: Run, step: int) -> dict[str, float]:
    cfg, timer = run.cfg, PhaseTimer()
    group = cfg.rollout.num_samples_per_prompt_rollout
    batch = next_batch(run.prompts, run.sampler, cfg.rollout.num_unique_prompts_rollout)
    with timer("rollout"):
        rollouts = generate_rollouts(
            run.policy, run.tokenizer, batch, num_samples=group, response_length=cfg.rollout.response_length,
            temperature=cfg.rollout.temperature, top_p=cfg.rollout.top_p, stop_strings=cfg.rollout.stop_strings,
            device=run.runtime.device,
        )
    with timer("reward"):
        scores = score(rollouts, batch.prompts, cfg)
    advantages = compute_advantages(scores.rewards, group, cfg.optim.advantage_normalization_type).to(run.runtime.device)
    selected = select_rows(scores.rewards, rollouts.finish_reasons, group, cfg, with_kl=run.reference is not None)
    with timer("reference"):
        ref_logprobs = reference_logprobs(run.reference, rollouts, selected.computed)
    lr = run.scheduler.get_last_lr()[0]  # the rate this step's optimizer steps use
    with timer("update"):
        update = update_policy(run, rollouts, advantages, ref_logprobs, selected)
    advance_schedule(run.scheduler)
    metrics = step_metrics(scores, rollouts, selected, group, update, timer.seconds, lr, cfg.optim.filter_zero_std_groups)
    run.tracker.log(step, metrics)
    warn_truncation(metrics, step)
    if cfg.tracking.log_samples_freq > 0 and (step == 1 or step % cfg.tracking.log_samples_freq == 0):
        run.tracker.log_samples(step, sample_rows(rollouts, batch.prompts, scores))
    if cfg.tracking.save_freq > 0 and step % cfg.tracking.save_freq == 0:
        checkpoint.save_checkpoint(run.policy, run.tokenizer, run.derived.run_dir, step, cfg.tracking.keep_last_n_checkpoints)
    return metrics


def train(cfg: Config) -> str:
    """Run GRPO to the end; returns the run folder."""
    run = setup(cfg)
    try:
        log.info("training: %d steps of %d prompts x %d samples", run.derived.num_training_steps,
                 cfg.rollout.num_unique_prompts_rollout, cfg.rollout.num_samples_per_prompt_rollout)
        for step in range(1, run.derived.num_training_steps + 1):
            try:
                train_step(run, step)
            except ReferenceFailure as e:
                raise UserError(f"the reference failed at step {step} ({e}); {save_progress(run, step - 1)}") from None
        checkpoint.save_final(run.policy, run.tokenizer, run.derived.run_dir, cfg.lora.train_mode == "lora", cfg.lora.save_merged_model)
    finally:
        run.tracker.close()
        if run.reference is not None:
            run.reference.close()
    return run.derived.run_dir


def save_progress(run: Run, last_step: int) -> str:
    """Before stopping on a reference failure: keep the training done so far as a checkpoint, and say
    exactly what it holds (resuming a run is not available yet)."""
    if last_step < 1:
        return "no step had finished, nothing to save; fix the reference and rerun"
    folder = os.path.join(run.derived.run_dir, "checkpoints", f"step_{last_step}")
    if not os.path.isdir(folder):
        folder = checkpoint.save_checkpoint(run.policy, run.tokenizer, run.derived.run_dir, last_step, -1)
    held = "the LoRA adapter and tokenizer" if run.cfg.lora.train_mode == "lora" else "the model weights and tokenizer"
    return (f"{folder} holds {held} after step {last_step}, but no optimizer state, learning-rate schedule or data position "
            "(resuming a run is not available yet): fix the reference, then start a new run from those weights")


# ---------------------------------------------------------------- phases


def score(rollouts: Rollouts, prompts: list[Prompt], cfg: Config) -> Scores:
    samples = [prompts[i] for i in rollouts.prompt_index]
    return compute_scores(
        rollouts.response_texts, rollouts.finish_reasons, [p.verifiers for p in samples], [p.ground_truth for p in samples], cfg.reward
    )


def reference_logprobs(reference: Reference | None, rollouts: Rollouts, rows: list[int]) -> torch.Tensor | None:
    """(N, T) reference log-probs, filled for `rows` only."""
    if reference is None or not rows:
        return None
    return on_rows(rollouts, rows, reference.logprobs(rollouts, rows))


def advance_schedule(scheduler) -> None:
    """One scheduler step per training step, whether or not this one made an optimizer step (torch
    warns when the first step made none: the order is intended here)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"Detected call of `lr_scheduler.step\(\)` before `optimizer.step\(\)`")
        scheduler.step()


# ---------------------------------------------------------------- metrics


def step_metrics(scores: Scores, rollouts: Rollouts, selected: LossRows, group: int, update: dict, seconds: dict, lr: float,
                 filtering: bool) -> dict[str, float]:
    n = len(rollouts.finish_reasons)
    lengths = rollouts.response_lengths.float()
    truncated = sum(r == "length" for r in rollouts.finish_reasons)
    metrics = {
        "reward/mean": float(scores.rewards.mean()),
        "reward/std": float(scores.rewards.std(unbiased=False)),
        "reward/verifier_accuracy": float((scores.verifier_scores >= 1.0).float().mean()),
        "reward/verifier_errors": float(scores.verifier_errors),
        **{f"reward/{k}": float(v.float().mean()) for k, v in scores.breakdown.items()},
        "rollout/response_length_mean": float(lengths.mean()),
        "rollout/response_length_max": float(lengths.max()),
        "rollout/truncated_fraction": truncated / n,
        "rollout/zero_std_group_fraction": float(zero_std_groups(scores.rewards, group).float().mean()),
        "rollout/loss_samples": float(len(selected.rows)),
        "rollout/computed_samples": float(len(selected.computed)),
        "rollout/tokens_per_second": float(lengths.sum()) / max(seconds.get("rollout", 0.0), 1e-9),
        **update,
        "train/lr": lr,
        **{f"time/{k}": v for k, v in seconds.items()},
        "time/step": sum(seconds.values()),
    }
    if filtering:
        metrics["rollout/filtered_group_fraction"] = metrics["rollout/zero_std_group_fraction"]
    if selected.computed and seconds.get("update"):
        trained = int(rollouts.attention_mask[selected.computed].sum())
        metrics["train/tokens_per_second"] = trained / seconds["update"]
    return metrics


def warn_truncation(metrics: dict[str, float], step: int) -> None:
    """Most responses hitting response_length means the reward mostly sees cut-off answers."""
    truncated = metrics["rollout/truncated_fraction"]
    if truncated > 0.5 and (step == 1 or step % 10 == 0):
        log.warning("step %d: %.0f%% of responses hit --response_length; raise it, add --stop_strings, or for thinking "
                    "models switch thinking off with --chat_template_kwargs '{\"enable_thinking\": false}'", step, 100 * truncated)


def sample_rows(rollouts: Rollouts, prompts: list[Prompt], scores: Scores, limit: int = 8) -> list[tuple[str, str, float, str]]:
    out = []
    for i in range(min(limit, len(rollouts.response_texts))):
        prompt = prompts[rollouts.prompt_index[i]]
        question = next(m["content"] for m in reversed(prompt.messages) if m["role"] == "user")
        out.append((question, rollouts.response_texts[i], float(scores.rewards[i]), rollouts.finish_reasons[i]))
    return out


# ---------------------------------------------------------------- setup


def make_run_dir(run_dir: str) -> None:
    """Create the run folder; an existing non-empty one is never reused (two runs in the same second)."""
    try:
        os.makedirs(run_dir)
    except FileExistsError:
        check_run_dir_free(run_dir)


def prepare_verifiers(prompts: list[Prompt], cfg: Config) -> None:
    """Load user verifiers, apply --remap_verifier to every prompt, and refuse unknown names up front."""
    if cfg.reward.verifier_module:
        added = verifiers.load_verifier_module(cfg.reward.verifier_module)
        log.info("verifiers: %s added from %s", ", ".join(added), cfg.reward.verifier_module)
    remap = verifiers.parse_remap(cfg.reward.remap_verifier)
    for p in prompts:
        p.verifiers = verifiers.resolve_names(p.verifiers, remap)
    verifiers.check_known({v for p in prompts for v in p.verifiers})
    verifiers.check_ground_truths([(f"{p.source} row {p.row}", p.verifiers, p.ground_truth) for p in prompts])
    if {"math", "strict_math"} & {v for p in prompts for v in p.verifiers}:
        verifiers.VERIFIERS["math"]("\\boxed{1}", "1")  # pay math-verify's import and parser set-up now, not in step 1


def log_generation_settings(policy, cfg: Config) -> None:
    r = cfg.rollout
    log.info("generation: temperature %g, top_p %g, top_k off, no penalties, at most %d new tokens, stop strings %s; "
             "log-probs at temperature %g", r.temperature, r.top_p, r.response_length, r.stop_strings or "none", r.temperature)
    ignored = ignored_generation_settings(policy)
    if ignored:
        log.info("generation: the model's generation_config.json also sets %s; rollouts ignore them (the update "
                 "models only temperature and top_p)", json.dumps(ignored))


def setup(cfg: Config) -> Run:
    """Resolve, load and build everything; input errors surface here before anything is written."""
    derived = derive(cfg)
    cfg.experiment.run_name = derived.run_name  # fixed once: later derive() calls agree
    runtime = resolve_runtime(cfg.runtime)
    apply_runtime(runtime, cfg.experiment.seed)
    log.info("runtime: %s", json.dumps(runtime.describe()))
    tokenizer = load_tokenizer(cfg)
    set_chat_template(tokenizer, cfg.model.chat_template_name)
    prompts = build_prompts(
        cfg.data.dataset_mixer_list, cfg.data.dataset_mixer_list_splits, tokenizer, cfg.data.max_prompt_token_length,
        system_prompt=read_system_prompt(cfg.data.system_prompt_file), add_bos=cfg.model.add_bos,
        template_kwargs=chat_template_kwargs(cfg.model),
    )
    if cfg.reward.apply_verifiable_reward:
        prepare_verifiers(prompts, cfg)
    log.info("data: %d prompts", len(prompts))
    policy = load_policy(cfg, runtime)
    make_run_dir(derived.run_dir)
    reference = make_reference(cfg, runtime, policy, tokenizer, derived.run_dir)
    master = MasterWeights(trainable_parameters(policy))
    optimizer = torch.optim.AdamW(optimizer_groups(policy, master, cfg.optim.weight_decay), lr=cfg.optim.learning_rate)
    from transformers import get_scheduler

    scheduler = get_scheduler(
        cfg.optim.lr_scheduler_type, optimizer, num_warmup_steps=derived.warmup_steps, num_training_steps=derived.num_training_steps
    )
    log_generation_settings(policy, cfg)
    summary = resolved_summary(cfg)
    checkpoint.save_config(summary, derived.run_dir)
    tracker = Tracker(derived.run_dir, derived.num_training_steps, "```\n" + json.dumps(summary, indent=2, default=str) + "\n```")
    trainable = sum(p.numel() for p in trainable_parameters(policy))
    log.info("policy: %s, %.1fM trainable parameters, run folder %s", cfg.lora.train_mode, trainable / 1e6, derived.run_dir)
    return Run(cfg, derived, runtime, tokenizer, prompts, PromptSampler(len(prompts), cfg.experiment.seed), policy, reference,
               master, optimizer, scheduler, tracker)
