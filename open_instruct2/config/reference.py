"""Reference flags (where the KL term's log-probs come from: a launched vLLM server, an endpoint, the
policy process, or none) and the checks that read only them. Ports and endpoints shared with the
rollout server, and beta with no reference: checks.py."""

from typing import Literal, Optional

from .base import documented, require, require_positive, require_url


@documented("reference")
class ReferenceConfig:
    reference_mode: Literal["launch_local_vllm", "endpoint_vllm", "in_process", "none"] = "launch_local_vllm"
    """Where reference log-probs for the KL term come from: a vLLM server this run launches, a running vLLM endpoint, the policy process itself (LoRA: adapters disabled; full: a frozen copy), or none (needs beta 0)."""
    reference_endpoint: str = "http://127.0.0.1:8000"
    """Base URL of the vLLM server for endpoint_vllm."""
    reference_api_key: Optional[str] = None
    """API key of the vLLM server (passed to a launched server through its environment, never its command line). Also read from OPEN_INSTRUCT2_REFERENCE_API_KEY."""
    reference_model_name_or_path: Optional[str] = None
    """Reference model; default: the policy's starting model."""
    reference_served_model_name: Optional[str] = None
    """Model name the endpoint serves; default: discovered from /v1/models."""
    reference_launch_host: str = "127.0.0.1"
    """Host the launched server binds."""
    reference_launch_port: int = 8000
    """Port the launched server binds."""
    reference_launch_dtype: str = "auto"
    """dtype of the launched server; auto = float32 on CPU (bf16 reference scores are off by up to 0.16), else the server's default."""
    reference_launch_gpu_memory_utilization: Optional[float] = None
    """Fraction of GPU memory the launched server may take (GPU only). Default: sized from the model (2 x its weights + 2 GiB, at least 0.1), so the policy's training state fits beside it; the original's 0.9 left too little."""
    reference_launch_tensor_parallel_size: int = 1
    """Tensor-parallel GPUs for the launched server."""
    reference_launch_max_model_len: Optional[int] = None
    """Context length of the launched server; default max_token_length."""
    reference_launch_extra_args: Optional[str] = None
    """Extra command-line arguments for the launched server, as one shell-quoted string."""
    reference_startup_timeout_s: float = 240.0
    """Seconds to wait for the launched server's /health."""
    reference_timeout_s: float = 120.0
    """Seconds before one scoring request times out."""
    reference_max_retries: int = 3
    """Retries of a scoring request on connection errors and 5xx, with backoff."""


def validate_reference(ref: ReferenceConfig) -> None:
    require_positive(ref, "reference_startup_timeout_s", "reference_timeout_s")
    if ref.reference_mode == "endpoint_vllm":
        require_url("reference_endpoint", ref.reference_endpoint)
    require(1 <= ref.reference_launch_port <= 65535, f"--reference_launch_port must be in 1..65535, got {ref.reference_launch_port}")
    require(
        ref.reference_launch_gpu_memory_utilization is None or 0 < ref.reference_launch_gpu_memory_utilization <= 1,
        "--reference_launch_gpu_memory_utilization must be in (0, 1]; leave it out to size it from the model",
    )
    require(ref.reference_launch_tensor_parallel_size >= 1, "--reference_launch_tensor_parallel_size must be >= 1")
    require(ref.reference_max_retries >= 0, f"--reference_max_retries must be >= 0, got {ref.reference_max_retries}")
    require(
        ref.reference_launch_dtype in ("auto", "float32", "float16", "bfloat16", "half", "float"),
        f"--reference_launch_dtype {ref.reference_launch_dtype!r}: use auto, float32, float16 or bfloat16",
    )
