"""The policy model: loading (full or LoRA), per-token log-probs, and fp32 master weights.

Sequence layout used everywhere (the layout `generate` returns):
    [left padding | prompt | response | right padding]  with the response starting at column P.
Log-probs pass explicit position ids from the attention mask, so left padding does not shift positions,
and compute logits only for the response columns (the prompt's logits are never materialised).
Log-probs are taken at temperature 1 (raw logits), on the policy and reference sides alike.
"""

import logging

import torch
from torch import nn

from .bootstrap import resolve_model_path
from .config import Config
from .errors import UserError
from .runtime import Runtime

log = logging.getLogger(__name__)

# Linear projections of llama / qwen / mistral style blocks: the default LoRA targets.
DEFAULT_LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def load_tokenizer(cfg: Config):
    from transformers import AutoTokenizer

    m = cfg.model
    name = resolve_model_path(m.tokenizer_name_or_path or m.model_name_or_path)
    revision = m.tokenizer_revision or (m.model_revision if m.tokenizer_name_or_path is None else None)
    try:
        tokenizer = AutoTokenizer.from_pretrained(
            name, revision=revision, trust_remote_code=m.trust_remote_code, use_fast=m.use_fast_tokenizer
        )
    except OSError as e:
        raise UserError(f"cannot load tokenizer {name!r}: {str(e).splitlines()[0][:300]}; check --model_name_or_path / --tokenizer_name_or_path") from None
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token  # masks never rely on the pad id (pad may equal eos)
    tokenizer.padding_side = "left"
    return tokenizer


def load_model(name_or_path: str, cfg: Config, runtime: Runtime, trainable: bool = True) -> nn.Module:
    from transformers import AutoModelForCausalLM

    m = cfg.model
    path = resolve_model_path(name_or_path)
    try:
        model = AutoModelForCausalLM.from_pretrained(
            path,
            revision=None if path != name_or_path else m.model_revision,
            dtype=runtime.dtype,
            attn_implementation=runtime.attn_implementation,
            trust_remote_code=m.trust_remote_code,
        )
    except OSError as e:
        raise UserError(f"cannot load model {name_or_path!r}: {str(e).splitlines()[0][:300]}; check --model_name_or_path") from None
    model.to(runtime.device)
    model.config.use_cache = False  # training forwards; generate turns the cache on for itself
    if not trainable:
        model.eval().requires_grad_(False)
    return model


def load_policy(cfg: Config, runtime: Runtime) -> nn.Module:
    """The trainable policy: the full model, or the model wrapped with LoRA adapters (only they train)."""
    model = load_model(cfg.model.model_name_or_path, cfg, runtime)
    if cfg.model.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if cfg.lora.train_mode == "lora":
        from peft import LoraConfig, get_peft_model

        targets = cfg.lora.lora_target_modules or [t for t in DEFAULT_LORA_TARGETS if _has_module(model, t)]
        if not targets or not all(_has_module(model, t) for t in targets):
            missing = [t for t in targets if not _has_module(model, t)]
            raise UserError(f"--lora_target_modules {missing or targets} not found in the model; name its linear layers, e.g. q_proj v_proj")
        lora = LoraConfig(
            r=cfg.lora.lora_r,
            lora_alpha=cfg.lora.lora_alpha,
            lora_dropout=cfg.lora.lora_dropout,
            target_modules=targets,
            task_type="CAUSAL_LM",
        )
        # autocast_adapter_dtype keeps adapter weights in fp32 over a bf16 base: exact small updates.
        model = get_peft_model(model, lora, autocast_adapter_dtype=True)
    model.train()
    return model


def _has_module(model: nn.Module, suffix: str) -> bool:
    return any(name.split(".")[-1] == suffix for name, _ in model.named_modules())


def trainable_parameters(model: nn.Module) -> list[nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def position_ids_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """(B, L) -> (B, L): 0, 1, 2, ... from each sequence's first real token; padding gets 0."""
    return (attention_mask.long().cumsum(dim=1) - 1).clamp(min=0)


def response_logprobs(
    model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor, prompt_width: int
) -> torch.Tensor:
    """Log-prob of each response token under `model`, at temperature 1.

    input_ids, attention_mask: (B, L) in the layout above; the response occupies columns
    prompt_width .. L-1. Returns (B, L - prompt_width): entry t is log p(input_ids[:, P + t] | prefix).
    Padding columns get finite garbage: callers multiply by the response mask.
    """
    response_width = input_ids.shape[1] - prompt_width
    out = model(
        input_ids=input_ids,
        attention_mask=attention_mask,
        position_ids=position_ids_from_mask(attention_mask),
        logits_to_keep=response_width + 1,  # logits at columns P-1 .. L-1
        use_cache=False,
    )
    logits = out.logits[:, :-1, :].float()  # (B, T, V): column P-1+t predicts token P+t
    targets = input_ids[:, prompt_width:]  # (B, T)
    token_logits = logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1)  # (B, T)
    return token_logits - torch.logsumexp(logits, dim=-1)  # (B, T)


class MasterWeights:
    """fp32 copies of low-precision trainable parameters, so that small AdamW updates are not rounded
    away in bf16 (a 2e-5 step on a weight of 0.02 is below bf16's 2^-8 relative precision).

    The optimizer steps the fp32 copies; after each step they are copied back into the model.
    Parameters that are fp32 already are stepped directly (no copy).
    """

    def __init__(self, params: list[nn.Parameter]):
        self.pairs = [(p, p.detach().float().clone()) for p in params if p.dtype != torch.float32]
        for _, master in self.pairs:
            master.requires_grad_(True)
        low = {id(p) for p, _ in self.pairs}
        self.optim_params = [m for _, m in self.pairs] + [p for p in params if id(p) not in low]

    def grads_to_master(self) -> None:
        for p, master in self.pairs:
            master.grad = None if p.grad is None else p.grad.float()

    def master_to_model(self) -> None:
        with torch.no_grad():
            for p, master in self.pairs:
                p.copy_(master)
                p.grad = None
