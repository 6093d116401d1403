"""Rollouts: sample responses from the policy with HF `generate`.

- Prompts are LEFT-padded, so every response starts at the same column and positions stay right
  (the original right-padded before generate, which makes the model continue after padding). The one exception
  is a tool loop's later round under --shared_prefix (`generate_rows`): its rows are padded in the middle too.
- Sampling uses exactly temperature and top_p from the flags: the model's generation_config.json
  (repetition penalty, min_p, top-k, ...) is kept out (`only_these_settings`), because the log-probs of
  the update model softmax(logits / T) and nothing else.
- Stop strings are hard stops: a sequence whose new text contains one stops generating at once. The
  stop string's tokens stay in the response (they were sampled, and format rewards need them).
- The response mask is cut at the first eos (inclusive: stopping is learned too), never derived from the
  pad id, which equals eos for many models (SmolLM2 included).
- Finish reason: 'stop' (eos or a stop string) or 'length' (hit response_length).
- Shared prefix (--shared_prefix, rollout_prefix.py): the rows of a prompt forward what they share once (the G
  samples: all of the prompt but its last column; a tool loop's later rounds: the prompt and more), the KV cache is
  copied to the rows, and generate computes only each row's own columns. Same draws (the Sampler's uniforms do not
  depend on how the logits were computed), logits equal up to rounding.
- The sampler's log-prob of every drawn token is recorded (`Rollouts.sampler_logprobs`), as the vLLM backend
  returns it: the generation copy (merged LoRA, packed weights, a KV cache) is not bit for bit the trainer's
  forward pass, and the update corrects for the difference with the same truncated importance weights
  (train/sampler_mismatch_* shows its size: ~1e-6 in fp32 from the policy itself).
"""

import functools
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from transformers import GenerationConfig, LogitsProcessor, LogitsProcessorList, StoppingCriteria, StoppingCriteriaList
from transformers.generation.stopping_criteria import StopStringCriteria

from .data import PromptBatch
from .rollout_prefix import cache_expandable, later_rounds_share, padded_rows, prefilled_cache, prefix_groups, shared_prefix_for


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
    sampler_logprobs: torch.Tensor | None = None
    """(N, T) the sampler's log-prob of each sampled token at the sampling temperature (0 outside the response): the
    vLLM server's, or HF generate's own from the model it generated with (a merged or packed copy rounds differently
    from the policy); the update weighs by the importance ratio to it. None: not recorded (greedy evaluation)."""
    stats: dict | None = None
    """Metrics of how the rollouts were made (vllm backend: weight sync seconds), merged into the step's."""
    tool_mask: torch.Tensor | None = None
    """(N, T) 1 on tool output appended to a response (multi-turn rollouts with tools, tools/loop.py); None: no tools.
    With --mask_tool_use (the default) response_mask is 0 there: tool output is conditioned on, never trained on."""
    turns: list[list[dict]] | None = None
    """Per sample, with tools: each stretch the policy wrote, the call it ended with and the output it got."""
    answer_texts: list[str] | None = None
    """With tools: what the policy wrote after the last tool output (what verifiers score); None: response_texts."""

    @property
    def response_lengths(self) -> torch.Tensor:
        """(N,) columns of each response: its tokens, tool output included (= response_mask's sum without tools)."""
        return self.attention_mask[:, self.prompt_width :].sum(dim=1)

    @property
    def scored_texts(self) -> list[str]:
        """What verifiers score: the answer after the last tool output, or the whole response."""
        return self.response_texts if self.answer_texts is None else self.answer_texts

    def response_token_ids(self) -> list[list[int]]:
        """Each sample's response tokens (tool output included), without padding (the reward functions' completion_ids)."""
        ids = self.input_ids[:, self.prompt_width :].tolist()
        return [row[:n] for row, n in zip(ids, self.response_lengths.tolist())]

    def rows(self, index: list[int]) -> "RowSlice":
        """The given samples, with the columns that are padding in all of them trimmed away."""
        index_t = torch.as_tensor(index, device=self.input_ids.device)
        attention = self.attention_mask[index_t]
        response = self.response_mask[index_t]
        left = int((attention[:, : self.prompt_width] == 0).sum(dim=1).min())  # padding shared by all rows
        width = max(int(attention[:, self.prompt_width :].sum(dim=1).max()), 1)
        end = self.prompt_width + width
        return RowSlice(
            input_ids=self.input_ids[index_t, left:end],
            attention_mask=attention[:, left:end],
            prompt_width=self.prompt_width - left,
            response_mask=response[:, :width],
        )


