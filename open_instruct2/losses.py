"""GRPO math as pure tensor functions: advantages, KL estimators, clipped policy loss, aggregation.

Nothing here reads a config, logs, or calls `.item()`; every function takes tensors and plain values and
returns new tensors. Shapes: N = samples in a rollout batch, G = samples per prompt, B = sequences in a
micro-batch, T = response tokens (padded).

Simplifications and choices, for a reader comparing with other trainers:
- Group std is the population std (ddof=0), as open-instruct computes it with numpy; TRL uses ddof=1.
- KL is a per-token penalty added to the loss (not folded into the reward), as in open-instruct and TRL.
- Variants (KL estimator, advantage normalisation, loss aggregation) are chosen by name from the dicts
  below; the config's allowed values are these dicts' keys.
"""

from dataclasses import dataclass
from typing import Callable

import torch

Tensor = torch.Tensor


# ---------------------------------------------------------------- advantages


def _group(rewards: Tensor, group_size: int) -> Tensor:
    """(N,) -> (N // G, G); samples of one prompt are contiguous."""
    if rewards.dim() != 1 or rewards.numel() % group_size != 0:
        raise ValueError(f"rewards of shape {tuple(rewards.shape)} do not split into groups of {group_size}")
    return rewards.view(-1, group_size)


def _valid(rewards: Tensor, valid: Tensor | None) -> Tensor:
    return torch.ones_like(rewards, dtype=torch.bool) if valid is None else valid.bool()


def _group_stats(rewards: Tensor, group_size: int, valid: Tensor | None) -> tuple[Tensor, Tensor, Tensor]:
    """(grouped rewards, group mean, group population std), both statistics over the valid samples only.
    rewards, valid (N,) -> (N/G, G), (N/G, 1), (N/G, 1)."""
    grouped = _group(rewards, group_size)  # (N/G, G)
    weight = _group(_valid(rewards, valid).to(rewards.dtype), group_size)  # (N/G, G) 1 where valid
    count = weight.sum(dim=1, keepdim=True).clamp(min=1)  # (N/G, 1)
    mean = (grouped * weight).sum(dim=1, keepdim=True) / count
    std = (((grouped - mean) ** 2 * weight).sum(dim=1, keepdim=True) / count).sqrt()
    return grouped, mean, std


def advantages_standard(rewards: Tensor, group_size: int, valid: Tensor | None = None) -> Tensor:
    """(r - group mean) / (group std + 1e-8), statistics over the group's valid samples. rewards (N,) -> (N,)."""
    grouped, mean, std = _group_stats(rewards, group_size, valid)
    return ((grouped - mean) / (std + 1e-8)).reshape(-1)


def advantages_centered(rewards: Tensor, group_size: int, valid: Tensor | None = None) -> Tensor:
    """r - group mean (Dr. GRPO: no division by the std). rewards (N,) -> (N,)."""
    grouped, mean, _ = _group_stats(rewards, group_size, valid)
    return (grouped - mean).reshape(-1)


ADVANTAGE_NORMALIZATIONS: dict[str, Callable[[Tensor, int, Tensor | None], Tensor]] = {
    "standard": advantages_standard,
    "centered": advantages_centered,
}


def compute_advantages(rewards: Tensor, group_size: int, normalization: str, valid: Tensor | None = None) -> Tensor:
    """Per-sample advantages (N,) with the named normalisation; exactly 0 in groups whose rewards are all
    equal (rounding in the group mean would otherwise leave ~1e-9 residues that the std of ~1e-9 blows up)
    and for invalid samples (`valid` False: e.g. a response the judge could not score), which are left out
    of their group's mean and std."""
    advantages = _pick(ADVANTAGE_NORMALIZATIONS, normalization, "advantage normalization")(rewards.float(), group_size, valid)
    keep = ~zero_std_groups(rewards, group_size, valid) & _valid(rewards, valid)
    return torch.where(keep, advantages, 0.0)  # (N,)


def zero_std_groups(rewards: Tensor, group_size: int, valid: Tensor | None = None) -> Tensor:
    """(N,) bool: True for every sample of a group whose valid rewards are all equal, or that has fewer than
    two valid samples (no learning signal)."""
    grouped = _group(rewards, group_size)  # (N/G, G)
    ok = _group(_valid(rewards, valid), group_size)  # (N/G, G)
    first = torch.where(ok, grouped, torch.inf).min(dim=1, keepdim=True).values  # (N/G, 1) smallest valid reward
    last = torch.where(ok, grouped, -torch.inf).max(dim=1, keepdim=True).values  # (N/G, 1) largest valid reward
    same = (first == last) | (ok.sum(dim=1, keepdim=True) < 2)  # (N/G, 1)
    return same.expand_as(grouped).reshape(-1)


