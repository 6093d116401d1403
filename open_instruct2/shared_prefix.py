"""The tokens every sample of a group shares, computed once per group in the log-prob passes and the update.

A group's G samples are one prompt and G responses. Per sample, every pass forwards the prompt G times; here the
prompt's columns go through the model once per group (a forward with a KV cache), the cache is expanded to the
group's samples, and each sample forwards only its own columns against it:

    columns [left, P-1)  : the shared prefix, one row per group          -> per-layer keys/values (g, h, C, d)
    columns [P-1, P+t)   : the last prompt token and the response, per sample, attending to its group's cache
                           -> hidden states (b, t+1, d); column j predicts response token j

The last prompt column is computed per sample (it predicts the first response token, so its hidden state is needed
there anyway). Positions come from the whole row's attention mask, as in the per-sample pass, so the result is the
same function of the same tokens: log-probs and gradients equal the per-sample ones up to rounding (the matmuls
have other shapes; tests/test_shared_prefix.py checks fp32 and bf16, full and LoRA).

With gradients, a prefix batch's keys/values are detached into leaves the micro-batches' backward passes fill; when
the last sample of its groups has been through its backward, the prefix's own backward runs once with the summed
gradient (`torch.autograd.backward(keys, leaf.grad)`). So micro-batching is unchanged (per_device_train_batch_size
samples each, parts of a group or several groups, sorted by group then length), the prefix is forwarded and
backwarded once per group however the group is split, and at most two prefix batches are alive at a time.

Under --gradient_checkpointing the same holds: the caches here are safe to replay (the prefix's records its
layers' keys/values by assignment, the samples' only reads the prefix and extends nothing), so each decoder layer
is told it may keep a cache through checkpointing (`_can_checkpoint_with_cache`, transformers' switch for layers
that only read one) for the length of a pass, and a checkpointed layer's backward replay computes the same states.
This relies on non-reentrant checkpointing (policy.load_policy asks for it): the prefix's keys/values leave the
checkpointed layers through the cache, not as outputs, and only non-reentrant checkpointing keeps their graph.

Which columns these passes share is decided here and nowhere else (`group_rows`): samples whose columns [0, P-1)
are identical (tokens and mask) share them (HF generation decides its own, rollout_prefix.prefix_groups). That is the prompt of a GRPO group; a multi-turn rollout whose samples all
begin with the same turns shares those too, as long as they are in the prompt columns.
"""

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import Tensor
from transformers import Cache, DynamicCache
from transformers.cache_utils import DynamicLayer
from transformers.modeling_layers import GradientCheckpointingLayer

from .rollout import Rollouts, RowSlice, position_ids_from_mask

AUTO_MIN_SAVED_FRACTION = 0.2
"""--shared_prefix auto shares when the columns it saves are at least this fraction of a pass's columns. Measured on an
idle 2-core AVX-512 CPU, bf16 SmolLM2-135M, 2 groups x 8, 32-token responses (BENCHMARKS.md 2026-12-08): the update
(micro-batch 1) shows no measurable difference up to 0.27 saved and gains from 0.42 (1.18x; 1.63x at 0.62, 2.28x at
0.77); the no-grad pass loses below 0.07 (0.82x at 0.03) and gains from 0.15 (1.07x)."""


def group_rows(rollouts: Rollouts, rows: list[int]) -> list[int]:
    """The shared-prefix group of each of `rows` (0, 1, ... in order of first appearance): samples whose columns
    [0, P-1) hold the same tokens and mask."""
    if not rows:
        return []
    p = rollouts.prompt_width - 1
    index = torch.as_tensor(rows, device=rollouts.input_ids.device)
    key = torch.cat([rollouts.input_ids[index, :p], rollouts.attention_mask[index, :p].to(rollouts.input_ids.dtype)], dim=1)
    _, inverse = torch.unique(key, dim=0, return_inverse=True)
    first: dict[int, int] = {}
    return [first.setdefault(g, len(first)) for g in inverse.tolist()]


