"""Every flag, as grouped dataclasses with a docstring under each field (printed by `--help`).

One module per flag group holds its dataclass and the checks that read only that group:
experiment.py (experiment, memory profiling), runtime.py, model.py (model, training mode), data.py,
rollout.py, optim.py, rewards.py, rubrics.py (rubrics and the judge), reference.py, tracking.py (eval,
checkpoints and tracking). base.py has the `documented` decorator and `require`; core.py has `Config`,
`GROUPS`, defaults, the smoke-test overrides and `derive`; checks.py has `validate`: each group's value
checks, then the rules across groups, then the files and environment the flags name, then the run
folder. Every check raises ConfigError naming the flag, the value and the fix. Flag names and defaults
follow the original open-instruct2 (../shared/ORIGINAL_FLAGS.md); deliberate differences are said in the
field's docstring. Import from `open_instruct2.config`; the modules are an arrangement, not an interface.
"""

from ..errors import ConfigError
from .base import BUILTIN_MODEL, SECRET_FIELDS, _require, documented, require
from .checks import check_output_dir, check_run_dir_free, validate, validate_across_groups, validate_run_folder
from .core import GROUPS, NOT_AVAILABLE_YET, Config, Derived, apply_smoke_test, check_not_available, default_config, derive, group_of
from .data import LOCAL_SUFFIXES, DataConfig, check_data_inputs, parse_mixer, validate_data
from .experiment import ExperimentConfig, MemoryProfileConfig, validate_experiment, validate_memory
from .model import LoraConfig, ModelConfig, chat_template_kwargs, validate_lora, validate_model
from .optim import OptimConfig, validate_optim
from .reference import ReferenceConfig, validate_reference
from .rewards import RewardConfig, check_reward_inputs, validate_reward
from .rollout import RolloutConfig, validate_rollout
from .rubrics import RUBRIC_SWITCHES, RubricConfig, judge_wanted, validate_judge
from .runtime import RuntimeConfig, validate_runtime
from .tools import BUILTIN_TOOLS, ToolsConfig, tools_wanted, validate_tools
from .tracking import (
    DEFAULT_NUM_EVALS,
    EVAL_SAMPLES_CPU,
    EVAL_SAMPLES_GPU,
    STEPS_PER_DEFAULT_EVAL,
    TrackingConfig,
    eval_max_samples,
    validate_tracking,
)

__all__ = [
    "BUILTIN_MODEL", "DEFAULT_NUM_EVALS", "EVAL_SAMPLES_CPU", "EVAL_SAMPLES_GPU", "GROUPS", "NOT_AVAILABLE_YET", "RUBRIC_SWITCHES",
    "SECRET_FIELDS", "STEPS_PER_DEFAULT_EVAL", "Config", "ConfigError", "DataConfig", "Derived", "ExperimentConfig", "LoraConfig",
    "MemoryProfileConfig", "ModelConfig", "OptimConfig", "ReferenceConfig", "RewardConfig", "RolloutConfig", "RubricConfig",
    "RuntimeConfig", "ToolsConfig", "BUILTIN_TOOLS", "tools_wanted", "validate_tools", "TrackingConfig", "apply_smoke_test", "chat_template_kwargs", "check_data_inputs", "check_not_available", "check_output_dir",
    "LOCAL_SUFFIXES", "check_reward_inputs", "check_run_dir_free", "default_config", "derive", "documented", "eval_max_samples", "group_of", "judge_wanted", "parse_mixer",
    "require", "validate", "validate_across_groups", "validate_data", "validate_experiment", "validate_judge", "validate_lora",
    "validate_memory", "validate_model", "validate_optim", "validate_reference", "validate_reward", "validate_rollout",
    "validate_run_folder", "validate_runtime", "validate_tracking",
]
