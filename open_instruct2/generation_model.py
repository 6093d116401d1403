"""What HF rollouts and evaluation generate with: --generation_cache and --lora_generation.

A LoRA policy generates through its adapter layers: two extra small matmuls per adapted projection, ~1.9x
slower generate on an H100 than merged weights. With merged generation it samples from a plain copy of the
model whose adapted weights are W + delta (delta in fp32, the sum stored in W's dtype), refreshed lazily
after an optimizer step moved the adapters: the policy's function within one rounding of W's dtype. Frozen
tensors (embeddings, norms, un-adapted layers) are the policy's own, shared, not copied. The merged weights
are written in place, so a compiled decoding step (static cache on CUDA) stays valid across refreshes.

On an x86 CPU the generation copy can also hold every linear layer's weight pre-packed in oneDNN's blocked layout
(--generation_linear packed): a plain bf16 `F.linear` on a CPU re-lays-out the weight on every call, which at the
few rows of a decoding step costs as much as the product (31 -> 22 ms of matmuls per token step for the 211
weights of SmolLM2-135M; generation 18% faster in `make bench`; BENCHMARKS.md). Packing is exact in bf16 (the
same sums) and repeated after each optimizer step (~0.1 s for 135M parameters); the copy costs one packed copy of
the linear weights. At fp32 it measured no faster (auto leaves it off).
"""

from __future__ import annotations

import functools
import logging

import torch
from torch import nn

from .config import Config, derive
from .errors import UserError
from .runtime import Runtime

log = logging.getLogger(__name__)


def _adapted_layers(base: nn.Module):
    """(name, LoRA layer) of every adapted layer of a PEFT model's base model."""
    return [(name, m) for name, m in base.named_modules() if hasattr(m, "get_delta_weight") and hasattr(m, "base_layer")]


@torch.no_grad()
def merged_delta(module) -> torch.Tensor:
    """W + delta of one LoRA layer, computed in fp32 and returned in W's dtype (the layer is not changed)."""
    weight = module.base_layer.weight
    delta = sum(module.get_delta_weight(a).float() for a in module.active_adapters if a in module.lora_A)
    return (weight.float() + delta).to(weight.dtype)


def merged_state(policy) -> dict[str, torch.Tensor]:
    """The policy's weights under the base model's names (a PEFT model's LoRA layers merged into new tensors,
    every other entry the policy's own tensor, detached). Tied weights appear under each of their names."""
    base = _base(policy)
    merged = {f"{name}.weight": merged_delta(m) for name, m in _adapted_layers(base)}
    out = {}
    for key, tensor in base.state_dict().items():
        if "lora_" in key:
            continue
        key = key.replace(".base_layer.", ".")
        out[key] = merged.get(key, tensor.detach())
    return out


PACK_ROWS_HINT = 8
"""The row count oneDNN is told to pack for (a decoding step's batch); any row count computes the same."""


@functools.lru_cache(maxsize=4)
def packing_available(dtype: torch.dtype = torch.float32) -> bool:
    """Whether this torch can pre-pack linear weights of `dtype` for oneDNN on this CPU: x86 builds with mkldnn,
    and for bf16 a CPU with the instructions oneDNN's bf16 path needs (AVX512-BW/VL/DQ or AVX-NE-CONVERT; an
    AVX2-only CPU refuses it), found out by packing one small weight."""
    import platform

    if not (platform.machine().lower() in ("x86_64", "amd64") and torch.backends.mkldnn.is_available()
            and hasattr(torch.ops.mkldnn, "_reorder_linear_weight") and hasattr(torch.ops.mkldnn, "_linear_pointwise")):
        return False
    try:
        torch.ops.mkldnn._reorder_linear_weight(torch.zeros(16, 16, dtype=dtype), PACK_ROWS_HINT)
    except RuntimeError:
        return False
    return True


class PackedLinear(nn.Module):
    """A linear layer for generation only (no gradients): its weight held pre-packed for oneDNN.
    `source` is the dense weight it follows (shared with the policy), or None when the caller repacks it
    from a tensor it computes (a merged LoRA weight, not kept)."""

    def __init__(self, linear: nn.Linear, source: torch.Tensor | None):
        super().__init__()
        self.bias = linear.bias
        self.source = source
        self.pack(linear.weight)

    @torch.no_grad()
    def pack(self, weight: torch.Tensor) -> None:
        self.packed = torch.ops.mkldnn._reorder_linear_weight(weight.detach(), PACK_ROWS_HINT)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.mkldnn._linear_pointwise(x, self.packed, self.bias, "none", [None], "")


