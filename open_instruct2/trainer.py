"""The GRPO loop. `train_step` reads top to bottom: generate -> score -> advantages -> reference ->
update -> log. Setup and the update's inner loops are below it; the math is in losses.py.

Choices a reader comparing trainers should know:
- Samples of groups whose rewards are all equal (advantage 0 everywhere) are left out of the update
  (`filter_zero_std_groups`), and `mask_truncated_completions` leaves out 'length' finishes; both are
  counted in the logs. Loss denominators count only the samples that stay.
- Old log-probs: with one epoch and one mini-batch the update is on-policy, so old = current (detached)
  and the ratio is exactly 1, with no extra forward pass. Otherwise they are computed once, before the
  first update, without gradients.
- No-grad passes (old and reference log-probs, generation) run in eval mode; the gradient pass in train
  mode (LoRA dropout on).
"""

import json
import logging
import os
import time
from collections import defaultdict
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch

from . import checkpoint, verifiers
from .config import Config, Derived, check_run_dir_free, derive
from .data import Prompt, PromptSampler, build_prompts, next_batch, read_system_prompt, set_chat_template
from .losses import LossNorm, compute_advantages, grpo_loss, zero_std_groups
from .policy import MasterWeights, load_policy, load_tokenizer, response_logprobs, trainable_parameters
from .reference import Reference, batched_logprobs, make_reference
from .errors import UserError
from .reference_vllm import ReferenceUnavailable
from .rewards import Scores, compute_scores
from .rollout import Rollouts, generate_rollouts
from .runtime import Runtime, apply_runtime, resolve_runtime, resolved_summary
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
    rows = loss_rows(scores.rewards, rollouts.finish_reasons, group, cfg)
    with timer("reference"):
        ref_logprobs = reference_logprobs(run.reference, rollouts, rows)
    with timer("update"):
        update = update_policy(run, rollouts, advantages, ref_logprobs, rows)
    metrics = step_metrics(scores, rollouts, rows, group, update, timer.seconds, run.scheduler.get_last_lr()[0])
    run.tracker.log(step, metrics)
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
            except ReferenceUnavailable as e:
                raise UserError(f"the reference server stopped answering at step {step} ({e}); {save_progress(run, step - 1)}") from None
        checkpoint.save_final(run.policy, run.tokenizer, run.derived.run_dir, cfg.lora.train_mode == "lora", cfg.lora.save_merged_model)
    finally:
        run.tracker.close()
        if run.reference is not None:
            run.reference.close()
    return run.derived.run_dir


def save_progress(run: Run, last_step: int) -> str:
    """Before stopping on a lost endpoint: keep the training done so far as a checkpoint."""
    if last_step < 1:
        return "no step had finished, nothing to save; restart the server and rerun"
    folder = os.path.join(run.derived.run_dir, "checkpoints", f"step_{last_step}")
    if not os.path.isdir(folder):
        folder = checkpoint.save_checkpoint(run.policy, run.tokenizer, run.derived.run_dir, last_step, -1)
    return f"the model after step {last_step} is saved in {folder}; restart the server and continue from it"


# ---------------------------------------------------------------- phases


def score(rollouts: Rollouts, prompts: list[Prompt], cfg: Config) -> Scores:
    samples = [prompts[i] for i in rollouts.prompt_index]
    return compute_scores(
        rollouts.response_texts, rollouts.finish_reasons, [p.verifiers for p in samples], [p.ground_truth for p in samples], cfg.reward
    )


def loss_rows(rewards: torch.Tensor, finish_reasons: list[str], group: int, cfg: Config) -> list[int]:
    """Samples that enter the loss: not in a zero-std group (if filtered), not truncated (if masked)."""
    keep = torch.ones(len(finish_reasons), dtype=torch.bool)
    if cfg.optim.filter_zero_std_groups:
        keep &= ~zero_std_groups(rewards, group)
    if cfg.optim.mask_truncated_completions:
        keep &= torch.tensor([r != "length" for r in finish_reasons])
    return keep.nonzero().flatten().tolist()


def on_rows(rollouts: Rollouts, rows: list[int], values: torch.Tensor) -> torch.Tensor:
    """(len(rows), T) values placed into an (N, T) zero tensor at `rows` (other samples are not in the loss)."""
    full = torch.zeros_like(rollouts.response_mask, dtype=torch.float32)
    full[rows] = values.to(full.device)
    return full


def reference_logprobs(reference: Reference | None, rollouts: Rollouts, rows: list[int]) -> torch.Tensor | None:
    """(N, T) reference log-probs, filled for `rows` only."""
    if reference is None or not rows:
        return None
    return on_rows(rollouts, rows, reference.logprobs(rollouts, rows))


