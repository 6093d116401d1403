"""The shared prefix in HF generation (--shared_prefix): rows of one prompt share their first tokens, so those columns
are forwarded once per prompt and their KV cache is copied to the prompt's rows; generate forwards only each row's own
columns.

- What a group shares: the longest prefix common to all its rows that leaves every row at least one token of its own
  (generate forwards at least one column). Round 1 of a rollout: G identical rows, so all of the prompt but its last
  token. A tool loop's later rounds: the prompt, and whatever the rows' responses still have in common.
- The layout (`padded_rows`): each row is [pad][its shared prefix][pad][its own tokens]. The prefixes end at one
  column C (the cache's width), each row's own tokens at the last column; a static cache's wider width is more left
  padding. The padding in the middle is masked and positions count real tokens only (generate and prefix_forward
  both take them from the attention mask), so a row's logits are those of its unpadded tokens, up to rounding. With
  nothing shared it is plain left padding.
- A static cache (--generation_cache static; auto picks it on CUDA, for compiled decoding) is prefilled the same
  way, into a new StaticCache of generate's own length at every call, as generate makes its own. --shared_prefix
  auto leaves that path to the per-row prefill until it is measured on a GPU; `on` shares there too.
- Same draws as the per-row prefill for the same seed (the Sampler's uniforms do not depend on how the logits were
  computed), logits equal up to rounding: tests/test_rollout_prefix.py.
"""

from collections import Counter

import torch

from .data import Prompt

SHARE_MIN_PROMPT_TOKENS = 16
"""--shared_prefix auto prefills once per prompt in generation from this prompt width on. Measured on a 2-core AVX512
CPU, SmolLM2-135M, 2 prompts x 8 samples, 64 new tokens (shared vs per row, medians of 3): fp32 0.96x at 8 prompt
tokens, 1.18x at 32, 1.28x at 80, 1.82x at 256; bf16 1.13x, 1.15x, 1.13x, 1.21x (decoding dominates). Below a few
tokens there is nothing to save but the extra forward call."""


def share_prompt_prefill(prompt_width: int, rows_per_prompt: float) -> bool:
    """--shared_prefix auto's rule for HF generation: prefill once per prompt for prompts of prompt_width tokens
    with rows_per_prompt rows each (round 1: the samples per prompt; later rounds: the most rows of one prompt)."""
    return rows_per_prompt >= 2 and prompt_width >= SHARE_MIN_PROMPT_TOKENS


def shared_prefix_for(mode: str, prompts: list[Prompt], num_samples: int, static_cache: bool = False) -> bool:
    """Round 1's shared_prefix under --shared_prefix `mode`: off never; on whenever a prompt has several samples;
    auto by share_prompt_prefill for the widest of `prompts`, and not with a static cache (CUDA's compiled decoding:
    not measured on a GPU yet, so auto keeps the per-row prefill there)."""
    if mode == "off" or num_samples < 2:
        return False
    return mode == "on" or (not static_cache and share_prompt_prefill(max(len(p.prompt_ids) for p in prompts), num_samples))


def later_rounds_share(mode: str, sequences: list[list[int]], prompt_index: list[int]) -> bool:
    """A tool loop's later rounds under `mode`: off never; on whenever two rows come from one prompt; auto by
    share_prompt_prefill for the prompt with the most rows still going, its shortest row standing for its prompt
    width (every row holds its whole prompt). prefix_groups then shares only if it forwards fewer columns."""
    counts = Counter(prompt_index)
    if mode == "off" or not counts or max(counts.values()) < 2:
        return False
    top = max(counts, key=counts.get)
    return mode == "on" or share_prompt_prefill(min(len(s) for s, p in zip(sequences, prompt_index) if p == top), counts[top])