def _pack_linears(copy: nn.Module, adapted: set[str]) -> list[tuple[str, PackedLinear]]:
    """Replace every nn.Linear of `copy` by a PackedLinear (adapted LoRA layers keep no dense source)."""
    packed = []
    for name, module in list(copy.named_modules()):
        if type(module) is nn.Linear:
            parent, _, child = name.rpartition(".")
            layer = PackedLinear(module, None if name in adapted else module.weight.detach())
            setattr(copy.get_submodule(parent) if parent else copy, child, layer)
            packed.append((name, layer))
    return packed


class GenerationModel:
    """The policy itself, or a plain model sharing the policy's frozen tensors: with the LoRA layers merged in
    (`merged`), with its linear weights pre-packed for a CPU (`packed`), or both; `static_width` is
    generate_rollouts' (None: dynamic cache)."""

    def __init__(self, policy: nn.Module, *, merged: bool, static_width: int | None, packed: bool = False):
        self.policy, self.merged, self.static_width, self.packed = policy, merged, static_width, packed
        self._copy: nn.Module | None = None
        self._packed_layers: list[tuple[str, PackedLinear]] = []
        self._stale = True

    def weights_changed(self) -> None:
        """An optimizer step moved the policy: refresh the copy (merged and/or packed) before the next generation."""
        self._stale = True

    def model(self) -> nn.Module:
        if not (self.merged or self.packed):
            return self.policy
        if self._copy is not None and not self._stale:
            return self._copy
        adapted = dict(_adapted_layers(_base(self.policy)))
        if self._copy is None:
            self._copy = _plain_copy(self.policy)
            if self.packed:
                self._packed_layers = _pack_linears(self._copy, set(adapted))
                log.info("generation copy: %d linear layers packed for oneDNN (%.0f MB)%s", len(self._packed_layers),
                         copy_bytes(self.policy, packed=True) / 2**20, f", {len(adapted)} with LoRA merged in" if adapted else "")
            else:
                log.info("LoRA generation: a merged copy of %d adapted layers (%.0f MB)", len(adapted),
                         copy_bytes(self.policy, packed=False) / 2**20)
        elif self.packed:
            for name, layer in self._packed_layers:
                if name in adapted:
                    layer.pack(merged_delta(adapted[name]))
                elif not adapted:  # full fine-tuning: every weight may have moved (LoRA's frozen ones have not)
                    layer.pack(layer.source)
        else:
            params = dict(self._copy.named_parameters(remove_duplicate=False))
            for name, module in adapted.items():
                params[f"{name}.weight"].copy_(merged_delta(module))  # in place: addresses stay (compiled graphs)
        self._stale = False
        return self._copy


def _base(policy: nn.Module) -> nn.Module:
    """A PEFT model's base model; any other model itself."""
    return policy.get_base_model() if hasattr(policy, "get_base_model") else policy


@torch.no_grad()
def _plain_copy(policy) -> nn.Module:
    """A model of the base's class and config holding merged_state(policy): new tensors for the adapted
    weights, the policy's own for the rest (all of them for a model without adapters)."""
    from transformers import AutoModelForCausalLM

    base = _base(policy)
    weight = next(base.parameters())
    # The random initialisation (replaced at once) must not draw from the run's generators: the samples of a run,
    # and of a resumed one, would depend on when the copy was built. MPS's generator is not guarded here.
    cuda = [weight.device.index or 0] if weight.device.type == "cuda" else []
    with torch.device(weight.device), torch.random.fork_rng(devices=cuda):
        copy = AutoModelForCausalLM.from_config(base.config, dtype=base.dtype, attn_implementation=base.config._attn_implementation)
    state = merged_state(policy)
    missing, unexpected = copy.load_state_dict(state, strict=False, assign=True)
    copy.tie_weights()
    tied = {k for k in missing if copy.get_parameter(k).data_ptr() == copy.get_input_embeddings().weight.data_ptr()}
    if set(missing) - tied or unexpected:
        raise RuntimeError(f"merged copy of the policy: missing {sorted(set(missing) - tied)}, unexpected {sorted(unexpected)}")
    copy.generation_config = base.generation_config
    copy.requires_grad_(False)
    copy.eval()
    return copy


