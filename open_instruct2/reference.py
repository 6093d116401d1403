"""Reference log-probs for the KL term, behind one small interface.

Modes: `in_process` (LoRA: the policy itself with adapters disabled, no copy; full: a frozen copy of
the starting model), `none` (beta = 0: no reference work at all), and the vLLM modes
(`launch_local_vllm`, `endpoint_vllm`) in reference_vllm.py.
"""

import logging
from typing import Protocol

import torch

from .config import Config
from .errors import ConfigError
from .policy import load_model, logprob_passes, shares_prefix
from .rollout import Rollouts
from .runtime import Runtime

log = logging.getLogger(__name__)


class Reference(Protocol):
    temperature: float
    """The temperature its log-probs are at: the sampling temperature, or 1 (a plainly started vLLM endpoint); the KL
    term takes the policy's log-probs at the same one."""

    def logprobs(self, rollouts: Rollouts, rows: list[int]) -> torch.Tensor:
        """(len(rows), T) reference log-probs of the given samples' response tokens (T = rollouts' width),
        at `temperature`; zero outside each response."""

    def close(self) -> None: ...


def batched_logprobs(model, rollouts: Rollouts, rows: list[int], batch_size: int, temperature: float, share: bool = False) -> torch.Tensor:
    """No-grad log-probs of `rows` in batches sorted by length (with `share`: by group, each group's prefix
    forwarded once), as (len(rows), T) aligned with the response mask (zero outside each response), in the order of
    `rows`."""
    return batched_forward(model, rollouts, rows, batch_size, temperature, share=share)[0]


def batched_forward(model, rollouts: Rollouts, rows: list[int], batch_size: int, temperature: float,
                    entropy: bool = False, share: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """batched_logprobs, and with `entropy` the per-token entropies (len(rows), T) from the same pass (else None)."""
    out = torch.zeros(len(rows), rollouts.response_mask.shape[1], device=rollouts.input_ids.device)
    entropies = torch.zeros_like(out) if entropy else None
    position = {r: i for i, r in enumerate(rows)}
    with torch.no_grad():
        for chunk, part, (values,), h in logprob_passes(model, rollouts, rows, batch_size, (temperature,), entropy=entropy, share=share):
            at = [position[r] for r in chunk]
            out[at, : values.shape[1]] = values * part.response_mask  # (b, t)
            if entropy:
                entropies[at, : h.shape[1]] = h * part.response_mask
    return out, entropies


class InProcessReference:
    """The starting model inside the trainer process."""

    def __init__(self, policy, cfg: Config, runtime: Runtime):
        self.batch_size, self.temperature = cfg.optim.inference_batch_size, cfg.rollout.temperature
        self.shared_prefix = cfg.model.shared_prefix
        self.lora = cfg.lora.train_mode == "lora"
        if self.lora:
            self.model = policy  # adapters disabled at scoring time: the base model is the reference
        else:
            self.model = load_model(cfg.reference.reference_model_name_or_path or cfg.model.model_name_or_path, cfg, runtime, trainable=False)

    def logprobs(self, rollouts: Rollouts, rows: list[int]) -> torch.Tensor:
        share = shares_prefix(self.model, self.shared_prefix, rollouts, rows)
        if not self.lora:
            return batched_logprobs(self.model, rollouts, rows, self.batch_size, self.temperature, share)
        was_training = self.model.training
        self.model.eval()
        try:
            with self.model.disable_adapter():
                return batched_logprobs(self.model, rollouts, rows, self.batch_size, self.temperature, share)
        finally:
            self.model.train(was_training)

    def close(self) -> None:
        pass


def make_reference(cfg: Config, runtime: Runtime, policy, tokenizer, run_dir: str) -> Reference | None:
    """The configured reference, or None when beta = 0 (no reference work at all)."""
    mode = cfg.reference.reference_mode
    if cfg.optim.beta == 0 or mode == "none":
        if mode != "none":
            log.info("reference: beta is 0, so --reference_mode %s does no work", mode)
        return None
    if mode == "in_process":
        if cfg.lora.train_mode == "lora" and cfg.reference.reference_model_name_or_path not in (None, cfg.model.model_name_or_path):
            raise ConfigError("--reference_mode in_process with LoRA uses the policy's base model; remove --reference_model_name_or_path or train full")
        return InProcessReference(policy, cfg, runtime)
    from .reference_vllm import make_vllm_reference

    return make_vllm_reference(cfg, runtime, run_dir, tokenizer=tokenizer, policy=policy)