def prefix_groups(rows: list[list[int]], prompt_index: list[int]) -> tuple[list[int], list[int] | None]:
    """(k, group) per row: the rows of one prompt share their first k tokens (the longest common prefix that leaves
    each row a token of its own); group: the index of the row's prompt among the distinct ones, in order of first
    appearance. (all 0, None) when nothing is worth sharing (`_saves`)."""
    members: dict[int, list[int]] = {}
    for r, p in enumerate(prompt_index):
        members.setdefault(p, []).append(r)
    shared, group = [0] * len(rows), [0] * len(rows)
    for u, rs in enumerate(members.values()):
        first = rows[rs[0]]
        k = min(len(rows[r]) for r in rs) - 1
        for r in rs[1:]:
            other = rows[r]
            if other[:k] != first[:k]:  # (identical rows, round 1's, compare at C speed)
                k = next(j for j in range(k) if other[j] != first[j])
        for r in rs:
            shared[r], group[r] = k, u
    if not _saves(rows, shared, len(members)):
        return [0] * len(rows), None
    return shared, group


WIDER_AT_MOST = 1.25
"""How much wider than the longest row the shared layout may be (a long shared prefix beside another prompt's long
own tokens): every decoding step attends over the width, and the KV cache holds it."""


def _saves(rows: list[list[int]], shared: list[int], distinct: int) -> bool:
    """Whether sharing forwards fewer columns (U x C + N x S against N x the longest row) in a layout no more than
    WIDER_AT_MOST times the longest row: a prefix column, and a prompt with two rows."""
    if max(shared, default=0) < 1 or distinct == len(rows):
        return False
    longest, C = max(len(r) for r in rows), max(shared)
    S = max(len(r) - k for r, k in zip(rows, shared))
    return distinct * C + len(rows) * S < len(rows) * longest and C + S <= WIDER_AT_MOST * longest


def padded_rows(rows: list[list[int]], shared: list[int], pad: int, width: int, device) -> tuple[torch.Tensor, torch.Tensor, int]:
    """(input_ids, attention_mask) (N, W) in the layout above, W the larger of `width` and what the rows need (any
    more columns are left padding), and C (the columns before every row's own tokens: the cache's width).
    shared: each row's shared prefix length (all 0: left padding to W)."""
    S = max(len(row) - k for row, k in zip(rows, shared))
    W = max(width, max(shared) + S)
    C = W - S
    ids, mask = [], []
    for row, k in zip(rows, shared):
        lead, gap = C - k, W - C - (len(row) - k)
        ids.append([pad] * lead + row[:k] + [pad] * gap + row[k:])
        mask.append([0] * lead + [1] * k + [0] * gap + [1] * (len(row) - k))
    return torch.tensor(ids, device=device), torch.tensor(mask, device=device), C


def prefilled_cache(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, C: int, group: list[int], static_length: int | None = None):
    """The KV cache of columns [0, C) of the (N, W) rows of padded_rows: one decoder forward over the U distinct
    prompts' prefixes (shared_prefix.prefix_forward, as the log-prob passes share theirs), each layer's keys/values
    (U, heads, C, d) then selected to the rows (N, heads, C, d), in a cache generate extends: a DynamicCache, or with
    static_length a static one of that many columns."""
    from transformers import DynamicCache

    from .logprobs import decoder_of
    from .shared_prefix import prefix_forward  # (shared_prefix imports rollout, which imports this module)

    firsts = torch.tensor([group.index(u) for u in range(max(group) + 1)], device=input_ids.device)  # (U,)
    rows = torch.tensor(group, device=input_ids.device)  # (N,)
    keys, values = prefix_forward(decoder_of(model), input_ids[firsts, :C], attention_mask[firsts, :C])
    if static_length is not None:
        from transformers import StaticCache

        cache = StaticCache(config=model.config, max_cache_len=static_length)
        for layer, k, v in zip(cache.layers, keys, values):
            layer.update(k.index_select(0, rows), v.index_select(0, rows))
        return cache
    cache = DynamicCache(ddp_cache_data=zip(keys, values))  # (U rows: the copy it makes is of the distinct prompts only)
    cache.batch_select_indices(rows)
    return cache


def cache_expandable(model) -> bool:
    from .logprobs import decoder_of
    from .shared_prefix import shareable

    return shareable(decoder_of(model))