def update_policy(run: Run, rollouts: Rollouts, advantages, ref_logprobs, rows: list[int]) -> dict[str, float]:
    """num_epochs passes x num_mini_batches optimizer steps over the loss rows; returns mean metrics."""
    cfg = run.cfg
    if not rows:
        return {}
    on_policy = cfg.optim.num_epochs == 1 and cfg.optim.num_mini_batches == 1
    old_logprobs = None
    if not on_policy:
        run.policy.eval()
        old_logprobs = on_rows(rollouts, rows, batched_logprobs(run.policy, rollouts, rows, cfg.optim.per_device_train_batch_size))
        run.policy.train()
    totals, count = defaultdict(float), 0
    for _ in range(cfg.optim.num_epochs):
        order = [rows[i] for i in torch.randperm(len(rows)).tolist()]  # global RNG, seeded at start
        for mini in np.array_split(np.array(order), min(cfg.optim.num_mini_batches, len(order))):
            metrics = backward_mini_batch(run.policy, rollouts, mini.tolist(), advantages, old_logprobs, ref_logprobs, cfg)
            metrics["grad_norm"] = optimizer_step(run)
            for k, v in metrics.items():
                totals[k] += v
            count += 1
    return {f"train/{k}": v / count for k, v in totals.items()}


def backward_mini_batch(model, rollouts: Rollouts, rows: list[int], advantages, old_logprobs, ref_logprobs, cfg: Config) -> dict[str, float]:
    """Accumulate the gradient of one mini-batch in micro-batches of per_device_train_batch_size.

    Denominators are counted over the whole mini-batch first, so the gradient does not depend on the
    micro-batch size.
    """
    norm = LossNorm(
        num_tokens=int(rollouts.response_mask[rows].sum()), num_sequences=len(rows), max_response_length=cfg.rollout.response_length
    )
    totals = defaultdict(float)
    size = cfg.optim.per_device_train_batch_size
    for start in range(0, len(rows), size):
        chunk = rows[start : start + size]
        part = rollouts.rows(chunk)
        logprobs = response_logprobs(model, part.input_ids, part.attention_mask, part.prompt_width)  # (b, t)
        width = logprobs.shape[1]
        loss, metrics = grpo_loss(
            logprobs,
            logprobs.detach() if old_logprobs is None else old_logprobs[chunk, :width],
            None if ref_logprobs is None else ref_logprobs[chunk, :width],
            advantages[chunk],
            part.response_mask,
            norm,
            clip_lower=cfg.optim.clip_lower,
            clip_higher=cfg.optim.clip_higher,
            beta=cfg.optim.beta,
            kl_estimator=cfg.optim.kl_estimator,
            aggregation=cfg.optim.loss_aggregation,
        )
        loss.backward()
        totals["loss"] += float(loss.detach())
        for k, v in metrics.items():
            totals[k] += float(v)
    return totals


def optimizer_step(run: Run) -> float:
    """Clip, step (through fp32 master weights when the policy is low-precision), schedule; returns the
    gradient norm before clipping."""
    run.master.grads_to_master()
    params = run.master.optim_params
    max_norm = run.cfg.optim.max_grad_norm if run.cfg.optim.max_grad_norm > 0 else float("inf")
    grad_norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
    run.optimizer.step()
    run.optimizer.zero_grad(set_to_none=True)
    run.master.master_to_model()
    run.scheduler.step()
    return float(grad_norm)


# ---------------------------------------------------------------- metrics


def step_metrics(scores: Scores, rollouts: Rollouts, rows: list[int], group: int, update: dict, seconds: dict, lr: float) -> dict[str, float]:
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
        "rollout/filtered_group_fraction": float(zero_std_groups(scores.rewards, group).float().mean()),
        "rollout/loss_samples": float(len(rows)),
        "rollout/tokens_per_second": float(lengths.sum()) / max(seconds.get("rollout", 0.0), 1e-9),
        **update,
        "train/lr": lr,
        **{f"time/{k}": v for k, v in seconds.items()},
        "time/step": sum(seconds.values()),
    }
    if rows and seconds.get("update"):
        trained = int(rollouts.attention_mask[rows].sum())
        metrics["train/tokens_per_second"] = trained / seconds["update"]
    return metrics


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
    )
    if cfg.reward.apply_verifiable_reward:
        prepare_verifiers(prompts, cfg)
    log.info("data: %d prompts", len(prompts))
    policy = load_policy(cfg, runtime)
    make_run_dir(derived.run_dir)
    reference = make_reference(cfg, runtime, policy, tokenizer, derived.run_dir)
    master = MasterWeights(trainable_parameters(policy))
    optimizer = torch.optim.AdamW(master.optim_params, lr=cfg.optim.learning_rate, weight_decay=cfg.optim.weight_decay)
    from transformers import get_scheduler

    scheduler = get_scheduler(
        cfg.optim.lr_scheduler_type, optimizer, num_warmup_steps=derived.warmup_steps, num_training_steps=derived.optimizer_steps
    )
    summary = resolved_summary(cfg)
    checkpoint.save_config(summary, derived.run_dir)
    tracker = Tracker(derived.run_dir, derived.num_training_steps, "```\n" + json.dumps(summary, indent=2, default=str) + "\n```")
    trainable = sum(p.numel() for p in trainable_parameters(policy))
    log.info("policy: %s, %.1fM trainable parameters, run folder %s", cfg.lora.train_mode, trainable / 1e6, derived.run_dir)
    return Run(cfg, derived, runtime, tokenizer, prompts, PromptSampler(len(prompts), cfg.experiment.seed), policy, reference,
               master, optimizer, scheduler, tracker)
