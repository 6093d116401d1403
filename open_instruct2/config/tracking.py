"""Evaluation, checkpoint and tracking flags, their own checks, and the evaluation defaults (how many
evaluations, how many prompts each) used when the flags are left out."""

from typing import TYPE_CHECKING, Optional

from .base import documented, require

if TYPE_CHECKING:
    from .core import Config


@documented("eval, checkpoints and tracking")
class TrackingConfig:
    num_evals: Optional[int] = None
    """Evaluations evenly spaced over the run, plus one before the first step (0: none). The set: dataset_mixer_eval_list, or builtin:arithmetic's test split when training on builtin:arithmetic. Default: 10 (the original's), but at most one per 10 training steps (a 5-step try-out evaluates nothing and says so); a value given is used as is."""
    eval_max_samples: Optional[int] = None
    """Most evaluation prompts per evaluation (greedy decoding, response_length tokens). Default: 256 (the original's) on a GPU, 64 on a CPU or Mac (256 took 215 s per evaluation on a 2-core CPU)."""
    eval_num_samples: int = 1
    """Answers sampled per evaluation prompt: 1 = greedy pass@1 (the original's); k > 1 samples k at --eval_temperature and logs eval/pass@1, 2, 4, ... up to k (unbiased estimator) and eval/mean@k. New."""
    eval_temperature: Optional[float] = None
    """Sampling temperature of --eval_num_samples > 1 (default: --temperature). New."""
    eval_success_threshold: float = 1.0
    """A sample counts as a success in evaluation when its verifier scores 1, or, on rows without a verifier (reward functions only), when its reward is at least this. New."""
    save_freq: int = -1
    """Save model + tokenizer to checkpoints/step_<N> every N steps (-1: off)."""
    checkpoint_state_freq: int = -1
    """Save a resumable training state every N steps (-1: off) in checkpoints/step_<N>: weights or adapter, fp32 masters, optimizer, scheduler, sampler position, RNG states. Rerun the same command to continue from the newest."""
    keep_last_n_checkpoints: int = 3
    """Keep only the newest N checkpoints (-1: keep all)."""
    log_samples_freq: int = 10
    """Write sample completions to TensorBoard text every N steps (-1: off)."""
    save_rollouts: bool = False
    """Write every step's rollouts to <run>/rollouts/step_<N>.jsonl (prompt, response, reward breakdown, advantage, finish reason, length, whether the update used it). New."""
    with_tracking: bool = False
    """Also log to Weights & Biases."""
    wandb_project_name: str = "open_instruct2"
    """wandb project."""
    wandb_entity: Optional[str] = None
    """wandb entity (team or user)."""


DEFAULT_NUM_EVALS = 10
"""The original's num_evals."""
STEPS_PER_DEFAULT_EVAL = 10
"""Without --num_evals, at most one evaluation per this many training steps."""
EVAL_SAMPLES_GPU, EVAL_SAMPLES_CPU = 256, 64
"""Without --eval_max_samples: the original's 256 on a GPU; on a CPU or Mac 64 (256 greedy answers took 215 s on 2 cores)."""


def eval_max_samples(cfg: "Config", device_type: str) -> int:
    return cfg.tracking.eval_max_samples or (EVAL_SAMPLES_GPU if device_type == "cuda" else EVAL_SAMPLES_CPU)


def validate_tracking(tr: TrackingConfig) -> None:
    require(tr.num_evals is None or tr.num_evals >= 0, f"--num_evals must be >= 0 (0: no evaluation), got {tr.num_evals}")
    if tr.with_tracking:
        import importlib.util

        require(importlib.util.find_spec("wandb") is not None,
                "--with_tracking true needs wandb, which is not installed: pip install 'open-instruct2[wandb]' (or pip install wandb)")
    require(tr.eval_num_samples >= 1, f"--eval_num_samples must be >= 1 (1: greedy), got {tr.eval_num_samples}")
    require(tr.eval_temperature is None or tr.eval_temperature > 0, f"--eval_temperature must be > 0, got {tr.eval_temperature}")
    if tr.eval_max_samples is not None:
        require(tr.eval_max_samples > 0, f"--eval_max_samples must be > 0, got {tr.eval_max_samples}")
    require(tr.save_freq == -1 or tr.save_freq >= 1, f"--save_freq must be -1 (off) or >= 1, got {tr.save_freq}")
    require(tr.checkpoint_state_freq == -1 or tr.checkpoint_state_freq >= 1,
            f"--checkpoint_state_freq must be -1 (off) or >= 1, got {tr.checkpoint_state_freq}")
    require(
        tr.keep_last_n_checkpoints == -1 or tr.keep_last_n_checkpoints >= 1,
        f"--keep_last_n_checkpoints must be -1 (keep all) or >= 1, got {tr.keep_last_n_checkpoints}",
    )
    require(tr.log_samples_freq == -1 or tr.log_samples_freq >= 1, f"--log_samples_freq must be -1 (off) or >= 1, got {tr.log_samples_freq}")