def position_ids_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """(B, L) -> (B, L): 0, 1, 2, ... from each sequence's first real token; padding gets 0 (as generate counts them)."""
    return (attention_mask.long().cumsum(dim=1) - 1).clamp(min=0)


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
    """Marks a sequence done the step its NEW text first contains a stop string, and remembers the step.

    The matching is transformers' vectorised StopStringCriteria (token strings precomputed once per
    tokenizer and stop-string set; no decoding, no host sync per step). It looks at the sequence's last
    tokens, prompt included, so prompt columns in that window are blanked: a stop string "\n\n" must not
    fire because the prompt ended in "\n". `stopped_at` stays on the device until generation ends.
    """

    def __init__(self, tokenizer, stop_strings: tuple[str, ...], prompt_width: int, batch_size: int, device):
        self.matcher = _stop_string_matcher(tokenizer, tuple(stop_strings))
        self.blank = self.matcher.embedding_vec.shape[0] - 1  # ids >= this map to a token that matches nothing
        self.prompt_width = prompt_width
        self.stopped_at = torch.full((batch_size,), -1, dtype=torch.long, device=device)  # (N,) response tokens kept

    def __call__(self, input_ids: torch.Tensor, scores, **kwargs) -> torch.Tensor:
        new = input_ids.shape[1] - self.prompt_width
        window = input_ids[:, -self.matcher.maximum_token_len :]  # (N, w)
        if new < window.shape[1]:
            window = window.clone()
            window[:, : window.shape[1] - new] = self.blank
        done = self.matcher(window, scores)  # (N,)
        self.stopped_at = torch.where(done & (self.stopped_at < 0), new, self.stopped_at)
        return self.stopped_at >= 0


@functools.lru_cache(maxsize=8)
def _stop_string_matcher(tokenizer, stop_strings: tuple[str, ...]) -> StopStringCriteria:
    return StopStringCriteria(tokenizer, list(stop_strings))  # ~0.3 s for a 49k vocabulary: build once


def eos_ids(model, tokenizer) -> set[int]:
    ids = set()
    for source in (getattr(model.generation_config, "eos_token_id", None), tokenizer.eos_token_id):
        if isinstance(source, int):
            ids.add(source)
        elif source:
            ids.update(source)
    return ids


class Sampler(LogitsProcessor):
    """Draws the next token from softmax(logits / temperature) restricted to the top_p nucleus, by inverse CDF:
    one uniform number per row against the cumulative probabilities (in float64). Same distribution as
    transformers' temperature + top_p + multinomial (tests/test_rollout.py checks the frequencies), but
    multinomial draws an exponential for every vocabulary entry: 7 ms a step for 8 x 49,152 on a CPU, 14% of
    generation measured at bf16 (BENCHMARKS.md). Returns scores whose argmax is the drawn token, so generate
    runs with do_sample=False and this processor does the sampling."""

    def __init__(self, temperature: float, top_p: float):
        self.temperature, self.top_p = temperature, top_p
        self.picked_logprobs: list[torch.Tensor] = []
        """Per generated column, (N,) the log-prob of the drawn token under softmax(logits / T) (the full distribution,
        before the nucleus: what the trainer's log-probs model), on the device."""

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        logits = scores.float() / self.temperature  # (N, V)
        probs = torch.softmax(logits, dim=-1)  # (N, V)
        order = None
        if self.top_p < 1.0:
            probs, order = probs.sort(dim=-1, descending=True)  # (N, V)
            before = probs.cumsum(dim=-1) - probs  # mass of the more likely tokens
            probs = torch.where(before < self.top_p, probs, 0.0)  # the nucleus (the top token always stays)
        cdf = probs.double().cumsum(dim=-1)  # (N, V)
        u = torch.rand(scores.shape[0], 1, dtype=torch.float64, device=scores.device) * cdf[:, -1:]  # (N, 1)
        pick = torch.searchsorted(cdf, u, right=True).clamp(max=scores.shape[-1] - 1)  # (N, 1)
        if order is not None:
            pick = order.gather(1, pick)
        self.picked_logprobs.append((logits.gather(1, pick) - torch.logsumexp(logits, dim=-1, keepdim=True)).squeeze(1))  # (N,)
        return torch.full_like(scores, float("-inf")).scatter_(1, pick, 0.0)


def sampling_config(*, temperature: float, top_p: float, response_length: int, pad_token_id: int, eos_token_ids: list[int],
                    greedy: bool = False, static_cache: bool = False) -> tuple[GenerationConfig, LogitsProcessorList | None]:
    """Exactly the sampling the flags name: temperature and top_p (Sampler), nothing else (no top-k, no
    penalties); greedy (evaluation): the most likely token every time. static_cache: a preallocated KV cache
    (transformers compiles the decoding step over it on CUDA)."""
    config = GenerationConfig(do_sample=False, max_new_tokens=response_length, pad_token_id=pad_token_id,
                              eos_token_id=eos_token_ids, use_cache=True, cache_implementation="static" if static_cache else None)
    return config, None if greedy else LogitsProcessorList([Sampler(temperature, top_p)])


