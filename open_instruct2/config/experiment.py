"""Flags of the experiment (name, seed, output folder, smoke test, dry run, resume) and of memory
profiling, with their own checks. The run folder's checks read several groups: checks.py."""

from typing import Literal, Optional

from .base import documented, require_positive


@documented("experiment")
class ExperimentConfig:
    exp_name: str = "grpo_single_process"
    """Experiment name; the first part of the derived run name."""
    seed: int = 1
    """Seed for Python, NumPy and torch (sampling, data order, LoRA init)."""
    output_dir: str = "output_open_instruct2"
    """Folder that holds one sub-folder per run."""
    run_name: Optional[str] = None
    """Run folder name under output_dir; default <exp_name>__<seed>__<unix time>. An existing non-empty folder is refused."""
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    """Console log level."""
    smoke_test: bool = False
    """Tiny end-to-end run: 1 prompt x 2 samples, response_length <= 64, prompts <= 256 tokens, smoke_test_steps steps, no tracking or checkpoints, at most one evaluation of 8 prompts; groups with equal rewards are kept, so the update path (and the KL) runs even when every answer is wrong."""
    smoke_test_steps: int = 2
    """Training steps of a smoke test (>= 1)."""
    dry_run: bool = False
    """Parse and validate all flags, resolve the runtime, print the resolved configuration (secrets masked) and exit 0, loading no model, data or server."""
    resume: bool = True
    """If the run folder (output_dir/run_name) holds a resumable state (--checkpoint_state_freq), continue from the newest one: rerun the same command. false: refuse any non-empty run folder. New."""


@documented("memory profiling")
class MemoryProfileConfig:
    enable_memory_profile: bool = False
    """Sample RAM (this process and its children, e.g. the vLLM server) in a background thread; see README_memory_profiling.md."""
    memory_profile_interval_s: float = 1.0
    """Seconds between memory samples."""
    memory_profile_top_n_children: int = 8
    """How many of the largest child processes each sample lists."""
    memory_profile_mark_steps: bool = True
    """Record a marker at each training step so memory can be matched to the phases of a step."""
    memory_profile_step_interval: int = 1
    """Mark every N-th training step."""
    memory_profile_enable_tracemalloc: bool = False
    """Also record the top Python allocation sites (tracemalloc; slows the run)."""


def validate_experiment(ex: ExperimentConfig) -> None:
    require_positive(ex, "smoke_test_steps")


def validate_memory(mem: MemoryProfileConfig) -> None:
    require_positive(mem, "memory_profile_interval_s", "memory_profile_top_n_children", "memory_profile_step_interval")
