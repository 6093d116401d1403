"""Device, dtype and attention choice for runtime_target auto / linux_gpu / mac; seeding; CPU threads.

Defaults, and why:
- dtype: bfloat16 on CUDA GPUs that support it (half the memory, tensor cores). On CPU, bfloat16 only when
  the CPU has native bf16 matmul (AMX or AVX512-BF16): measured 2,570 vs 377 GFLOP/s on a Sapphire Rapids
  machine, while on an AVX2-only AMD EPYC bf16 fell to ~1 GFLOP/s against 138 for fp32
  (`python benchmarks/bench_dtype.py`). float32 everywhere else, MPS included (its bf16 coverage is partial).
- attention: flash_attention_2 on CUDA when the package is installed (it needs fp16/bf16), else sdpa.
- threads: torch takes every usable core, and so does a vLLM server launched on the same CPU
  (reference_vllm.py). The step's phases never overlap (generate and update in the trainer, scoring in the
  server, one after the other), and an idle server does not slow the trainer, so splitting the cores only
  slows both. Measured on a 2-core AVX2 machine: generation 66 tok/s with 2 threads vs 52 with 1; vLLM
  scoring 334 tok/s on 2 cores vs 187 on vLLM's default of 1 (it reserves a core).
"""

import importlib.util
import os
import platform
import random
from dataclasses import dataclass

import numpy as np
import torch

from .config import Config, RuntimeConfig, derive
from .errors import ConfigError


@dataclass(frozen=True)
class Runtime:
    """The resolved runtime of a run."""

    device: torch.device
    dtype: torch.dtype
    attn_implementation: str
    num_threads: int
    reason: str
    """One line saying why this device and dtype were chosen."""

    def describe(self) -> dict:
        return {
            "device": str(self.device),
            "dtype": str(self.dtype).replace("torch.", ""),
            "attn_implementation": self.attn_implementation,
            "num_threads": self.num_threads,
            "reason": self.reason,
        }


def cuda_available() -> bool:
    return torch.cuda.is_available()


def mps_available() -> bool:
    return bool(getattr(torch.backends, "mps", None)) and torch.backends.mps.is_available()


def cpu_has_native_bf16() -> bool:
    """True when the CPU multiplies bf16 in hardware (Intel AMX or AVX512-BF16)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    return bool(flags & {"amx_bf16", "avx512_bf16"})
    except OSError:
        pass
    return False


def usable_cores() -> int:
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return max(1, os.cpu_count() or 1)


DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def _pick_device(cfg: RuntimeConfig) -> tuple[torch.device, str]:
    target = cfg.runtime_target
    if target == "linux_gpu" and not cuda_available():
        raise ConfigError(
            "--runtime_target linux_gpu needs CUDA, but torch sees no CUDA GPU; use --runtime_target auto (or mac) to run on this machine"
        )
    if cfg.device is not None:
        device = _parse_device(cfg.device)
        if target == "linux_gpu" and device.type != "cuda":
            raise ConfigError(f"--device {cfg.device} contradicts --runtime_target linux_gpu; use a cuda device or another target")
        return device, f"--device {cfg.device}"
    if target == "linux_gpu":
        return torch.device("cuda"), "linux_gpu: CUDA"
    if target == "mac":
        if mps_available():
            return torch.device("mps"), "mac: MPS available"
        return torch.device("cpu"), "mac: MPS not available, CPU"
    if cuda_available():
        return torch.device("cuda"), "auto: CUDA available"
    if mps_available():
        return torch.device("mps"), "auto: no CUDA, MPS available"
    return torch.device("cpu"), "auto: no CUDA or MPS, CPU"


def _parse_device(text: str) -> torch.device:
    try:
        device = torch.device(text)
    except RuntimeError:
        raise ConfigError(f"--device {text!r} is not a device; use cpu, cuda, cuda:<index> or mps") from None
    if device.type not in ("cpu", "cuda", "mps"):
        raise ConfigError(f"--device {text!r}: only cpu, cuda, cuda:<index> and mps are supported")
    if device.type == "cuda":
        if not cuda_available():
            raise ConfigError(f"--device {text} but torch sees no CUDA GPU; use --device cpu or leave --device out")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ConfigError(f"--device {text}: only {torch.cuda.device_count()} CUDA device(s) visible")
    if device.type == "mps" and not mps_available():
        raise ConfigError(f"--device {text} but MPS is not available; use --device cpu or leave --device out")
    return device


def _pick_dtype(cfg: RuntimeConfig, device: torch.device) -> tuple[torch.dtype, str]:
    if cfg.policy_dtype is not None:
        dtype = DTYPES[cfg.policy_dtype]
        if dtype == torch.float16:
            raise ConfigError(
                "--policy_dtype float16 is not supported: fp16 gradients underflow without loss scaling, which open-instruct2 "
                "does not do; use bfloat16, or float32 where bf16 is missing"
            )
        if device.type == "cuda" and dtype == torch.bfloat16 and not torch.cuda.is_bf16_supported():
            raise ConfigError("--policy_dtype bfloat16: this GPU has no bf16 support; use float32")
        return dtype, f"--policy_dtype {cfg.policy_dtype}"
    if device.type == "cuda":
        if torch.cuda.is_bf16_supported():
            return torch.bfloat16, "bf16: supported by this GPU"
        return torch.float32, "float32: this GPU has no bf16"
    if device.type == "cpu" and cpu_has_native_bf16():
        return torch.bfloat16, "bf16: CPU has AMX/AVX512-BF16"
    return torch.float32, f"float32: no native bf16 on {device.type}"


def flash_attention_installed() -> bool:
    return importlib.util.find_spec("flash_attn") is not None


def _pick_attention(cfg: RuntimeConfig, device: torch.device, dtype: torch.dtype) -> str:
    if cfg.attn_implementation is not None:
        if cfg.attn_implementation == "flash_attention_2":
            if device.type != "cuda":
                raise ConfigError(f"--attn_implementation flash_attention_2 needs CUDA, device is {device}; use sdpa")
            if not flash_attention_installed():
                raise ConfigError("--attn_implementation flash_attention_2: flash_attn is not installed; pip install flash-attn, or use sdpa")
            if dtype == torch.float32:
                raise ConfigError("--attn_implementation flash_attention_2 needs --policy_dtype bfloat16 or float16")
        return cfg.attn_implementation
    if device.type == "cuda" and dtype != torch.float32 and flash_attention_installed():
        return "flash_attention_2"
    return "sdpa"


def resolve_runtime(cfg: RuntimeConfig) -> Runtime:
    """Choose device, dtype, attention and thread count. Raises ConfigError on an impossible request."""
    device, why_device = _pick_device(cfg)
    dtype, why_dtype = _pick_dtype(cfg, device)
    attn = _pick_attention(cfg, device, dtype)
    threads = cfg.num_threads or usable_cores()
    return Runtime(device, dtype, attn, threads, f"{why_device}; {why_dtype} ({platform.machine()})")


def apply_runtime(runtime: Runtime, seed: int) -> None:
    """Side effects of a resolved runtime: thread count and seeds."""
    torch.set_num_threads(runtime.num_threads)
    seed_everything(seed)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def resolved_summary(cfg: Config) -> dict:
    """Runtime, derived numbers and every flag (secrets masked): printed by --dry_run, saved in the run
    folder, logged once."""
    from dataclasses import asdict

    runtime = resolve_runtime(cfg.runtime)
    return {"runtime": runtime.describe(), "derived": asdict(derive(cfg)), "flags": cfg.masked()}