def saved_fraction(rollouts: Rollouts, rows: list[int], groups: list[int]) -> float:
    """Fraction of the pass's forwarded columns that sharing saves: (rows - groups) prefix rows of C columns
    out of rows x (C + response columns)."""
    if not rows:
        return 0.0
    prefix = prefix_columns(rollouts, rows)
    response = int(rollouts.response_lengths[rows].float().mean()) + 1  # forwarded columns: tool output included
    return (len(rows) - len(set(groups))) * prefix / (len(rows) * (prefix + response))


def should_share(mode: str, decoder, rollouts: Rollouts, rows: list[int]) -> bool:
    """Whether a pass over `rows` shares prefixes: off never; on always; auto when it saves enough
    (AUTO_MIN_SAVED_FRACTION). Never for a model whose cache cannot be expanded (`shareable`). Gradient checkpointing
    changes nothing here: a checkpointed layer keeps these passes' caches (`_layers_keep_the_cache`)."""
    if mode == "off" or not rows or prefix_columns(rollouts, rows) < 1 or not shareable(decoder):
        return False
    return mode == "on" or saved_fraction(rollouts, rows, group_rows(rollouts, rows)) >= AUTO_MIN_SAVED_FRACTION


def prefix_columns(rollouts: Rollouts, rows: list[int]) -> int:
    """The columns a shared pass over `rows` forwards once per group: those before the last prompt token, less the
    left padding every row has (0: nothing to share)."""
    return rollouts.prompt_width - 1 - shared_left_padding(rollouts, rows)


def shared_left_padding(rollouts: Rollouts, rows: list[int]) -> int:
    """Leading columns that are padding in every one of `rows` (left out of every forward)."""
    attention = rollouts.attention_mask[rows, : rollouts.prompt_width]
    return int((attention == 0).sum(dim=1).min())


@dataclass
class _PrefixBatch:
    """The keys/values of some groups' shared columns (one row per group), for every layer."""

    keys: list[Tensor]
    """Per layer (g, heads, C, head_dim); leaves when gradients flow (their .grad collects the samples' share)."""
    values: list[Tensor]
    graph: list[Tensor] | None
    """The keys and values still attached to the prefix forward's graph (None without gradients)."""
    remaining: int
    """Samples of its groups not yet through their pass."""


@dataclass
class MicroBatch:
    rows: list[int]
    part: RowSlice
    """The rows trimmed as Rollouts.rows trims them (its response mask and width are the ones the loss uses)."""
    hidden: Tensor
    """(b, t, d) the decoder's last hidden states at the columns predicting response tokens 0 .. t-1."""


def prefix_forward(decoder, input_ids: Tensor, attention_mask: Tensor) -> tuple[list[Tensor], list[Tensor]]:
    """Keys and values of every layer, each (g, heads, C, head_dim), for (g, C) prefix columns."""
    records = [_LayerRecord() for _ in range(decoder.config.num_hidden_layers)]
    _forward_with(decoder, records, input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids_from_mask(attention_mask))
    return [r.keys for r in records], [r.values for r in records]


def suffix_hidden(decoder, input_ids: Tensor, attention_mask: Tensor, keys: list[Tensor], values: list[Tensor]) -> Tensor:
    """(b, S) columns after a cached prefix of C columns -> (b, S, d) last hidden states. attention_mask (b, C + S)
    covers the prefix and these columns; keys/values per layer (b, heads, C, head_dim)."""
    prefixes = [_ReadOnlyPrefix(k, v) for k, v in zip(keys, values)]
    positions = position_ids_from_mask(attention_mask)[:, -input_ids.shape[1] :]
    return _forward_with(decoder, prefixes, input_ids=input_ids, attention_mask=attention_mask, position_ids=positions).last_hidden_state


