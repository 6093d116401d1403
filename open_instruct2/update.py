"""The policy update of one training step: epochs x mini-batches x micro-batches; the math is in losses.py.

Which samples count, and why (for a reader comparing trainers):
- Denominators count every sample of a mini-batch that is in the loss: all of them, less truncated ones
  when `mask_truncated_completions` is on (those leave numerator and denominator: they are not data).
  Samples of zero-std groups stay in the denominators, so a step where one group of sixteen has a signal
  makes a one-sixteenth-strength update, not a full one (as TRL; open-instruct drops them from both).
- Zero-std groups have advantage exactly 0, so no policy-gradient term. With beta > 0 they keep their KL
  term: the anchor applies to every sample, and the logged KL is over every sample. So
  `filter_zero_std_groups` does not change the update: it skips their forward/backward when nothing would
  come of it (beta = 0), which is where it saves time.
- A mini-batch with nothing to compute makes no optimizer step (AdamW would still move the weights with
  its momentum). The learning-rate schedule follows training steps, not optimizer steps (trainer.py).
- Old log-probs: with one epoch and one mini-batch the update is on-policy, so old = current (detached)
  and the ratio is exactly 1, with no extra pass. Otherwise they are computed once, before the first
  update, without gradients, at `inference_batch_size`.
- Inside a mini-batch, samples go to micro-batches sorted by length (less padding; the summed gradient
  is the same, since the denominators are counted for the whole mini-batch first).
- Dropout is off in every pass (policy.py), so old and new log-probs of the same weights are equal.
- Rollouts carry the sampler's log-probs of the sampled tokens (a vLLM server's, or HF generate's from the model
  it generated with: a merged or packed copy rounds differently from the policy); the policy-gradient terms are
  weighed by truncated importance weights (losses.importance_weights), and the gap between the trainer's and the
  sampler's log-probs is logged (train/sampler_mismatch_mean, _max).
- The KL term takes the policy's log-probs at the reference's temperature: the sampling one, or 1 for a vLLM
  endpoint started without the temperature plugin (reference_vllm.py); then the micro-batch's one forward pass gives
  both (one more log-softmax of the same logits).
- Metrics are token means over the computed tokens, summed on the device and read once per step. train/entropy
  comes from the same chunked pass as the log-probs (logprobs.token_logprobs_entropy).
- --top_entropy_quantile picks each mini-batch's high-entropy tokens by the entropy of the policy before the update
  (the one that sampled them), from the old log-probs pass (made for it when the update is on-policy), so which
  tokens carry the policy gradient depends neither on the micro-batch size nor on the epoch.
"""

from collections import defaultdict
from dataclasses import dataclass

import numpy as np
import torch

from .config import Config
from .losses import LossNorm, grpo_loss, top_entropy_mask, zero_std_groups
from .policy import logprob_passes, shares_prefix
from .reference import batched_forward
from .rollout import Rollouts


@dataclass
class LossRows:
    """Which samples of a rollout batch the update uses."""

    rows: list[int]
    """In the loss denominators: every sample, less truncated ones if they are masked."""
    computed: list[int]
    """The subset that gets a forward/backward pass (zero-std groups are left out when they carry no KL term)."""
    masked_truncated: int = 0
    """Samples left out because they were truncated and --mask_truncated_completions is on."""
    unscored: int = 0
    """Samples left out because they got no reward this step (a rubric row the judge could not score)."""


def select_rows(rewards: torch.Tensor, finish_reasons: list[str], group: int, cfg: Config, with_kl: bool,
                valid: torch.Tensor | None = None) -> LossRows:
    """valid: (N,) False for samples with no reward this step (left out like masked truncations)."""
    keep = torch.ones(len(finish_reasons), dtype=torch.bool)
    truncated = torch.tensor([r == "length" for r in finish_reasons], dtype=torch.bool)
    if cfg.optim.mask_truncated_completions:
        keep &= ~truncated
    unscored = torch.zeros_like(keep) if valid is None else ~valid.bool()
    keep &= ~unscored
    compute = keep.clone()
    if cfg.optim.filter_zero_std_groups and not with_kl:
        compute &= ~zero_std_groups(rewards, group, valid)
    return LossRows(rows=keep.nonzero().flatten().tolist(), computed=compute.nonzero().flatten().tolist(),
                    masked_truncated=int((truncated & ~unscored).sum()) if cfg.optim.mask_truncated_completions else 0,
                    unscored=int(unscored.sum()))


