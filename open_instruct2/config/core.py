"""The whole configuration: `GROUPS` (--help order), `Config`, defaults and overrides, flags not available
yet, the smoke-test overrides, and the numbers derived from the flags once they are valid (`derive`)."""

import dataclasses
import math
import os
import time
from dataclasses import dataclass

from ..errors import ConfigError
from .base import SECRET_FIELDS
from .data import DataConfig
from .experiment import ExperimentConfig, MemoryProfileConfig
from .model import LoraConfig, ModelConfig
from .optim import OptimConfig
from .reference import ReferenceConfig
from .rewards import RewardConfig
from .rollout import RolloutConfig
from .rubrics import RubricConfig
from .runtime import RuntimeConfig
from .tools import ToolsConfig
from .tracking import DEFAULT_NUM_EVALS, STEPS_PER_DEFAULT_EVAL, TrackingConfig

GROUPS = {
    "experiment": ExperimentConfig,
    "memory": MemoryProfileConfig,
    "runtime": RuntimeConfig,
    "model": ModelConfig,
    "lora": LoraConfig,
    "data": DataConfig,
    "rollout": RolloutConfig,
    "tools": ToolsConfig,
    "optim": OptimConfig,
    "reward": RewardConfig,
    "rubric": RubricConfig,
    "reference": ReferenceConfig,
    "tracking": TrackingConfig,
}


@dataclass
class Config:
    """All flag groups of one run; `cfg.optim.beta`, `cfg.rollout.temperature`, ..."""

    experiment: ExperimentConfig
    memory: MemoryProfileConfig
    runtime: RuntimeConfig
    model: ModelConfig
    lora: LoraConfig
    data: DataConfig
    rollout: RolloutConfig
    tools: ToolsConfig
    optim: OptimConfig
    reward: RewardConfig
    rubric: RubricConfig
    reference: ReferenceConfig
    tracking: TrackingConfig

    def flat(self) -> dict:
        """flag name -> value, in --help order."""
        return {k: v for g in GROUPS for k, v in dataclasses.asdict(getattr(self, g)).items()}

    def masked(self) -> dict:
        """flat(), with secrets replaced: safe to print, save or send to a tracker."""
        return {k: ("***" if k in SECRET_FIELDS and v else v) for k, v in self.flat().items()}


def default_config(**overrides) -> Config:
    """A Config with defaults, and flag=value overrides (for tests and scripts)."""
    cfg = Config(**{g: cls() for g, cls in GROUPS.items()})
    for name, value in overrides.items():
        setattr(group_of(cfg, name), name, value)
    return cfg


def group_of(cfg: Config, flag: str):
    for g in GROUPS:
        obj = getattr(cfg, g)
        if hasattr(obj, flag):
            return obj
    raise ConfigError(f"unknown flag --{flag}; run with --help to list the flags")


# ---------------------------------------------------------------- not available yet
# Features whose flags are parsed but whose implementation has not landed. Setting such a flag away
# from its default is an error, never silently ignored. Remove an entry when its feature lands.
NOT_AVAILABLE_YET: dict[str, str] = {}


def check_not_available(cfg: Config) -> None:
    defaults = default_config().flat()
    for name, value in cfg.flat().items():
        if name in NOT_AVAILABLE_YET and value != defaults[name]:
            raise ConfigError(
                f"--{name}: {NOT_AVAILABLE_YET[name]} is not available yet in open-instruct2; "
                f"remove --{name} (default {defaults[name]!r})"
            )


# ---------------------------------------------------------------- smoke test


def apply_smoke_test(cfg: Config) -> Config:
    """The original's smoke-test overrides: tiny, fast, no tracking, no rubric machinery, no checkpoints."""
    if not cfg.experiment.smoke_test:
        return cfg
    cfg = dataclasses.replace(cfg, **{g: dataclasses.replace(getattr(cfg, g)) for g in GROUPS})
    cfg.tracking.with_tracking = False
    cfg.tracking.save_freq = -1
    cfg.tracking.checkpoint_state_freq = -1
    cfg.tracking.eval_max_samples = min(cfg.tracking.eval_max_samples or 8, 8)
    cfg.tracking.num_evals = 1 if cfg.tracking.num_evals is None else min(cfg.tracking.num_evals, 1)
    cfg.rubric.apply_adaptive_rubric_reward = False
    cfg.rubric.use_rubric_buffer = False
    cfg.rubric.normalize_rubric_scores = False
    cfg.rubric.save_adaptive_rubrics = False
    cfg.rollout.num_unique_prompts_rollout = 1
    cfg.rollout.num_samples_per_prompt_rollout = 2
    cfg.rollout.response_length = min(cfg.rollout.response_length, 64)
    cfg.data.max_prompt_token_length = min(cfg.data.max_prompt_token_length, 256)
    cfg.optim.per_device_train_batch_size = 1
    cfg.optim.num_epochs = 1
    cfg.optim.num_mini_batches = 1
    cfg.optim.filter_zero_std_groups = False  # run the update even when every answer is wrong
    cfg.rollout.num_training_steps = max(1, cfg.experiment.smoke_test_steps)
    cfg.rollout.total_episodes = cfg.rollout.num_training_steps * 2
    return cfg


# ---------------------------------------------------------------- derived values


@dataclass(frozen=True)
class Derived:
    """Numbers computed from the flags once, after validation (never flags themselves)."""

    run_name: str
    run_dir: str
    num_training_steps: int
    rollout_batch_size: int
    """num_unique_prompts_rollout x num_samples_per_prompt_rollout."""
    mini_batch_size: int
    warmup_steps: int
    """Warm-up in training steps (the learning-rate schedule follows training steps)."""
    num_evals: int
    """Evaluations after step 0: --num_evals, or by default DEFAULT_NUM_EVALS, at most one per STEPS_PER_DEFAULT_EVAL steps."""


def derive(cfg: Config, now: float | None = None) -> Derived:
    ex, ro, op = cfg.experiment, cfg.rollout, cfg.optim
    run_name = ex.run_name or f"{ex.exp_name}__{ex.seed}__{int(now if now is not None else time.time())}"
    batch = ro.num_unique_prompts_rollout * ro.num_samples_per_prompt_rollout
    steps = ro.num_training_steps or ro.total_episodes // batch
    if steps < 1:
        raise ConfigError(
            f"--total_episodes {ro.total_episodes} is less than one rollout batch of {batch}; raise it or set --num_training_steps"
        )
    warmup = op.warm_up_steps if op.warm_up_steps > 0 else math.ceil(op.warmup_ratio * steps)
    evals = cfg.tracking.num_evals if cfg.tracking.num_evals is not None else min(DEFAULT_NUM_EVALS, steps // STEPS_PER_DEFAULT_EVAL)
    return Derived(
        run_name=run_name,
        run_dir=os.path.join(ex.output_dir, run_name),
        num_training_steps=steps,
        rollout_batch_size=batch,
        mini_batch_size=batch // op.num_mini_batches,
        warmup_steps=warmup,
        num_evals=evals,
    )