# ---------------------------------------------------------------- KL estimators
# All take d = logprobs - ref_logprobs per token (B, T) and the importance ratio (B, T).
# kl1 = d, kl2 = d^2 / 2, kl3 = exp(-d) - 1 + d (Schulman's k3: unbiased, always >= 0), kl4 = ratio * d.
# kl3 clamps d to +-KL3_CLAMP before the exp (as open-instruct does): one token the reference finds
# impossible (ref_logprob -> -inf) would otherwise make the loss inf and every gradient nan.

KL3_CLAMP = 40.0


def kl1(logprobs: Tensor, ref_logprobs: Tensor, ratio: Tensor) -> Tensor:
    return logprobs - ref_logprobs


def kl2(logprobs: Tensor, ref_logprobs: Tensor, ratio: Tensor) -> Tensor:
    return (logprobs - ref_logprobs).pow(2) / 2


def kl3(logprobs: Tensor, ref_logprobs: Tensor, ratio: Tensor) -> Tensor:
    d = (logprobs - ref_logprobs).clamp(-KL3_CLAMP, KL3_CLAMP)  # (B, T)
    return torch.expm1(-d) + d


def kl4(logprobs: Tensor, ref_logprobs: Tensor, ratio: Tensor) -> Tensor:
    return ratio * (logprobs - ref_logprobs)


KL_ESTIMATORS: dict[str, Callable[[Tensor, Tensor, Tensor], Tensor]] = {"kl1": kl1, "kl2": kl2, "kl3": kl3, "kl4": kl4}


# ---------------------------------------------------------------- aggregation


@dataclass(frozen=True)
class LossNorm:
    """Denominators counted over a whole mini-batch before its micro-batch loop, so that the summed
    micro-batch losses equal the mini-batch loss whatever the micro-batch size."""

    num_tokens: int
    """Valid response tokens in the mini-batch."""
    num_sequences: int
    """Sequences in the mini-batch."""
    max_response_length: int
    """The configured response_length (the constant of Dr. GRPO)."""


def token_mean(per_token: Tensor, response_mask: Tensor, norm: LossNorm) -> Tensor:
    """DAPO: every valid token of the mini-batch weighs the same."""
    return (per_token * response_mask).sum() / max(norm.num_tokens, 1)


def sequence_mean(per_token: Tensor, response_mask: Tensor, norm: LossNorm) -> Tensor:
    """GRPO paper: mean over each sequence's tokens, then mean over sequences."""
    lengths = response_mask.sum(dim=1).clamp(min=1)  # (B,)
    return ((per_token * response_mask).sum(dim=1) / lengths).sum() / max(norm.num_sequences, 1)


def constant_norm(per_token: Tensor, response_mask: Tensor, norm: LossNorm) -> Tensor:
    """Dr. GRPO: divide by sequences x response_length, a constant, so length does not bias the gradient."""
    return (per_token * response_mask).sum() / max(norm.num_sequences * norm.max_response_length, 1)


LOSS_AGGREGATIONS: dict[str, Callable[[Tensor, Tensor, LossNorm], Tensor]] = {
    "token_mean": token_mean,
    "sequence_mean": sequence_mean,
    "constant": constant_norm,
}


def aggregate(per_token: Tensor, response_mask: Tensor, norm: LossNorm, mode: str) -> Tensor:
    """The one place per-token values (B, T) become a scalar; `mode` is a LOSS_AGGREGATIONS key."""
    return _pick(LOSS_AGGREGATIONS, mode, "loss aggregation")(per_token, response_mask.to(per_token.dtype), norm)


# ---------------------------------------------------------------- sampler mismatch
# The sampler's probabilities differ slightly from the trainer's (a vLLM server, or HF generate from a merged or
# packed copy or through a KV cache: kernels, precision, a merged LoRA). Truncated importance sampling weighs each policy-gradient
# term by min(p_trainer / p_sampler, cap) of the sampled token ("token") or of the whole response
# ("sequence": the product over its tokens, one weight for all of them). Log-ratios are clamped before the
# exp, so min(exp(x), cap) = exp(min(x, log cap)) never overflows.


def token_log_ratio(log_ratio: Tensor, response_mask: Tensor) -> Tensor:
    return log_ratio


def sequence_log_ratio(log_ratio: Tensor, response_mask: Tensor) -> Tensor:
    return (log_ratio * response_mask).sum(dim=1, keepdim=True).expand_as(log_ratio)  # (B, T)


IMPORTANCE_LEVELS: dict[str, Callable[[Tensor, Tensor], Tensor]] = {"token": token_log_ratio, "sequence": sequence_log_ratio}


