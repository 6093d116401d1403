"""The policy model: loading (full or LoRA), per-token log-probs, and fp32 master weights.

Sequence layout used everywhere (the layout `generate` returns):
    [left padding | prompt | response | right padding]  with the response starting at column P.
Log-probs pass explicit position ids from the attention mask, so left padding does not shift positions,
and take only the response columns' hidden states through the output layer, in chunks of rows
(logprobs.hidden_token_logprobs): neither the prompt's logits nor a (B, T, V) logits tensor ever exist (except for a
model whose logits are not its head of the hidden states, logprobs.output_layer: a soft-cap or a scale). With
--shared_prefix a group's prompt is forwarded once for its samples (shared_prefix.py, `logprob_passes`).
Log-probs are taken at the sampling temperature (logits / T), on the policy and reference sides alike:
the samples come from that distribution (logprobs.py).

Dropout is switched off in the policy for good (`disable_dropout`): RL passes compare log-probs of the same
tokens across passes (old vs new, the ratio), and dropout would make them differ for no reason; TRL and
open-instruct do the same. `--lora_dropout` is still written into the saved adapter's config.
"""

import logging
from collections.abc import Iterator

import torch
from torch import nn

from .bootstrap import resolve_model_path
from .config import Config
from .errors import UserError
from .logprobs import decoder_of, hidden_token_logprobs, output_layer, token_logprobs, token_logprobs_entropy
from .rollout import Rollouts, RowSlice, position_ids_from_mask
from .runtime import Runtime
from .shared_prefix import shared_prefix_passes, should_share

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
    disable_dropout(model)
    model.train()
    return model


def disable_dropout(model: nn.Module) -> None:
    """Set every dropout probability to 0: nn.Dropout modules (LoRA's included) and the float
    `*dropout*` attributes attention layers read in train mode (e.g. llama's `attention_dropout`)."""
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = 0.0
        for name, value in list(vars(module).items()):
            if "dropout" in name and isinstance(value, float) and value > 0:
                setattr(module, name, 0.0)


def _has_module(model: nn.Module, suffix: str) -> bool:
    return any(name.split(".")[-1] == suffix for name, _ in model.named_modules())


def trainable_parameters(model: nn.Module) -> list[nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def response_logprobs(
    model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor, prompt_width: int, temperature: float = 1.0
) -> torch.Tensor:
    """Log-prob of each response token under `model` at `temperature` (the sampling temperature).

    input_ids, attention_mask: (B, L) in the layout above; the response occupies columns
    prompt_width .. L-1. Returns (B, L - prompt_width) fp32: entry t is log p_T(input_ids[:, P + t] | prefix).
    Padding columns get finite garbage: callers multiply by the response mask.
    """
    return response_logprobs_at(model, input_ids, attention_mask, prompt_width, (temperature,))[0][0]


def response_logprobs_at(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor, prompt_width: int,
                         temperatures: tuple[float, ...], entropy: bool = False) -> tuple[list[torch.Tensor], torch.Tensor | None]:
    """response_logprobs at each of `temperatures`, from one forward pass (each is one more log-softmax of the same
    chunk of logits): the KL term against a reference served at temperature 1 needs the policy there too. With
    `entropy`, also the (B, T) per-token entropy at temperatures[0], from the same chunks as its log-probs."""
    response_width = input_ids.shape[1] - prompt_width
    targets = input_ids[:, prompt_width:]  # (B, T)
    positions = position_ids_from_mask(attention_mask)
    head = output_layer(model)
    if head is not None:  # the decoder's hidden states through the head in chunks: the (B, T, V) logits never exist
        hidden = decoder_of(model)(input_ids=input_ids, attention_mask=attention_mask, position_ids=positions, use_cache=False).last_hidden_state
        return hidden_token_logprobs(hidden[:, prompt_width - 1 : -1], head, targets, temperatures, entropy)  # column P-1+t predicts P+t
    out = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=positions,
                logits_to_keep=response_width + 1, use_cache=False)  # logits at columns P-1 .. L-1 (a head that is not plain)
    logits = out.logits[:, :-1, :]  # (B, T, V) in the model's dtype: column P-1+t predicts token P+t
    if not entropy:
        return [token_logprobs(logits, targets, t) for t in temperatures], None  # each (B, T) fp32
    first, entropies = token_logprobs_entropy(logits, targets, temperatures[0])
    return [first] + [token_logprobs(logits, targets, t) for t in temperatures[1:]], entropies


