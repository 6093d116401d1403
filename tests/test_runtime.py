"""Runtime selection with CUDA / MPS availability patched, dtype and attention defaults, threads, seeding."""

import pytest
import torch

from open_instruct2 import runtime as rt
from open_instruct2.config import RuntimeConfig
from open_instruct2.errors import ConfigError


@pytest.fixture
def machine(monkeypatch):
    """Pretend to be a machine with the given accelerators."""

    def set_machine(cuda=False, mps=False, bf16_gpu=True, bf16_cpu=False, flash=False):
        monkeypatch.setattr(rt, "cuda_available", lambda: cuda)
        monkeypatch.setattr(rt, "mps_available", lambda: mps)
        monkeypatch.setattr(rt, "cpu_has_native_bf16", lambda: bf16_cpu)
        monkeypatch.setattr(rt, "flash_attention_installed", lambda: flash)
        monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: bf16_gpu)
        monkeypatch.setattr(torch.cuda, "device_count", lambda: 1 if cuda else 0)

    return set_machine


def resolve(**flags):
    return rt.resolve_runtime(RuntimeConfig(**flags))


@pytest.mark.parametrize(
    "cuda,mps,expected",
    [(True, True, "cuda"), (True, False, "cuda"), (False, True, "mps"), (False, False, "cpu")],
)
def test_auto_prefers_cuda_then_mps_then_cpu(machine, cuda, mps, expected):
    machine(cuda=cuda, mps=mps)
    assert resolve(runtime_target="auto").device.type == expected


@pytest.mark.parametrize("mps,expected", [(True, "mps"), (False, "cpu")])
def test_mac_uses_mps_else_cpu(machine, mps, expected):
    machine(cuda=True, mps=mps)  # mac never picks CUDA
    assert resolve(runtime_target="mac").device.type == expected


def test_linux_gpu_without_cuda_is_a_clear_error(machine):
    machine(cuda=False, mps=True)
    with pytest.raises(ConfigError, match="linux_gpu needs CUDA"):
        resolve(runtime_target="linux_gpu")


def test_linux_gpu_with_cuda(machine):
    machine(cuda=True, flash=True)
    r = resolve(runtime_target="linux_gpu")
    assert (r.device.type, r.dtype, r.attn_implementation) == ("cuda", torch.bfloat16, "flash_attention_2")


def test_dtype_defaults(machine):
    machine(cuda=True, bf16_gpu=False)
    assert resolve().dtype == torch.float32  # an old GPU without bf16: fp32, not fp16 (no loss scaler here)
    assert resolve().attn_implementation == "sdpa"
    machine(cuda=False, bf16_cpu=True)
    assert resolve().dtype == torch.bfloat16  # AMX / AVX512-BF16 CPU
    machine(cuda=False, bf16_cpu=False)
    assert resolve().dtype == torch.float32  # AVX2-only CPU: bf16 is emulated and ~100x slower
    machine(cuda=False, mps=True)
    assert resolve().dtype == torch.float32


def test_overrides(machine):
    machine(cuda=False)
    r = resolve(device="cpu", policy_dtype="bfloat16", attn_implementation="eager", num_threads=1)
    assert (r.device.type, r.dtype, r.attn_implementation, r.num_threads) == ("cpu", torch.bfloat16, "eager", 1)
    with pytest.raises(ConfigError, match="float16 is not supported: fp16 gradients underflow without loss scaling"):
        resolve(policy_dtype="float16")
    with pytest.raises(ConfigError, match="no CUDA"):
        resolve(device="cuda")
    with pytest.raises(ConfigError, match="MPS is not available"):
        resolve(device="mps")
    with pytest.raises(ConfigError, match="not a device|only cpu"):
        resolve(device="gpu0")
    machine(cuda=True)
    with pytest.raises(ConfigError, match="flash_attn is not installed"):
        resolve(attn_implementation="flash_attention_2")
    with pytest.raises(ConfigError, match="contradicts"):
        resolve(runtime_target="linux_gpu", device="cpu")


def test_threads_default_to_every_usable_core(machine, monkeypatch):
    machine()
    monkeypatch.setattr(rt, "usable_cores", lambda: 8)
    assert rt.resolve_runtime(RuntimeConfig()).num_threads == 8
    assert rt.resolve_runtime(RuntimeConfig(num_threads=3)).num_threads == 3


def test_seeding_repeats_random_draws():
    rt.seed_everything(7)
    a = torch.rand(3)
    rt.seed_everything(7)
    assert torch.equal(a, torch.rand(3))