def on_rows(rollouts: Rollouts, rows: list[int], values: torch.Tensor) -> torch.Tensor:
    """(len(rows), T) values placed into an (N, T) zero tensor at `rows` (other samples are not in the loss)."""
    full = torch.zeros_like(rollouts.response_mask, dtype=torch.float32)
    full[rows] = values.to(full.device)
    return full


def update_policy(run, rollouts: Rollouts, advantages: torch.Tensor, ref_logprobs, selected: LossRows) -> dict[str, float]:
    """num_epochs passes x num_mini_batches optimizer steps; returns the step's train/ metrics."""
    cfg, device = run.cfg, rollouts.input_ids.device
    if not selected.computed:
        return {"train/optimizer_steps": 0.0}
    temperature = cfg.rollout.temperature
    old_logprobs = old_entropy = None
    on_policy = cfg.optim.num_epochs == 1 and cfg.optim.num_mini_batches == 1
    forking = cfg.optim.top_entropy_quantile < 1.0
    if not on_policy or forking:
        run.policy.eval()  # no dropout either way (policy.py); eval skips gradient checkpointing in a no-grad pass
        share = shares_prefix(run.policy, cfg.model.shared_prefix, rollouts, selected.computed)
        old, entropy = batched_forward(run.policy, rollouts, selected.computed, cfg.optim.inference_batch_size, temperature, forking, share)
        run.policy.train()
        old_logprobs = None if on_policy else on_rows(rollouts, selected.computed, old)
        old_entropy = None if entropy is None else on_rows(rollouts, selected.computed, entropy)
    computed = set(selected.computed)
    sums = defaultdict(lambda: torch.zeros((), device=device))
    steps = 0
    for _ in range(cfg.optim.num_epochs):
        order = [selected.rows[i] for i in torch.randperm(len(selected.rows)).tolist()]  # global RNG, seeded at start
        for mini in np.array_split(np.array(order), min(cfg.optim.num_mini_batches, len(order))):
            mini = mini.tolist()
            work = [r for r in mini if r in computed]
            if not work:
                continue
            norm = LossNorm(
                num_tokens=int(rollouts.response_mask[mini].sum()), num_sequences=len(mini), max_response_length=cfg.rollout.response_length
            )
            pg_tokens = None if old_entropy is None else on_rows(
                rollouts, work, top_entropy_mask(old_entropy[work], rollouts.response_mask[work], cfg.optim.top_entropy_quantile).float()).bool()
            backward_mini_batch(run.policy, run.master, rollouts, work, norm, advantages, old_logprobs, ref_logprobs, cfg, sums,
                                kl_temperature=temperature if run.reference is None else run.reference.temperature, pg_tokens=pg_tokens)
            grad_norm = optimizer_step(run)
            if grad_norm is None:
                sums["nonfinite_updates"] += 1
                continue
            sums["grad_norm"] += grad_norm
            steps += 1
    if steps:  # the vLLM server / the merged LoRA copy take the new weights before they next generate
        for holder in (run.rollout_server, run.generation):
            if holder is not None:
                holder.weights_changed()
    values = dict(zip(sums, torch.stack(list(sums.values())).tolist()))  # the one host sync of the update
    tokens = max(values.pop("tokens"), 1.0)
    metrics = {"train/optimizer_steps": float(steps), "train/nonfinite_updates": values.pop("nonfinite_updates", 0.0)}
    for name, value in values.items():
        if name in ("loss", "grad_norm"):
            if steps:
                metrics[f"train/{name}"] = value / steps
        elif name.endswith("_max"):
            metrics[f"train/{name}"] = value
        else:
            metrics[f"train/{name}"] = value / tokens
    return metrics