# Fields of a model's generation_config.json that change which tokens get sampled.
SAMPLING_FIELDS = (
    "do_sample", "temperature", "top_k", "top_p", "min_p", "typical_p", "epsilon_cutoff", "eta_cutoff",
    "repetition_penalty", "encoder_repetition_penalty", "no_repeat_ngram_size", "bad_words_ids",
    "suppress_tokens", "begin_suppress_tokens", "min_length", "min_new_tokens", "forced_bos_token_id",
    "forced_eos_token_id", "exponential_decay_length_penalty", "sequence_bias", "top_h", "num_beams",
)


def ignored_generation_settings(model) -> dict:
    """Sampling settings in the model's own generation_config that rollouts do NOT use."""
    own = model.generation_config.to_diff_dict()
    return {k: own[k] for k in SAMPLING_FIELDS if k in own}


@contextmanager
def only_these_settings(model):
    """transformers fills every field a GenerationConfig leaves unset from the model's generation_config
    (a hub model's repetition_penalty, min_p, ... would leak into sampling and the log-probs would no
    longer model the sampler). Inside this block the model's own config is an empty one, holding only the
    special token ids; PEFT copies its wrapper's config onto the base model, so both are swapped and
    restored (the saved model keeps its generation_config.json)."""
    holders = [model] + ([model.get_base_model()] if hasattr(model, "get_base_model") else [])
    saved = [(h, h.generation_config) for h in holders]
    own = saved[0][1]
    neutral = GenerationConfig(bos_token_id=own.bos_token_id, eos_token_id=own.eos_token_id, pad_token_id=own.pad_token_id)
    try:
        for h in holders:
            h.generation_config = neutral
        yield
    finally:
        for h, config in saved:
            h.generation_config = config


STATIC_WIDTH_STEP = 64
"""A static cache's prompt width, when a batch is wider than the run's: rounded up to a multiple of this."""


def generate_rollouts(model, tokenizer, batch: PromptBatch, *, num_samples: int, **settings) -> Rollouts:
    """Sample num_samples responses per prompt of `batch` (generate_rows' settings)."""
    prompts = [p.prompt_ids for p in batch.prompts for _ in range(num_samples)]
    prompt_index = [i for i in range(len(batch.prompts)) for _ in range(num_samples)]
    return generate_rows(model, tokenizer, prompts, prompt_index, **settings)


class HFEngine:
    """HF generate as the tool loop's engine (tools/loop.py): round 1 from the prompts, later rounds from each row's
    tokens so far; under --shared_prefix a prompt's rows share what they have in common (rollout_prefix)."""

    def __init__(self, model, tokenizer, *, response_length: int, shared_prefix: str, **settings):
        self.model, self.tokenizer, self.response_length, self.shared_prefix, self.settings = model, tokenizer, response_length, shared_prefix, settings
        self.eos_ids = eos_ids(model, tokenizer)

    def first(self, batch: PromptBatch, num_samples: int, stop_strings: list[str]) -> Rollouts:
        return generate_rollouts(self.model, self.tokenizer, batch, num_samples=num_samples, response_length=self.response_length,
                                 stop_strings=stop_strings,
                                 shared_prefix=shared_prefix_for(self.shared_prefix, batch.prompts, num_samples, self.settings.get("static_width") is not None),
                                 **self.settings)

    def more(self, sequences: list[list[int]], prompt_index: list[int], budgets: list[int], stop_strings: list[str]) -> Rollouts:
        """The rows generate together, to the largest budget (the loop cuts each row to its own); the rows of one
        prompt share what they have in common (its prompt at least) under --shared_prefix."""
        settings = {**self.settings, "static_width": None}  # the rows' widths change every round: no one cache shape to keep
        return generate_rows(self.model, self.tokenizer, sequences, prompt_index, response_length=max(budgets), stop_strings=stop_strings,
                             shared_prefix=later_rounds_share(self.shared_prefix, sequences, prompt_index), **settings)