def free_memory(device: torch.device) -> int:
    """Bytes free on the device (CUDA: the allocator's view; CPU and MPS: the machine's available memory)."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    import psutil

    return psutil.virtual_memory().available


def copy_bytes(policy: nn.Module, packed: bool) -> int:
    """Bytes of the generation copy's own tensors: the adapted LoRA weights (merged), or every linear weight
    (packed: the frozen ones are packed too)."""
    base = _base(policy)
    if not packed:
        return sum(m.base_layer.weight.nbytes for _, m in _adapted_layers(base))
    return sum(m.weight.nbytes for name, m in base.named_modules() if type(m) is nn.Linear and ".lora_" not in name)


COMPILE_WORTH_STEPS = 20
"""--generation_cache auto compiles on CUDA for runs of at least this many steps: the one-time compile (~40 s
for SmolLM2-135M) pays back after a few steps of a long run, never in a smoke test."""


def make_generation_model(cfg: Config, runtime: Runtime, policy: nn.Module, longest_prompt: int, steps: int) -> GenerationModel:
    """Resolve the auto settings for this device: a static cache + compiled decoding on CUDA for runs of
    COMPILE_WORTH_STEPS or more; on an x86 CPU at bf16, linear weights pre-packed for oneDNN (LoRA merged into them); a
    merged LoRA copy elsewhere. auto makes a copy only when it takes under a quarter of the free memory. A static
    cache holds the run's longest prompt (training and evaluation, rounded up to a multiple of 8) plus
    response_length: one cache shape per batch size for the whole run."""
    cuda, cpu = runtime.device.type == "cuda", runtime.device.type == "cpu"
    ro, lora = cfg.rollout, cfg.lora.train_mode == "lora"
    static = ro.generation_cache == "static" or (ro.generation_cache == "auto" and cuda and steps >= COMPILE_WORTH_STEPS)
    hf_generates = ro.rollout_backend == "hf" or derive(cfg).num_evals > 0  # rollouts here, or evaluation
    can_pack = cpu and packing_available(runtime.dtype)
    if ro.generation_linear == "packed" and not can_pack:
        why = runtime.device.type if not cpu else f"a CPU whose oneDNN cannot pack {str(runtime.dtype).removeprefix('torch.')} weights"
        raise UserError(f"--generation_linear packed needs an x86 CPU with oneDNN (for bf16: AVX512 or AMX), and this run generates on {why}; "
                        "use --generation_linear auto or plain")
    packed = ro.generation_linear == "packed"
    bf16 = runtime.dtype == torch.bfloat16  # fp32 measured no faster packed (its weights' reads dominate), +0.5 GB
    if ro.generation_linear == "auto" and hf_generates and can_pack and bf16 and not (lora and ro.lora_generation == "adapters"):
        packed = _copy_fits(policy, runtime.device, True, "linear weights not pre-packed", "--generation_linear packed")
    merged = lora and (packed or ro.lora_generation == "merged")
    if lora and not packed and ro.lora_generation == "auto" and hf_generates:
        merged = _copy_fits(policy, runtime.device, False, "LoRA generation through the adapter layers", "--lora_generation merged")
    width = -(-longest_prompt // 8) * 8 if static else None
    if hf_generates:
        cache = "dynamic KV cache" if not static else f"static KV cache ({width} prompt + {ro.response_length} response tokens)"
        if static and cuda:
            cache += ", decoding compiled (the first generation of each batch size compiles)"
        lora_text = "" if not lora else ", LoRA merged into a copy" if merged else ", LoRA through the adapter layers"
        log.info("HF generate: %s%s%s (--generation_cache %s, --lora_generation %s, --generation_linear %s)", cache, lora_text,
                 ", linear weights pre-packed for oneDNN" if packed else "", ro.generation_cache, ro.lora_generation, ro.generation_linear)
    return GenerationModel(policy, merged=merged, static_width=width, packed=packed)


def _copy_fits(policy: nn.Module, device: torch.device, packed: bool, otherwise: str, force: str) -> bool:
    """An auto rule: whether the generation copy takes under a quarter of the free memory (logs why not)."""
    need = copy_bytes(policy, packed)
    if need < free_memory(device) // 4:
        return True
    log.info("%s: the %s copy (%.0f MB) would take over a quarter of the free memory (%s forces it)",
             otherwise, "packed" if packed else "merged", need / 2**20, force)
    return False
