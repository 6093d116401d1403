"""Runtime flags (device, dtype, attention kernel, threads) and their own check; resolving them is
open_instruct2/runtime.py's job."""

from typing import Literal, Optional

from .base import documented, require


@documented("runtime")
class RuntimeConfig:
    runtime_target: Literal["auto", "linux_gpu", "mac"] = "auto"
    """auto: CUDA, else MPS, else CPU. linux_gpu: CUDA or exit 2. mac: MPS, else CPU."""
    device: Optional[str] = None
    """Override the device: cpu, cuda, cuda:<index> or mps. Default: chosen by runtime_target."""
    policy_dtype: Optional[Literal["float32", "float16", "bfloat16"]] = None
    """Policy weight dtype. Default: bfloat16 on CUDA with bf16 support and on CPUs with AMX/AVX512-bf16 (much faster matmuls there), else float32. float16 is refused: its gradients underflow without loss scaling, which open-instruct2 does not do."""
    attn_implementation: Optional[Literal["flash_attention_2", "sdpa", "eager"]] = None
    """Attention kernel. Default: flash_attention_2 on CUDA when the package is installed, else sdpa."""
    num_threads: Optional[int] = None
    """CPU threads for torch. Default: every usable core (a launched vLLM server takes them too: the phases of a step never overlap)."""


def validate_runtime(rt: RuntimeConfig) -> None:
    require(rt.num_threads is None or rt.num_threads >= 1, "--num_threads must be >= 1")