@torch.no_grad()
def generate_rows(
    model,
    tokenizer,
    prompts: list[list[int]],
    prompt_index: list[int],
    *,
    response_length: int,
    temperature: float,
    top_p: float,
    stop_strings: list[str] | None,
    device: torch.device,
    greedy: bool = False,
    static_width: int | None = None,
    shared_prefix: bool = False,
) -> Rollouts:
    """Continue each row of token ids in `prompts` by at most response_length tokens (greedy: the most likely tokens;
    evaluation). prompt_index: each row's prompt (the rows of one prompt start with its tokens).
    static_width: generate over a static KV cache with the prompts left-padded to this width (a longer batch
    to the next multiple of STATIC_WIDTH_STEP), so that every batch of a run has one cache shape (on CUDA,
    each new shape is a new compile); None: the dynamic cache, padded to the batch's longest prompt.
    shared_prefix: the rows of one prompt forward what they share once (rollout_prefix; `shared_prefix_for` and
    `later_rounds_share` decide), into a dynamic or a static cache. Where rows of a prompt differ before their last
    token (a tool loop's later rounds), the returned prompt columns are padded in the middle too (rollout_prefix's
    layout): read such a result's response columns only, as the tool loop does; Rollouts.rows() assumes left padding."""
    width = max(len(p) for p in prompts)
    static_cache = static_width is not None
    if static_cache:
        width = static_width if width <= static_width else -(-width // STATIC_WIDTH_STEP) * STATIC_WIDTH_STEP
    shares = shared_prefix and cache_expandable(model)
    shared, group = prefix_groups(prompts, prompt_index) if shares else ([0] * len(prompts), None)  # (N,) prefix lengths, prompts
    pad = tokenizer.pad_token_id
    input_ids, attention_mask, C = padded_rows(prompts, shared, pad, width, device)  # (N, P), (N, P); C shared columns
    width = input_ids.shape[1]
    eos = sorted(eos_ids(model, tokenizer))
    stopper = StopOnStrings(tokenizer, tuple(stop_strings), width, len(prompts), device) if stop_strings else None
    generation_config, sampler = sampling_config(
        temperature=temperature, top_p=top_p, response_length=response_length, pad_token_id=pad, eos_token_ids=eos, greedy=greedy,
        static_cache=static_cache and group is None,  # a shared prefix brings its own static cache
    )
    was_training = model.training
    model.eval()
    try:
        # generate sees a cache of C columns next to the (N, P) ids and mask: it forwards only the columns after them
        static_length = width + response_length - 1 if static_cache else None  # as long as generate's own (the last token is never forwarded)
        cache = prefilled_cache(model, input_ids, attention_mask, C, group, static_length) if group is not None else None
        with only_these_settings(model):
            sequences = model.generate(
                input_ids=input_ids,
                attention_mask=attention_mask,
                past_key_values=cache,
                generation_config=generation_config,
                logits_processor=sampler,
                stopping_criteria=StoppingCriteriaList([stopper]) if stopper else None,
            )  # (N, P + t)
        del cache
    finally:
        model.train(was_training)
    generated = sequences[:, width:]  # (N, t)
    stopped_at = stopper.stopped_at if stopper else torch.full((len(prompts),), -1, device=device)
    lengths, stopped = _cut(generated, torch.tensor(eos, device=device), stopped_at)  # (N,), (N,)
    columns = torch.arange(generated.shape[1], device=device)
    response_mask = (columns.unsqueeze(0) < lengths.unsqueeze(1)).long()  # (N, t)
    lengths_list, stopped_list, rows = lengths.tolist(), stopped.tolist(), generated.tolist()  # one host copy
    full_width = generated.shape[1] >= response_length
    reasons = ["stop" if s or not full_width else "length" for s in stopped_list]
    texts = tokenizer.batch_decode([row[:n] for row, n in zip(rows, lengths_list)], skip_special_tokens=True)
    sampler_logprobs = None
    if sampler is not None and sampler[0].picked_logprobs:
        sampler_logprobs = torch.stack(sampler[0].picked_logprobs, dim=1)[:, : generated.shape[1]] * response_mask  # (N, t)
    return Rollouts(
        input_ids=sequences,
        attention_mask=torch.cat([attention_mask, response_mask], dim=1),
        response_mask=response_mask,
        prompt_width=width,
        finish_reasons=reasons,
        response_texts=texts,
        prompt_index=prompt_index,
        sampler_logprobs=sampler_logprobs,
    )


def _cut(generated: torch.Tensor, eos: torch.Tensor, stopped_at: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Response length (N,) and whether it stopped on its own (N,) of each generated row (N, t).

    A row ends at its first eos (kept: stopping is learned too) before any stop-string stop; else at the
    stop string's last token; else it ran to the end. Tokens after a stop are padding (pad may equal eos).
    """
    t = generated.shape[1]
    limit = torch.where(stopped_at >= 0, stopped_at, t)  # (N,)
    columns = torch.arange(t, device=generated.device)
    is_eos = torch.isin(generated, eos) & (columns.unsqueeze(0) < limit.unsqueeze(1))  # (N, t)
    has_eos = is_eos.any(dim=1)  # (N,)
    first_eos = is_eos.int().argmax(dim=1)  # (N,) 0 when there is none
    lengths = torch.where(has_eos, first_eos + 1, limit)
    return lengths, has_eos | (stopped_at >= 0)