def by_length(rollouts: Rollouts, rows: list[int]) -> list[int]:
    """rows sorted by response length, so a micro-batch holds similar lengths (less padding)."""
    lengths = rollouts.response_lengths.tolist()
    return sorted(rows, key=lambda r: lengths[r])


def shares_prefix(model: nn.Module, mode: str, rollouts: Rollouts, rows: list[int]) -> bool:
    """--shared_prefix's decision for one pass (shared_prefix.should_share), for a model whose logits are its output
    layer of the decoder's hidden states (logprobs.output_layer)."""
    return output_layer(model) is not None and should_share(mode, decoder_of(model), rollouts, rows)


def logprob_passes(model: nn.Module, rollouts: Rollouts, rows: list[int], size: int, temperatures: tuple[float, ...], *,
                   entropy: bool = False, share: bool = False, with_grad: bool = False, on_prefix_grad=None
                   ) -> Iterator[tuple[list[int], RowSlice, list[torch.Tensor], torch.Tensor | None]]:
    """The micro-batches of a pass over `rows`, `size` samples each: (their rows, the trimmed RowSlice, the (b, t)
    log-probs at each temperature, the (b, t) entropy at temperatures[0] or None). Per sample, sorted by length; or,
    with `share`, sorted by group with each group's prefix forwarded once (shared_prefix.py; with `with_grad` the
    caller backpropagates each micro-batch before taking the next, and the prefix's own backward runs in between,
    followed by on_prefix_grad())."""
    if not share:
        ordered = by_length(rollouts, rows)
        for start in range(0, len(ordered), size):
            chunk = ordered[start : start + size]
            part = rollouts.rows(chunk)
            yield (chunk, part, *response_logprobs_at(model, part.input_ids, part.attention_mask, part.prompt_width, temperatures, entropy))
        return
    for micro in shared_prefix_passes(decoder_of(model), rollouts, rows, size, with_grad, on_prefix_grad):
        targets = micro.part.input_ids[:, micro.part.prompt_width :]  # (b, t)
        yield (micro.rows, micro.part, *hidden_token_logprobs(micro.hidden, output_layer(model), targets, temperatures, entropy))


class MasterWeights:
    """fp32 copies of low-precision trainable parameters, so that small AdamW updates are not rounded
    away in bf16 (a 2e-5 step on a weight of 0.02 is below bf16's 2^-8 relative precision).

    Gradients are summed in fp32 too: `accumulate()` after each micro-batch's backward adds the bf16
    gradient into the master's fp32 one and frees it (bf16 sums drift: 0.7% relative error after 32
    micro-batches, 1.3% after 128). The optimizer steps the fp32 copies; `master_to_model()` copies them
    back. Parameters that are fp32 already are stepped directly (no copy; they accumulate in fp32).
    """

    def __init__(self, params: list[nn.Parameter]):
        self.pairs = [(p, p.detach().float().clone()) for p in params if p.dtype != torch.float32]
        for _, master in self.pairs:
            master.requires_grad_(True)
        self.optim_param = {id(p): master for p, master in self.pairs}
        self.optim_param.update({id(p): p for p in params if id(p) not in self.optim_param})
        self.optim_params = list(self.optim_param.values())

    def accumulate(self) -> None:
        """Move this micro-batch's low-precision gradients into the fp32 master gradients."""
        for p, master in self.pairs:
            if p.grad is None:
                continue
            if master.grad is None:
                master.grad = p.grad.float()
            else:
                master.grad.add_(p.grad)
            p.grad = None

    def master_to_model(self) -> None:
        with torch.no_grad():
            for p, master in self.pairs:
                p.copy_(master)
                p.grad = None


def optimizer_groups(model: nn.Module, master: MasterWeights, weight_decay: float) -> list[dict]:
    """AdamW parameter groups: weight decay on weight matrices only, not on biases, norms (1-D) or the
    token embeddings / output head (as open-instruct and TRL do)."""
    embeddings = {id(m.weight) for m in (model.get_input_embeddings(), model.get_output_embeddings()) if m is not None}
    decay, no_decay = [], []
    for p in trainable_parameters(model):
        (no_decay if p.ndim < 2 or id(p) in embeddings else decay).append(master.optim_param[id(p)])
    return [g for g in ({"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}) if g["params"]]
