"""GRPO math as pure tensor functions: advantages, KL estimators, policy-loss variants, entropy, aggregation.

Nothing here reads a config, logs, or calls `.item()`; every function takes tensors and plain values and
returns new tensors. Shapes: N = samples in a rollout batch, G = samples per prompt, B = sequences in a
micro-batch, T = response tokens (padded).

Simplifications and choices, for a reader comparing with other trainers:
- Group std is the population std (ddof=0), as open-instruct computes it with numpy; TRL uses ddof=1.
- KL is a per-token penalty added to the loss (not folded into the reward), as in open-instruct and TRL.
- Variants (policy loss, KL estimator, advantage normalisation, loss aggregation) are chosen by name from the dicts
  below; the config's allowed values are these dicts' keys.
"""

import math
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


def advantages_batch(rewards: Tensor, group_size: int, valid: Tensor | None = None) -> Tensor:
    """(r - group mean) / (batch std + 1e-8): the std of every valid reward of the batch (population), as TRL's
    scale_rewards="batch" (which takes ddof=1); a group of rare signal keeps its size. rewards (N,) -> (N,)."""
    grouped, mean, _ = _group_stats(rewards, group_size, valid)
    ok = _valid(rewards, valid)
    std = rewards[ok].std(unbiased=False) if ok.sum() > 1 else rewards.new_zeros(())
    return ((grouped - mean) / (std + 1e-8)).reshape(-1)


