"""Optimisation flags (AdamW, schedule, batch split, GRPO loss, KL, non-finite steps) and the checks that
read only them. num_mini_batches against the rollout batch, beta against the reference mode: checks.py."""

import math
from typing import Literal

from ..losses import ADVANTAGE_NORMALIZATIONS, KL_ESTIMATORS, LOSS_AGGREGATIONS, POLICY_LOSSES
from .base import documented, require, require_positive


@documented("optimisation")
class OptimConfig:
    learning_rate: float = 2e-5
    """Peak AdamW learning rate."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    lr_scheduler_type: Literal[
        "linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup"
    ] = "linear"
    """Learning-rate schedule after warm-up."""
    warm_up_steps: int = 0
    """Warm-up in training steps (the schedule follows training steps, whatever number of optimizer steps each makes); wins over warmup_ratio when > 0."""
    warmup_ratio: float = 0.0
    """Warm-up as a fraction of the training steps."""
    max_grad_norm: float = 1.0
    """Clip the global gradient norm to this value (<= 0 disables clipping)."""
    per_device_train_batch_size: int = 1
    """Sequences per forward/backward (micro-batch); the update does not depend on it."""
    inference_batch_size: int = 8
    """Sequences per no-grad forward (old log-probs, the in-process reference), sorted by length. New. On a 2-core CPU, 16 rollouts of SmolLM2: batch 8 1.22x faster than 1, batch 16 slower (padding); on a GPU larger batches pay more."""
    num_epochs: int = 1
    """Passes over each rollout batch."""
    num_mini_batches: int = 1
    """Optimizer steps per pass; the rollout batch must divide evenly."""
    beta: float = 0.05
    """KL penalty coefficient (0 disables the reference model entirely)."""
    policy_loss: Literal[tuple(POLICY_LOSSES)] = "clip"
    """The policy-gradient loss (README 'Policy losses'): clip (PPO/GRPO token-ratio clip), gspo (one clipped ratio per sequence; pair with --loss_aggregation sequence_mean and tiny --clip_lower/--clip_higher such as 3e-4/4e-4), cispo (clipped, detached ratio times REINFORCE; --clip_higher is the ratio cap, e.g. 5), sapo (soft sigmoid gate, no hard clip; --sapo_temperature_pos/_neg). New."""
    clip_lower: float = 0.2
    """Ratio lower bound is 1 - clip_lower (clip, gspo)."""
    clip_higher: float = 0.2
    """Ratio upper bound is 1 + clip_higher (clip, gspo); set above clip_lower for DAPO-style clip-higher. cispo: the ratio cap itself (e.g. 5, MiniMax-M1), so it must be >= 1 there."""
    clip_ratio_c: float = 0.0
    """Dual clipping for --policy_loss clip: for a negative advantage the per-token loss is at most -c x A (verl's clip_ratio_c, e.g. 3; a bound on the loss, unlike TRL's delta, which caps the ratio); 0 = off, else > 1. New."""
    sapo_temperature_pos: float = 1.0
    """SAPO's gate temperature for tokens with a positive advantage (> 0). New."""
    sapo_temperature_neg: float = 1.05
    """SAPO's gate temperature for tokens with a negative advantage (> 0). New."""
    entropy_coef: float = 0.0
    """Entropy bonus: -entropy_coef x the per-token entropy (at the sampling temperature) is added to the loss; 0 = off (train/entropy is logged either way). New."""
    top_entropy_quantile: float = 1.0
    """Only the top q fraction of each mini-batch's response tokens by entropy (of the policy before the update) carry the policy-gradient term, the "80/20" forking tokens (Wang et al. 2025, q = 0.2); the KL term stays on every token; 1.0 = off. Costs a no-grad forward pass when the update is on-policy. New."""
    kl_estimator: Literal[tuple(KL_ESTIMATORS)] = "kl3"
    """KL estimator on d = logp - ref_logp: kl1 = d, kl2 = d^2/2, kl3 = exp(-d) - 1 + d, kl4 = ratio * d."""
    advantage_normalization_type: Literal[tuple(ADVANTAGE_NORMALIZATIONS)] = "standard"
    """standard: (r - group mean) / (group std + 1e-8). centered: r - group mean (Dr. GRPO). batch: (r - group mean) / (std of the whole batch + 1e-8), as TRL's scale_rewards="batch"."""
    loss_aggregation: Literal[tuple(LOSS_AGGREGATIONS)] = "token_mean"
    """token_mean: mean over all response tokens of a mini-batch (DAPO). sequence_mean: per-sequence mean, then mean (GRPO). constant: sum / (sequences x response_length) (Dr. GRPO)."""
    mask_truncated_completions: bool = False
    """Leave responses that hit response_length (finish reason 'length') out of the loss: numerator and denominators."""
    max_nonfinite_updates: int = 3
    """A step whose loss or gradient is not finite skips its update (counted in train/nonfinite_updates); this many such steps in a row stop the run, after saving. New."""
    filter_zero_std_groups: bool = True
    """Skip the forward/backward of groups whose rewards are all equal when they contribute nothing (beta 0): their advantage is 0, they stay in the loss denominators, and with beta > 0 they keep their KL term. The update is the same either way as long as each mini-batch holds a sample with a signal; a mini-batch with none makes no optimizer step when filtered, while unfiltered it takes an AdamW step on a zero gradient (momentum and weight decay still move the weights)."""