def _forward_with(decoder, layers: list, **inputs):
    """The decoder's forward over `inputs` with these cache layers (kept through checkpointing); a layer that was
    never given its cache's states is an error, never a silently different result."""
    with _layers_keep_the_cache(decoder):
        out = decoder(**inputs, past_key_values=Cache(layers=layers), use_cache=False)
    if not all(layer.used for layer in layers):
        raise RuntimeError("this model's layers did not use the key/value cache they were given; run with --shared_prefix off")
    return out


class _LayerRecord(DynamicLayer):
    """One layer's keys/values of a prefix forward, kept by assignment (a checkpointed layer's replay in the
    backward writes the same states again instead of appending them). It reports an empty cache throughout, so a
    replay sees the same lengths as the forward did."""

    _layer_type = None  # never registered as a cache layer type of transformers' own

    def get_seq_length(self) -> int:
        return 0

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return query_length, 0

    @property
    def used(self) -> bool:
        return self.is_initialized

    def update(self, key_states: Tensor, value_states: Tensor, *args, **kwargs) -> tuple[Tensor, Tensor]:
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        self.keys, self.values = key_states, value_states
        return key_states, value_states


class _ReadOnlyPrefix(DynamicLayer):
    """A group's prefix keys/values (b, heads, C, head_dim) that a forward attends to and never extends (a replay
    reads the same states). The layer's mask sizes come from C, as a cache holding the prefix gives them."""

    _layer_type = None

    def __init__(self, keys: Tensor, values: Tensor):
        super().__init__()
        self.lazy_initialization(keys, values)
        self.keys, self.values, self.used = keys, values, False

    def update(self, key_states: Tensor, value_states: Tensor, *args, **kwargs) -> tuple[Tensor, Tensor]:
        self.used = True
        return torch.cat([self.keys, key_states], dim=-2), torch.cat([self.values, value_states], dim=-2)


@contextmanager
def _layers_keep_the_cache(decoder):
    """For the length of a shared pass, a checkpointed decoder layer keeps the cache it is given (transformers drops
    it otherwise); the caches above are replay-safe."""
    layers = [m for m in decoder.modules() if isinstance(m, GradientCheckpointingLayer) and "_can_checkpoint_with_cache" not in vars(m)]
    if torch.is_grad_enabled() and any(_reentrant(layer) for layer in layers):  # (policy.load_policy asks for non-reentrant)
        raise RuntimeError("the shared prefix needs non-reentrant gradient checkpointing (its gradient would be lost); "
                           "enable it with use_reentrant=False or run with --shared_prefix off")
    for layer in layers:
        layer._can_checkpoint_with_cache = True
    try:
        yield
    finally:
        for layer in layers:
            del layer._can_checkpoint_with_cache


def _reentrant(layer) -> bool:
    """Whether a layer is checkpointed reentrantly (transformers' partial(checkpoint, use_reentrant=...); unset is
    transformers' own default, True)."""
    func = getattr(layer, "_gradient_checkpointing_func", None)
    return bool(getattr(layer, "gradient_checkpointing", False)) and getattr(func, "keywords", {}).get("use_reentrant", True) is not False


def shareable(decoder) -> bool:
    """Whether the model's KV cache is a plain per-layer key/value store that can be expanded to a group (not
    sliding-window or linear-attention layers, whose caches keep other state); False without a decoder."""
    return decoder is not None and all(type(layer) is DynamicLayer for layer in DynamicCache(config=decoder.config).layers)