def importance_weights(old_logprobs: Tensor, sampler_logprobs: Tensor, response_mask: Tensor, cap: float, level: str) -> tuple[Tensor, Tensor]:
    """(weights, capped) both (B, T): the truncated importance weight of each token (1 where cap is 0, i.e.
    off), and whether the cap bound it. old_logprobs are the trainer's log-probs of the sampled tokens before
    the update, sampler_logprobs the sampling engine's; outside response_mask the weight is 1."""
    mask = response_mask.to(old_logprobs.dtype)
    log_ratio = _pick(IMPORTANCE_LEVELS, level, "importance sampling level")((old_logprobs - sampler_logprobs) * mask, mask)  # (B, T)
    if cap <= 0:
        return torch.ones_like(log_ratio), torch.zeros_like(log_ratio, dtype=torch.bool)
    limit = torch.log(torch.tensor(cap, dtype=log_ratio.dtype))
    capped = (log_ratio > limit) & response_mask.bool()
    return torch.exp(log_ratio.clamp(max=limit)), capped


# ---------------------------------------------------------------- the GRPO loss


def grpo_loss(
    logprobs: Tensor,
    old_logprobs: Tensor,
    ref_logprobs: Tensor | None,
    advantages: Tensor,
    response_mask: Tensor,
    norm: LossNorm,
    *,
    clip_lower: float,
    clip_higher: float,
    beta: float,
    kl_estimator: str,
    aggregation: str,
    sampler_logprobs: Tensor | None = None,
    importance_cap: float = 0.0,
    importance_level: str = "token",
    kl_logprobs: Tensor | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Clipped surrogate plus beta * KL, aggregated by name.

    logprobs (B, T) carry gradients; old_logprobs, ref_logprobs (B, T) and advantages (B,) do not;
    response_mask (B, T) is 1 on sampled response tokens. Metrics are detached SUMS over the valid tokens
    (policy_loss, clip_fraction, ratio, kl): the caller adds them over micro-batches and divides by the
    tokens it computed, so a logged metric is a plain token mean whatever the loss aggregation; a name
    ending in _max is a maximum instead.

    sampler_logprobs (B, T), the sampler's log-probs of the sampled tokens (a vLLM server, or HF generate's copy of
    the model): each policy-gradient term is weighed by its truncated importance weight (importance_weights above;
    the KL term is not).

    kl_logprobs (B, T), with gradients: the policy's log-probs at the temperature ref_logprobs were taken at, when
    that is not the sampling temperature (a reference served at temperature 1); the KL term compares those, the
    ratio and the policy gradient stay on `logprobs`. None: logprobs.
    """
    # Outside the mask inputs may be garbage (padding): zero them before any exp, so inf * 0 can't be nan.
    mask = response_mask.bool()
    logprobs = torch.where(mask, logprobs, 0.0)
    old_logprobs = torch.where(mask, old_logprobs, 0.0)
    ratio = torch.exp(logprobs - old_logprobs)  # (B, T)
    adv = advantages.unsqueeze(1)  # (B, 1)
    unclipped = -adv * ratio  # (B, T)
    clipped = -adv * torch.clamp(ratio, 1.0 - clip_lower, 1.0 + clip_higher)  # (B, T)
    per_token = torch.maximum(unclipped, clipped)  # (B, T)
    valid = response_mask.to(per_token.dtype)  # (B, T)
    metrics = {
        "clip_fraction": ((clipped > unclipped).float() * valid).sum(),
        "ratio": (ratio.detach() * valid).sum(),
    }
    if sampler_logprobs is not None:  # the sampler's own log-probs: truncated importance weights (detached)
        sampler_logprobs = torch.where(mask, sampler_logprobs, 0.0)
        weights, capped = importance_weights(old_logprobs.detach(), sampler_logprobs, response_mask, importance_cap, importance_level)
        per_token = per_token * weights
        gap = (old_logprobs.detach() - sampler_logprobs).abs() * valid  # (B, T)
        metrics.update(sampler_mismatch_mean=gap.sum(), sampler_mismatch_max=gap.max(), importance_weight=(weights * valid).sum(),
                       importance_capped_fraction=(capped.float() * valid).sum())
    metrics["policy_loss"] = (per_token.detach() * valid).sum()
    if ref_logprobs is not None and beta != 0.0:
        ref_logprobs = torch.where(mask, ref_logprobs, 0.0)
        kl_side = logprobs if kl_logprobs is None else torch.where(mask, kl_logprobs, 0.0)  # (B, T) at the reference's temperature
        kl = _pick(KL_ESTIMATORS, kl_estimator, "KL estimator")(kl_side, ref_logprobs, ratio)  # (B, T)
        per_token = per_token + beta * kl
        metrics["kl"] = (kl.detach() * valid).sum()
    loss = aggregate(per_token, response_mask, norm, aggregation)
    return loss, metrics


def _pick(table: dict, name: str, what: str):
    if name not in table:
        raise ValueError(f"unknown {what} {name!r}; choose one of {', '.join(table)}")
    return table[name]
