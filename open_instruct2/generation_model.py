"""What HF rollouts and evaluation generate with: --generation_cache and --lora_generation.

A LoRA policy generates through its adapter layers: two extra small matmuls per adapted projection, ~1.9x
slower generate on an H100 than merged weights. With merged generation it samples from a plain copy of the
model whose adapted weights are W + delta (delta in fp32, the sum stored in W's dtype), refreshed lazily
after an optimizer step moved the adapters: the policy's function within one rounding of W's dtype. Frozen
tensors (embeddings, norms, un-adapted layers) are the policy's own, shared, not copied. The merged weights
are written in place, so a compiled decoding step (static cache on CUDA) stays valid across refreshes.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from .config import Config
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
    base = policy.get_base_model() if hasattr(policy, "get_base_model") else policy
    merged = {f"{name}.weight": merged_delta(m) for name, m in _adapted_layers(base)}
    out = {}
    for key, tensor in base.state_dict().items():
        if "lora_" in key:
            continue
        key = key.replace(".base_layer.", ".")
        out[key] = merged.get(key, tensor.detach())
    return out


class GenerationModel:
    """The policy itself, or (merged) a plain model sharing the policy's frozen tensors with the LoRA layers
    merged in; `static_width` is generate_rollouts' (None: dynamic cache)."""

    def __init__(self, policy: nn.Module, *, merged: bool, static_width: int | None):
        self.policy, self.merged, self.static_width = policy, merged, static_width
        self._copy: nn.Module | None = None
        self._stale = True

    def weights_changed(self) -> None:
        """An optimizer step moved the policy: refresh the merged copy before the next generation."""
        self._stale = True

    def model(self) -> nn.Module:
        if not self.merged:
            return self.policy
        if self._copy is None:
            self._copy = _plain_copy(self.policy)
        elif self._stale:
            base = self.policy.get_base_model()
            params = dict(self._copy.named_parameters(remove_duplicate=False))
            for name, module in _adapted_layers(base):
                params[f"{name}.weight"].copy_(merged_delta(module))  # in place: addresses stay (compiled graphs)
        self._stale = False
        return self._copy


@torch.no_grad()
def _plain_copy(policy) -> nn.Module:
    """A model of the base's class and config holding merged_state(policy): new tensors for the adapted
    weights, the policy's own for the rest."""
    from transformers import AutoModelForCausalLM

    base = policy.get_base_model()
    adapted = [name for name, _ in _adapted_layers(base)]
    weight = next(base.parameters())
    with torch.device(weight.device):
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
    log.info("LoRA generation: a merged copy of %d adapted layers (%.0f MB)", len(adapted),
             sum(copy.get_parameter(f"{n}.weight").nbytes for n in adapted) / 2**20)
    return copy


def free_memory(device: torch.device) -> int:
    """Bytes free on the device (CUDA: the allocator's view; CPU and MPS: the machine's available memory)."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    import psutil

    return psutil.virtual_memory().available


def merged_copy_fits(policy: nn.Module, device: torch.device) -> tuple[bool, int]:
    """(whether a merged copy takes under a quarter of the free memory, its bytes): lora_generation auto."""
    need = sum(m.base_layer.weight.nbytes for _, m in _adapted_layers(policy.get_base_model()))
    return need < free_memory(device) // 4, need


COMPILE_WORTH_STEPS = 20
"""--generation_cache auto compiles on CUDA for runs of at least this many steps: the one-time compile (~40 s
for SmolLM2-135M) pays back after a few steps of a long run, never in a smoke test."""


def make_generation_model(cfg: Config, runtime: Runtime, policy: nn.Module, longest_prompt: int, steps: int) -> GenerationModel:
    """Resolve the auto settings for this device: a static cache + compiled decoding on CUDA for runs of
    COMPILE_WORTH_STEPS or more; a merged LoRA copy when it fits in a quarter of the free memory. A static
    cache holds the run's longest prompt (training and evaluation, rounded up to a multiple of 8) plus
    response_length: one cache shape per batch size for the whole run."""
    cuda = runtime.device.type == "cuda"
    ro = cfg.rollout
    static = ro.generation_cache == "static" or (ro.generation_cache == "auto" and cuda and steps >= COMPILE_WORTH_STEPS)
    hf_generates = ro.rollout_backend == "hf" or cfg.tracking.num_evals > 0  # rollouts here, or evaluation
    merged = cfg.lora.train_mode == "lora" and ro.lora_generation == "merged"
    if cfg.lora.train_mode == "lora" and ro.lora_generation == "auto" and hf_generates:
        merged, need = merged_copy_fits(policy, runtime.device)
        if not merged:
            log.info("LoRA generation through the adapter layers: a merged copy (%.0f MB) would take over a quarter of the "
                     "free memory (--lora_generation merged forces it)", need / 2**20)
    width = -(-longest_prompt // 8) * 8 if static else None
    if hf_generates:
        cache = "dynamic KV cache" if not static else f"static KV cache ({width} prompt + {ro.response_length} response tokens)"
        if static and cuda:
            cache += ", decoding compiled (the first generation of each batch size compiles)"
        lora = ("" if cfg.lora.train_mode != "lora" else
                ", LoRA merged into a copy" if merged else ", LoRA through the adapter layers")
        log.info("HF generate: %s%s (--generation_cache %s, --lora_generation %s)", cache, lora, ro.generation_cache, ro.lora_generation)
    return GenerationModel(policy, merged=merged, static_width=width)