def shared_prefix_passes(decoder, rollouts: Rollouts, rows: list[int], size: int, with_grad: bool,
                         on_prefix_grad=None) -> Iterator[MicroBatch]:
    """Micro-batches of `size` of `rows` (sorted by group, then response length) with their response-predicting
    hidden states, each group's prefix computed once. With gradients the caller runs each micro-batch's backward
    before asking for the next one; a prefix's own backward runs inside this iterator once its groups are done,
    followed by `on_prefix_grad()` (e.g. MasterWeights.accumulate)."""
    p = rollouts.prompt_width
    groups = dict(zip(rows, group_rows(rollouts, rows)))
    lengths = rollouts.response_lengths.tolist()
    ordered = sorted(rows, key=lambda r: (groups[r], lengths[r]))
    left = shared_left_padding(rollouts, rows)
    first_row: dict[int, int] = {}
    members: dict[int, int] = {}
    for r in ordered:
        first_row.setdefault(groups[r], r)
        members[groups[r]] = members.get(groups[r], 0) + 1
    dtype = next(decoder.parameters()).dtype
    where: dict[int, tuple[_PrefixBatch, int]] = {}  # group -> (its prefix batch, its row there)
    alive: list[_PrefixBatch] = []
    for start in range(0, len(ordered), size):
        chunk = ordered[start : start + size]
        missing = list(dict.fromkeys(groups[r] for r in chunk if groups[r] not in where))
        if missing:
            heads = [first_row[g] for g in missing]
            keys, values = prefix_forward(decoder, rollouts.input_ids[heads, left : p - 1], rollouts.attention_mask[heads, left : p - 1])
            graph = keys + values if with_grad else None
            if with_grad:  # fp32 leaves: a bf16 prefix's gradient is summed over its samples in fp32 (as MasterWeights does);
                # one whose states depend on no trainable weight (layer 0's keys with LoRA on q_proj, v_proj only) takes none
                keys = [k.detach().float().requires_grad_(k.requires_grad) for k in keys]
                values = [v.detach().float().requires_grad_(v.requires_grad) for v in values]
            batch = _PrefixBatch(keys, values, graph, remaining=sum(members[g] for g in missing))
            alive.append(batch)
            where.update((g, (batch, i)) for i, g in enumerate(missing))
        part = rollouts.rows(chunk)
        t = part.response_mask.shape[1]
        sources = [where[groups[r]] for r in chunk]
        keys, values = _expand(sources, dtype)
        index = torch.as_tensor(chunk, device=rollouts.input_ids.device)
        hidden = suffix_hidden(decoder, rollouts.input_ids[index, p - 1 : p + t], rollouts.attention_mask[index, left : p + t], keys, values)
        yield MicroBatch(rows=chunk, part=part, hidden=hidden[:, :t])  # (b, t, d)
        for batch, _ in sources:
            batch.remaining -= 1
        for batch in [b for b in alive if b.remaining == 0]:
            alive.remove(batch)
            if with_grad:
                pairs = [(out, leaf.grad.to(out.dtype)) for out, leaf in zip(batch.graph, batch.keys + batch.values) if leaf.grad is not None]
                if pairs:
                    torch.autograd.backward([out for out, _ in pairs], [g for _, g in pairs])  # the prefix's backward, once
                    if on_prefix_grad is not None:
                        on_prefix_grad()
            batch.keys = batch.values = batch.graph = None


def _expand(sources: list[tuple[_PrefixBatch, int]], dtype: torch.dtype) -> tuple[list[Tensor], list[Tensor]]:
    """Each sample's group prefix, stacked, in the model's dtype: per layer (b, heads, C, head_dim)."""
    batches = list(dict.fromkeys(id(b) for b, _ in sources))
    by_id = {id(b): b for b, _ in sources}
    offset, base = 0, {}
    for i in batches:
        base[i] = offset
        offset += by_id[i].keys[0].shape[0]
    index = torch.tensor([base[id(b)] + row for b, row in sources], device=by_id[batches[0]].keys[0].device)
    layers = len(by_id[batches[0]].keys)
    if len(batches) == 1:
        only = by_id[batches[0]]
        return [only.keys[l].index_select(0, index).to(dtype) for l in range(layers)], [only.values[l].index_select(0, index).to(dtype) for l in range(layers)]
    keys = [torch.cat([by_id[i].keys[l] for i in batches]).index_select(0, index).to(dtype) for l in range(layers)]
    values = [torch.cat([by_id[i].values[l] for i in batches]).index_select(0, index).to(dtype) for l in range(layers)]
    return keys, values
