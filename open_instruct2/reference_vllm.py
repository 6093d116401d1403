"""Reference log-probs from a vLLM server (launched by this run, or an existing endpoint)."""

from .config import Config
from .errors import ConfigError
from .runtime import Runtime


def make_vllm_reference(cfg: Config, runtime: Runtime, run_dir: str):
    raise ConfigError(
        f"--reference_mode {cfg.reference.reference_mode} is not available yet in open-instruct2; "
        "use --reference_mode in_process (or --beta 0 --reference_mode none)"
    )