ADVANTAGE_NORMALIZATIONS: dict[str, Callable[[Tensor, int, Tensor | None], Tensor]] = {
    "standard": advantages_standard,
    "centered": advantages_centered,
    "batch": advantages_batch,
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


# ---------------------------------------------------------------- policy-loss variants
# Each takes the policy's log-probs (B, T, with gradients), the old ones (B, T), advantages (B, 1), the response
# mask (B, T) and the settings, and returns (per-token policy-gradient loss (B, T), cut (B, T) bool: the tokens
# whose gradient the variant bounded, logged as train/clip_fraction). r = exp(logp - old_logp), A the advantage.


@dataclass(frozen=True)
class PolicyLossSettings:
    """The knobs the variants read (--clip_lower, --clip_higher, --clip_ratio_c, --sapo_temperature_*)."""

    clip_lower: float = 0.2
    clip_higher: float = 0.2
    clip_ratio_c: float = 0.0
    """Dual clip bound c > 1 for A < 0 (0: off)."""
    sapo_temperature_pos: float = 1.0
    sapo_temperature_neg: float = 1.05


def _pessimistic_clip(ratio: Tensor, adv: Tensor, s: PolicyLossSettings) -> tuple[Tensor, Tensor]:
    """max(-A r, -A clip(r, 1 - clip_lower, 1 + clip_higher)) and where the clipped term won (clip and gspo)."""
    unclipped, clipped = -adv * ratio, -adv * torch.clamp(ratio, 1.0 - s.clip_lower, 1.0 + s.clip_higher)
    return torch.maximum(unclipped, clipped), clipped > unclipped


def clip_loss(logprobs: Tensor, old_logprobs: Tensor, adv: Tensor, mask: Tensor, s: PolicyLossSettings) -> tuple[Tensor, Tensor]:
    """PPO/GRPO: max(-A r, -A clip(r, 1 - clip_lower, 1 + clip_higher)); with dual clip (clip_ratio_c = c), for
    A < 0 also at most -c A (verl's clip_ratio_c: a bound on the loss, not TRL's `delta`, which caps r itself)."""
    per_token, cut = _pessimistic_clip(torch.exp(logprobs - old_logprobs), adv, s)  # (B, T)
    if s.clip_ratio_c > 0:
        per_token = torch.where(adv < 0, torch.minimum(per_token, -adv * s.clip_ratio_c), per_token)
    return per_token, cut


def gspo_loss(logprobs: Tensor, old_logprobs: Tensor, adv: Tensor, mask: Tensor, s: PolicyLossSettings) -> tuple[Tensor, Tensor]:
    """GSPO (Zheng et al. 2025), token form: s_i = exp(mean over the response of (logp - old_logp)), one ratio per
    sequence, clipped to [1 - clip_lower, 1 + clip_higher]; every token carries s_i = sg(s_i) * p_t / sg(p_t), so the
    value is the sequence's and the gradient flows through each token (sequence_mean aggregation gives GSPO's)."""
    m = mask.to(logprobs.dtype)
    log_seq = ((logprobs - old_logprobs) * m).sum(dim=1, keepdim=True) / m.sum(dim=1, keepdim=True).clamp(min=1)  # (B, 1)
    ratio = torch.exp(log_seq.detach() + logprobs - logprobs.detach())  # (B, T): s_i in value, per-token gradient
    return _pessimistic_clip(ratio, adv, s)


def cispo_loss(logprobs: Tensor, old_logprobs: Tensor, adv: Tensor, mask: Tensor, s: PolicyLossSettings) -> tuple[Tensor, Tensor]:
    """CISPO (MiniMax-M1): -sg(min(r, eps_max)) A logp, eps_max = clip_higher (a ratio bound such as 5): the weight
    is clipped and detached, the gradient is REINFORCE's, so a capped token still gets one."""
    ratio = torch.exp(logprobs - old_logprobs).detach()
    return -torch.clamp(ratio, max=s.clip_higher) * adv * logprobs, ratio > s.clip_higher


def sapo_loss(logprobs: Tensor, old_logprobs: Tensor, adv: Tensor, mask: Tensor, s: PolicyLossSettings) -> tuple[Tensor, Tensor]:
    """SAPO (soft adaptive policy optimisation): -(4 / tau) sigmoid(tau (r - 1)) A, tau = sapo_temperature_pos for
    A > 0 and sapo_temperature_neg for A < 0: a soft gate instead of a hard clip (its gradient is r's at r = 1 and
    decays smoothly away from it). cut: tokens whose gate weight 4 sigmoid' fell below 1/2 (no hard clip)."""
    ratio = torch.exp(logprobs - old_logprobs)
    tau = torch.where(adv > 0, adv.new_tensor(s.sapo_temperature_pos), adv.new_tensor(s.sapo_temperature_neg))  # (B, 1)
    gate = torch.sigmoid(tau * (ratio - 1.0))  # (B, T)
    weight = 4 * gate.detach() * (1 - gate.detach())  # d(gate * 4 / tau) / dr, 1 at r = 1
    return -(4.0 / tau) * gate * adv, weight < 0.5


POLICY_LOSSES: dict[str, Callable[[Tensor, Tensor, Tensor, Tensor, PolicyLossSettings], tuple[Tensor, Tensor]]] = {
    "clip": clip_loss,
    "gspo": gspo_loss,
    "cispo": cispo_loss,
    "sapo": sapo_loss,
}


# ---------------------------------------------------------------- entropy


def top_entropy_mask(entropy: Tensor, response_mask: Tensor, quantile: float) -> Tensor:
    """(B, T) bool: the top `quantile` fraction of the valid tokens by entropy (ties at the threshold included),
    the forking tokens of "Beyond the 80/20 rule" (Wang et al. 2025). quantile 1: every valid token."""
    valid = response_mask.bool()
    if quantile >= 1.0 or not valid.any():
        return valid
    values = entropy[valid]
    k = max(1, math.ceil(quantile * values.numel()))
    threshold = torch.topk(values, k).values.min()
    return valid & (entropy >= threshold)


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
    policy_loss: str = "clip",
    clip_ratio_c: float = 0.0,
    sapo_temperatures: tuple[float, float] = (1.0, 1.05),
    entropy: Tensor | None = None,
    entropy_coef: float = 0.0,
    pg_token_mask: Tensor | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Policy-gradient loss (the `policy_loss` variant) plus beta * KL minus entropy_coef * entropy, aggregated by name.

    logprobs (B, T) carry gradients; old_logprobs, ref_logprobs (B, T) and advantages (B,) do not;
    response_mask (B, T) is 1 on sampled response tokens. Metrics are detached SUMS over the valid tokens
    (policy_loss, clip_fraction, ratio, kl, entropy): the caller adds them over micro-batches and divides by the
    tokens it computed, so a logged metric is a plain token mean whatever the loss aggregation; a name
    ending in _max is a maximum instead.

    sampler_logprobs (B, T), the sampler's log-probs of the sampled tokens (a vLLM server, or HF generate's copy of
    the model): each policy-gradient term is weighed by its truncated importance weight (importance_weights above;
    the KL term is not).

    kl_logprobs (B, T), with gradients: the policy's log-probs at the temperature ref_logprobs were taken at, when
    that is not the sampling temperature (a reference served at temperature 1); the KL term compares those, the
    ratio and the policy gradient stay on `logprobs`. None: logprobs.

    entropy (B, T): the policy's per-token entropy at the sampling temperature (with gradients when entropy_coef is
    not 0); pg_token_mask (B, T) bool: the tokens that carry the policy-gradient term (--top_entropy_quantile; the KL
    and entropy terms stay on every token). None: all of them.
    """
    # Outside the mask inputs may be garbage (padding): zero them before any exp, so inf * 0 can't be nan.
    mask = response_mask.bool()
    logprobs = torch.where(mask, logprobs, 0.0)
    old_logprobs = torch.where(mask, old_logprobs, 0.0)
    ratio = torch.exp(logprobs - old_logprobs)  # (B, T) the token ratio, for the metrics and kl4
    settings = PolicyLossSettings(clip_lower, clip_higher, clip_ratio_c, *sapo_temperatures)
    adv = advantages.unsqueeze(1)  # (B, 1)
    per_token, cut = _pick(POLICY_LOSSES, policy_loss, "policy loss")(logprobs, old_logprobs, adv, response_mask, settings)  # (B, T)
    valid = response_mask.to(per_token.dtype)  # (B, T)
    metrics = {"clip_fraction": (cut.float() * valid).sum(), "ratio": (ratio.detach() * valid).sum()}
    if clip_ratio_c > 0:  # the tokens the dual bound -c A held (A < 0, r > c)
        metrics["dual_clip_fraction"] = ((adv < 0) & (ratio.detach() > clip_ratio_c)).float().mul(valid).sum()
    if pg_token_mask is not None:
        per_token = per_token * pg_token_mask.to(per_token.dtype)
        metrics["pg_token_fraction"] = (pg_token_mask.float() * valid).sum()
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
    if entropy is not None:
        entropy = torch.where(mask, entropy, 0.0)
        metrics["entropy"] = (entropy.detach() * valid).sum()
        if entropy_coef != 0.0:
            per_token = per_token - entropy_coef * entropy
    loss = aggregate(per_token, response_mask, norm, aggregation)
    return loss, metrics


def _pick(table: dict, name: str, what: str):
    if name not in table:
        raise ValueError(f"unknown {what} {name!r}; choose one of {', '.join(table)}")
    return table[name]
