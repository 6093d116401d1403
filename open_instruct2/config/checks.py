"""`validate`: every group's own value checks (in their modules), then the rules that read two or more
groups, then the inputs the flags name (data and verifier files, the judge's URL and key), then the run
folder (a writable --output_dir; an existing run folder only resumed from, with the same flags)."""

import os

from ..errors import ConfigError
from .base import require
from .core import Config, check_not_available
from .data import check_data_inputs, validate_data
from .experiment import validate_experiment, validate_memory
from .model import validate_lora, validate_model
from .optim import validate_optim
from .reference import validate_reference
from .rewards import check_reward_inputs, validate_reward
from .rollout import validate_rollout
from .tools import validate_tools
from .rubrics import validate_judge
from .runtime import validate_runtime
from .tracking import validate_tracking


def validate(cfg: Config) -> None:
    """Every range and cross-field rule; raises ConfigError with one line naming flag, value and fix.
    The order is the one of the single function this replaced, as near as groups allow: values first
    (the groups in the order their first check came), then across groups, then files and environment."""
    check_not_available(cfg)
    validate_tracking(cfg.tracking)
    validate_optim(cfg.optim)
    validate_rollout(cfg.rollout)
    validate_tools(cfg.tools)
    validate_data(cfg.data)
    validate_experiment(cfg.experiment)
    validate_memory(cfg.memory)
    validate_lora(cfg.lora)
    validate_reward(cfg.reward)
    validate_reference(cfg.reference)
    validate_runtime(cfg.runtime)
    validate_model(cfg.model)
    validate_across_groups(cfg)
    check_data_inputs(cfg.data)
    check_reward_inputs(cfg.reward)
    validate_judge(cfg.rubric)
    validate_run_folder(cfg)


def validate_across_groups(cfg: Config) -> None:
    """The rules that read two or more flag groups (each group's values already checked on their own)."""
    ro, op, data, ref = cfg.rollout, cfg.optim, cfg.data, cfg.reference
    require(not (ro.generation_linear == "packed" and ro.lora_generation == "adapters" and cfg.lora.train_mode == "lora"),
            "--generation_linear packed generates from a merged copy, --lora_generation adapters through the adapter layers; drop one of them")
    require(
        data.max_prompt_token_length + ro.response_length <= data.max_token_length,
        f"--max_token_length {data.max_token_length} < max_prompt_token_length {data.max_prompt_token_length} + response_length {ro.response_length}; raise --max_token_length or lower the others",
    )
    batch = ro.num_unique_prompts_rollout * ro.num_samples_per_prompt_rollout
    require(
        batch % op.num_mini_batches == 0,
        f"--num_mini_batches {op.num_mini_batches} does not divide the rollout batch of {batch} (num_unique_prompts_rollout x num_samples_per_prompt_rollout); pick a divisor",
    )
    require(cfg.reward.overlong_buffer_len <= ro.response_length,
            f"--overlong_buffer_len {cfg.reward.overlong_buffer_len} is longer than --response_length {ro.response_length}; lower it")
    if ref.reference_mode == "none":
        require(op.beta == 0, f"--reference_mode none needs --beta 0 (got {op.beta}); set --beta 0 or choose a reference mode")
    if ro.rollout_backend == "vllm":
        require(ro.rollout_vllm_endpoint is not None or ref.reference_mode != "launch_local_vllm" or ro.rollout_vllm_port != ref.reference_launch_port,
                f"--rollout_vllm_port {ro.rollout_vllm_port} equals --reference_launch_port: the two launched servers need different ports; change one")
        require(ro.rollout_vllm_endpoint is None or ref.reference_mode != "endpoint_vllm" or ro.rollout_vllm_endpoint.rstrip("/") != ref.reference_endpoint.rstrip("/"),
                "--rollout_vllm_endpoint equals --reference_endpoint: the rollout server's weights change every step, so it cannot also be the frozen reference; "
                "use another server for the reference, or --reference_mode in_process")


def validate_run_folder(cfg: Config) -> None:
    """--output_dir is usable; a named run folder that exists is resumed only with the same flags."""
    check_output_dir(cfg.experiment.output_dir)
    if cfg.experiment.run_name:
        run_dir = os.path.join(cfg.experiment.output_dir, cfg.experiment.run_name)
        if check_run_dir_free(run_dir, cfg.experiment.resume):
            from ..state import check_same_flags

            check_same_flags(run_dir, cfg.masked())


def check_output_dir(output_dir: str) -> None:
    """--output_dir must be a folder we can create and write in (checked before anything is loaded)."""
    path = os.path.abspath(output_dir)
    while not os.path.exists(path):
        path = os.path.dirname(path)
    require(os.path.isdir(path), f"--output_dir {output_dir!r}: {path} is a file, not a folder; choose another --output_dir")
    require(os.access(path, os.W_OK | os.X_OK), f"--output_dir {output_dir!r}: {path} is not writable; choose another --output_dir or fix its permissions")


def check_run_dir_free(run_dir: str, resume: bool = False) -> bool:
    """An existing non-empty run folder is never reused, unless it holds a resumable state and resume is on.
    Returns True when the run will resume from it."""
    from ..checkpoint import interrupted_resave, newest_state

    if os.path.exists(run_dir) and not os.path.isdir(run_dir):
        raise ConfigError(f"run folder {run_dir} is a file; choose another --run_name or move it away")
    if not (os.path.isdir(run_dir) and os.listdir(run_dir)):
        return False
    state = newest_state(run_dir) or interrupted_resave(run_dir)  # the latter is finished at start-up (remove_partial_saves)
    if state and resume:
        return True
    if state:
        raise ConfigError(f"run folder {run_dir} holds a resumable state ({state}) and --resume is false; rerun without --resume false "
                          "to continue it, or choose another --run_name")
    raise ConfigError(f"run folder {run_dir} already exists and is not empty (and holds no resumable state); choose another --run_name or move it away")