def validate_optim(op: OptimConfig) -> None:
    require_positive(op, "inference_batch_size", "per_device_train_batch_size", "num_epochs", "num_mini_batches")
    require(op.learning_rate >= 0, f"--learning_rate must be >= 0, got {op.learning_rate}")
    require(op.weight_decay >= 0, f"--weight_decay must be >= 0, got {op.weight_decay}")
    require(op.warm_up_steps >= 0, f"--warm_up_steps must be >= 0, got {op.warm_up_steps}")
    require(0 <= op.warmup_ratio <= 1, f"--warmup_ratio must be in [0, 1], got {op.warmup_ratio}")
    require(op.beta >= 0, f"--beta must be >= 0, got {op.beta}")
    require(0 <= op.clip_lower < 1, f"--clip_lower must be in [0, 1), got {op.clip_lower}")
    require(op.clip_higher >= 0, f"--clip_higher must be >= 0, got {op.clip_higher}")
    require(op.clip_ratio_c == 0 or op.clip_ratio_c > 1, f"--clip_ratio_c must be 0 (off) or > 1, got {op.clip_ratio_c}")
    require(op.clip_ratio_c == 0 or op.policy_loss == "clip",
            f"--clip_ratio_c applies to --policy_loss clip only, not {op.policy_loss}; drop it or set it to 0")
    require(op.policy_loss != "cispo" or op.clip_higher >= 1,
            f"--policy_loss cispo takes --clip_higher as its ratio cap eps_max (a bound such as 5, MiniMax-M1), got {op.clip_higher}; "
            "set --clip_higher 5")
    for name in ("sapo_temperature_pos", "sapo_temperature_neg", "entropy_coef", "clip_ratio_c", "clip_higher", "clip_lower"):
        require(math.isfinite(getattr(op, name)), f"--{name} must be a finite number, got {getattr(op, name)}")
    for name in ("sapo_temperature_pos", "sapo_temperature_neg"):
        require(getattr(op, name) > 0, f"--{name} must be > 0, got {getattr(op, name)}")
    require(0 < op.top_entropy_quantile <= 1, f"--top_entropy_quantile must be in (0, 1] (1 = off), got {op.top_entropy_quantile}")
    require(op.entropy_coef >= 0, f"--entropy_coef must be >= 0 (0 = off), got {op.entropy_coef}")
    require(op.max_nonfinite_updates >= 1, f"--max_nonfinite_updates must be >= 1, got {op.max_nonfinite_updates}")
