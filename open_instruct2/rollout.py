"""Rollouts: sample responses from the policy with HF `generate`.

- Prompts are LEFT-padded, so every response starts at the same column and positions stay right
  (the original right-padded before generate, which makes the model continue after padding).
- Stop strings are hard stops: a sequence whose new text contains one stops generating at once. The
  stop string's tokens stay in the response (they were sampled, and format rewards need them).
- The response mask is cut at the first eos (inclusive: stopping is learned too), never derived from the
  pad id, which equals eos for many models (SmolLM2 included).
- Finish reason: 'stop' (eos or a stop string) or 'length' (hit response_length).
"""

from dataclasses import dataclass

import torch
from transformers import GenerationConfig, StoppingCriteria, StoppingCriteriaList

from .data import PromptBatch


@dataclass
class Rollouts:
    """N = prompts x samples per prompt; samples of one prompt are contiguous. P = prompt width,
    T = response width (the longest response of the batch)."""

    input_ids: torch.Tensor
    """(N, P + T) left-padded prompt, then the response, then right padding."""
    attention_mask: torch.Tensor
    """(N, P + T) 1 on prompt and response tokens."""
    response_mask: torch.Tensor
    """(N, T) 1 on sampled response tokens (up to and including eos / the stop string)."""
    prompt_width: int
    """P: the column where every response starts."""
    finish_reasons: list[str]
    """'stop' or 'length' per sample."""
    response_texts: list[str]
    """Decoded responses (special tokens removed)."""
    prompt_index: list[int]
    """Index into PromptBatch.prompts of each sample."""

    @property
    def response_lengths(self) -> torch.Tensor:
        return self.response_mask.sum(dim=1)  # (N,)

    def rows(self, index: list[int]) -> "RowSlice":
        """The given samples, with the columns that are padding in all of them trimmed away."""
        index_t = torch.as_tensor(index, device=self.input_ids.device)
        attention = self.attention_mask[index_t]
        response = self.response_mask[index_t]
        left = int((attention[:, : self.prompt_width] == 0).sum(dim=1).min())  # padding shared by all rows
        width = max(int(response.sum(dim=1).max()), 1)
        end = self.prompt_width + width
        return RowSlice(
            input_ids=self.input_ids[index_t, left:end],
            attention_mask=attention[:, left:end],
            prompt_width=self.prompt_width - left,
            response_mask=response[:, :width],
        )


@dataclass
class RowSlice:
    """Some rows of a Rollouts, trimmed. b = rows, t = their longest response."""

    input_ids: torch.Tensor
    """(b, p + t)"""
    attention_mask: torch.Tensor
    """(b, p + t)"""
    prompt_width: int
    response_mask: torch.Tensor
    """(b, t)"""


class StopOnStrings(StoppingCriteria):
    """Marks a sequence done the step its new text first contains a stop string; remembers when."""

    def __init__(self, tokenizer, stop_strings: list[str], prompt_width: int, batch_size: int):
        self.tokenizer, self.stop_strings, self.prompt_width = tokenizer, stop_strings, prompt_width
        # Each token decodes to at least one character in practice, so the last max-length tokens suffice.
        self.tail = max(len(s) for s in stop_strings) + 2
        self.stopped_at = [None] * batch_size  # response tokens kept for a stopped sequence

    def __call__(self, input_ids: torch.Tensor, scores, **kwargs) -> torch.Tensor:
        new = input_ids[:, self.prompt_width :]  # (B, t)
        done = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
        for b in range(input_ids.shape[0]):
            if self.stopped_at[b] is not None:
                done[b] = True
                continue
            text = self.tokenizer.decode(new[b, -self.tail :], skip_special_tokens=False)
            if any(s in text for s in self.stop_strings):
                self.stopped_at[b] = new.shape[1]
                done[b] = True
        return done


def _eos_ids(model, tokenizer) -> set[int]:
    ids = set()
    for source in (getattr(model.generation_config, "eos_token_id", None), tokenizer.eos_token_id):
        if isinstance(source, int):
            ids.add(source)
        elif source:
            ids.update(source)
    return ids


@torch.no_grad()
def generate_rollouts(
    model,
    tokenizer,
    batch: PromptBatch,
    *,
    num_samples: int,
    response_length: int,
    temperature: float,
    top_p: float,
    stop_strings: list[str] | None,
    device: torch.device,
) -> Rollouts:
    """Sample num_samples responses per prompt."""
    prompts = [p.prompt_ids for p in batch.prompts for _ in range(num_samples)]
    prompt_index = [i for i in range(len(batch.prompts)) for _ in range(num_samples)]
    width = max(len(p) for p in prompts)
    pad = tokenizer.pad_token_id
    input_ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts], device=device)  # (N, P)
    attention_mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=device)
    eos = _eos_ids(model, tokenizer)
    stopper = StopOnStrings(tokenizer, stop_strings, width, len(prompts)) if stop_strings else None
    generation_config = GenerationConfig(
        do_sample=True,
        temperature=temperature,
        top_p=top_p,
        top_k=0,  # no hidden top-k from a hub generation_config: exactly temperature + top_p
        max_new_tokens=response_length,
        pad_token_id=pad,
        eos_token_id=sorted(eos),
        use_cache=True,
    )
    was_training = model.training
    model.eval()
    try:
        sequences = model.generate(
            input_ids=input_ids,
            attention_mask=attention_mask,
            generation_config=generation_config,
            stopping_criteria=StoppingCriteriaList([stopper]) if stopper else None,
        )  # (N, P + t)
    finally:
        model.train(was_training)
    generated = sequences[:, width:]  # (N, t)
    lengths, reasons = [], []
    for b in range(generated.shape[0]):
        length, reason = _cut(generated[b].tolist(), eos, stopper.stopped_at[b] if stopper else None, response_length)
        lengths.append(length)
        reasons.append(reason)
    columns = torch.arange(generated.shape[1], device=device)
    response_mask = (columns.unsqueeze(0) < torch.tensor(lengths, device=device).unsqueeze(1)).long()  # (N, t)
    texts = [tokenizer.decode(generated[b, : lengths[b]], skip_special_tokens=True) for b in range(len(lengths))]
    return Rollouts(
        input_ids=sequences,
        attention_mask=torch.cat([attention_mask, response_mask], dim=1),
        response_mask=response_mask,
        prompt_width=width,
        finish_reasons=reasons,
        response_texts=texts,
        prompt_index=prompt_index,
    )


def _cut(tokens: list[int], eos: set[int], stopped_at: int | None, response_length: int) -> tuple[int, str]:
    """(response length, finish reason) of one generated row. Tokens after a stop are padding."""
    limit = stopped_at if stopped_at is not None else len(tokens)
    for i in range(limit):
        if tokens[i] in eos:
            return i + 1, "stop"
    if stopped_at is not None:
        return stopped_at, "stop"
    return len(tokens), "length" if len(tokens) >= response_length else "stop"