def backward_mini_batch(model, master, rollouts: Rollouts, rows: list[int], norm: LossNorm, advantages, old_logprobs,
                        ref_logprobs, cfg: Config, sums: dict, kl_temperature: float | None = None,
                        pg_tokens: torch.Tensor | None = None) -> None:
    """Accumulate the gradient of one mini-batch's `rows` in micro-batches of per_device_train_batch_size.

    `norm` counts the whole mini-batch (computed or not), so the gradient depends neither on the
    micro-batch size nor on which rows were skipped. Metric sums are added into `sums` on the device.
    kl_temperature: the reference log-probs' temperature, when it is not the sampling one (the KL term takes the
    policy's log-probs there too, from the same forward pass). pg_tokens (N, T) bool: the tokens that carry the
    policy-gradient term (--top_entropy_quantile); None: all.
    """
    temperature = cfg.rollout.temperature
    kl_apart = ref_logprobs is not None and kl_temperature not in (None, temperature)
    temperatures = (temperature, kl_temperature) if kl_apart else (temperature,)
    share = shares_prefix(model, cfg.model.shared_prefix, rollouts, rows)
    passes = logprob_passes(model, rollouts, rows, cfg.optim.per_device_train_batch_size, temperatures, entropy=True, share=share,
                            with_grad=True, on_prefix_grad=master.accumulate)
    for chunk, part, (logprobs, *kl_logprobs), entropy in passes:  # each (b, t); the next micro-batch comes after this backward
        width = logprobs.shape[1]
        op = cfg.optim
        loss, metrics = grpo_loss(
            logprobs,
            logprobs.detach() if old_logprobs is None else old_logprobs[chunk, :width],
            None if ref_logprobs is None else ref_logprobs[chunk, :width],
            advantages[chunk],
            part.response_mask,
            norm,
            clip_lower=op.clip_lower,
            clip_higher=op.clip_higher,
            beta=op.beta,
            kl_estimator=op.kl_estimator,
            aggregation=op.loss_aggregation,
            sampler_logprobs=sampled_logprobs(rollouts, chunk, width, logprobs),
            importance_cap=cfg.rollout.importance_sampling_cap,
            importance_level=cfg.rollout.importance_sampling_level,
            kl_logprobs=kl_logprobs[0] if kl_logprobs else None,
            policy_loss=op.policy_loss,
            clip_ratio_c=op.clip_ratio_c,
            sapo_temperatures=(op.sapo_temperature_pos, op.sapo_temperature_neg),
            entropy=entropy if op.entropy_coef else entropy.detach(),
            entropy_coef=op.entropy_coef,
            pg_token_mask=None if pg_tokens is None else pg_tokens[chunk, :width],
        )
        loss.backward()
        master.accumulate()  # low-precision gradients summed in fp32
        sums["loss"] += loss.detach()
        sums["tokens"] += part.response_mask.sum()
        for k, v in metrics.items():
            sums[k] = torch.maximum(sums[k], v) if k.endswith("_max") else sums[k] + v


def sampled_logprobs(rollouts: Rollouts, chunk: list[int], width: int, logprobs: torch.Tensor) -> torch.Tensor | None:
    """(b, t) the sampler's log-probs of `chunk`; on tool output (trained on only with --mask_tool_use false), which no
    sampler drew, the policy's own (detached): an importance ratio of 1."""
    if rollouts.sampler_logprobs is None:
        return None
    sampler = rollouts.sampler_logprobs[chunk, :width]
    if rollouts.tool_mask is None:
        return sampler
    return torch.where(rollouts.tool_mask[chunk, :width].bool(), logprobs.detach(), sampler)


def optimizer_step(run) -> torch.Tensor | None:
    """Clip, step (the fp32 master weights when the policy is low-precision); returns the gradient norm
    before clipping. A non-finite norm (a nan or inf loss or gradient) skips the step and returns None:
    the weights and AdamW's moments stay as they were."""
    params = run.master.optim_params
    max_norm = run.cfg.optim.max_grad_norm if run.cfg.optim.max_grad_norm > 0 else float("inf")
    grad_norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
    finite = bool(torch.isfinite(grad_norm))  # one host sync per optimizer step
    if finite:
        run.optimizer.step()
    run.optimizer.zero_grad(set_to_none=True)
    run.master.master_to_model()
    return grad_norm.detach() if finite else None
