"""Per-token log-probs (and entropies) at a sampling temperature, from logits or from hidden states, without a
full-size fp32 copy of the logits, and from hidden states without the logits at all.

    logp[b, t] = z[b, t, y] - logsumexp_v z[b, t, v],   z = logits.float() / temperature

The temperature is the one the rollouts were sampled at: samples come from softmax(logits / T), so the
ratio, the gradient and the KL must use the same distribution (open-instruct, TRL and verl divide too).

From logits (`token_logprobs`, `token_logprobs_entropy`). The plain way (`(logits.float() / T).log_softmax(-1)`)
keeps a (B, T, V) fp32 tensor alive for the backward pass: 4 bytes per logit on top of the logits themselves,
and another copy for the division. Here one autograd function works through the logits in chunks of rows,
keeps only the logits and the (B, T) log-normaliser, and recomputes each chunk's softmax in the backward: the
extra memory is one chunk. Its forward takes one max, one exp and one sum per chunk (measured as fast as
logsumexp alone), so the entropy at the same temperature costs one more dot product per row,

    H[b, t] = logsumexp_v z - sum_v p_v z_v,   p = softmax(z),   dH/dz = -p (log p + H),

and its backward takes the entropy's share only when the entropy has a gradient (an entropy bonus), one more
multiply-add per logit then. A -inf logit (a masked token) is clamped to the dtype's lowest value, so the
entropy and its gradient stay finite. Checked against autograd in float64 (tests/test_logprobs_hidden.py).

From hidden states (`hidden_token_logprobs`): the logits themselves are the largest tensor of a pass over a
large vocabulary. Qwen3-0.6B has 151,936 tokens: 8 x 1,024 tokens are 2.5 GB of bf16 logits, before any fp32
copy. As TRL 1.16's fused chunked LM head does, the output layer is applied to chunks of token rows, each
chunk's logits (at most CHUNK_ELEMENTS) go straight into the function above (once per temperature: the head
runs once per chunk) and are dropped; with gradients each chunk is checkpointed, so its logits are recomputed
in the backward rather than kept. The (B, T, V) logits never exist, in the forward or the backward. A single
chunk is not checkpointed (the recompute would be one more head matmul for no memory saved). Any head module
works (a Linear, tied to the input embedding or not, with a bias, wrapped by PEFT LoRA): autograd reaches its
parameters through the checkpoint.

Which models qualify: `output_layer(model)` is the output head of a causal LM (a PeftModel is unwrapped with
get_base_model()), or None when the model's logits are not plain head(hidden): a final soft-cap (Gemma 2/3's
`final_logit_softcapping`), a logit scale (Cohere's `logit_scale`, Granite's `logits_scaling`, Falcon-H1's
`lm_head_multiplier`), a vocabulary slice, no `get_output_embeddings()`, or (checked once per model on 4 tokens)
logits that differ from head(hidden) for a reason no config attribute names. `decoder_of(model)` is the module that returns the last hidden states
(already through the final norm; `.model` of a LlamaForCausalLM), from the base model's `get_decoder()`, or None.
"""

import weakref
from functools import partial

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

Tensor = torch.Tensor

CHUNK_ELEMENTS = 1 << 25
"""Logits per chunk (32M: 128 MB in fp32); a chunk holds whole (batch, time) rows of V logits."""


def _chunk_rows(vocab: int) -> int:
    return max(1, CHUNK_ELEMENTS // max(vocab, 1))


def _chunks(rows: int, vocab: int):
    size = _chunk_rows(vocab)
    for start in range(0, rows, size):
        yield slice(start, min(rows, start + size))


def _scaled(logits: Tensor, dtype: torch.dtype, temperature: float) -> Tensor:
    """(c, V) logits -> a fresh (c, V) z = logits / T in `dtype`, -inf clamped to the lowest finite value (a masked
    token then has p = 0 and p log p = 0, not nan)."""
    return (logits.to(dtype) / temperature).clamp_min_(torch.finfo(dtype).min)


class _ChunkedLogprobs(torch.autograd.Function):
    """(..., V) logits, (...) targets -> (...) log-probs, and (...) entropies when `entropy`; fp32 (fp64 for fp64)."""

    @staticmethod
    def forward(ctx, logits: Tensor, targets: Tensor, temperature: float, entropy: bool):
        ctx.set_materialize_grads(False)  # an output without a gradient (an entropy metric) skips its backward share
        flat = logits.reshape(-1, logits.shape[-1])  # (N, V), a view
        index = targets.reshape(-1, 1)  # (N, 1)
        dtype = torch.promote_types(logits.dtype, torch.float32)
        out = torch.empty(flat.shape[0], dtype=dtype, device=logits.device)  # (N,)
        lse = torch.empty_like(out)  # (N,)
        ent = torch.empty_like(out) if entropy else None  # (N,)
        for rows in _chunks(*flat.shape):
            z = _scaled(flat[rows], dtype, temperature)  # (c, V)
            top = z.amax(dim=-1, keepdim=True)  # (c, 1)
            e = torch.sub(z, top).exp_()  # (c, V): one exp serves the normaliser and the entropy
            total = e.sum(dim=-1)  # (c,)
            lse[rows] = top.squeeze(-1) + total.log()
            out[rows] = z.gather(-1, index[rows]).squeeze(-1) - lse[rows]
            if ent is not None:
                ent[rows] = lse[rows] - torch.linalg.vecdot(e, z) / total  # logsumexp - E_p[z]
        ctx.save_for_backward(logits, targets, lse, ent)
        ctx.temperature = temperature
        if ent is None:
            return out.view(targets.shape)
        return out.view(targets.shape), ent.view(targets.shape)

    @staticmethod
    def backward(ctx, grad_logprobs: Tensor | None, grad_entropy: Tensor | None = None):
        logits, targets, lse, ent = ctx.saved_tensors
        if grad_logprobs is None and grad_entropy is None:
            return None, None, None, None
        temperature = ctx.temperature
        flat = logits.reshape(-1, logits.shape[-1])  # (N, V)
        index = targets.reshape(-1, 1)  # (N, 1)
        g_lp = None if grad_logprobs is None else grad_logprobs.reshape(-1, 1).to(lse.dtype)  # (N, 1)
        g_h = None if grad_entropy is None else grad_entropy.reshape(-1, 1).to(lse.dtype)  # (N, 1)
        grad = torch.empty_like(flat)  # (N, V) in the logits' dtype
        for rows in _chunks(*flat.shape):
            log_p = _scaled(flat[rows], lse.dtype, temperature).sub_(lse[rows].unsqueeze(-1))  # (c, V)
            softmax = torch.exp(log_p)  # (c, V)
            if g_h is None:  # d logp_y / dz = onehot(y) - p
                g = softmax.mul_(-g_lp[rows])
            else:  # dH/dz = -p (log p + H)
                g = log_p.add_(ent[rows].unsqueeze(-1)).mul_(-g_h[rows])
                if g_lp is not None:
                    g.sub_(g_lp[rows])
                g.mul_(softmax)
            if g_lp is not None:
                g.scatter_add_(-1, index[rows], g_lp[rows])
            grad[rows] = g.div_(temperature).to(grad.dtype)  # dz / dlogits = 1 / T
        return grad.view(logits.shape), None, None, None


def _check(temperature: float) -> float:
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    return float(temperature)


def token_logprobs(logits: Tensor, targets: Tensor, temperature: float = 1.0) -> Tensor:
    """logits (B, T, V) in any float dtype, targets (B, T) -> (B, T) fp32 log-probs at `temperature`."""
    return _ChunkedLogprobs.apply(logits, targets, _check(temperature), False)


def token_logprobs_entropy(logits: Tensor, targets: Tensor, temperature: float = 1.0) -> tuple[Tensor, Tensor]:
    """logits (B, T, V), targets (B, T) -> ((B, T) log-probs, (B, T) entropies), both fp32 at `temperature`."""
    return _ChunkedLogprobs.apply(logits, targets, _check(temperature), True)


def _head_logprobs(head: nn.Module, temperatures: tuple[float, ...], entropy: bool, h: Tensor, y: Tensor) -> tuple[Tensor, ...]:
    """One chunk: h (c, d), y (c,) -> (c,) log-probs per temperature, then the (c,) entropy at temperatures[0] if
    `entropy`; the head runs once, its (c, V) logits serve every temperature."""
    logits = head(h)  # (c, V)
    first = _ChunkedLogprobs.apply(logits, y, temperatures[0], entropy)
    first = first if entropy else (first,)
    rest = tuple(_ChunkedLogprobs.apply(logits, y, t, False) for t in temperatures[1:])
    return (first[0], *rest, *first[1:])


def _vocab_size(head: nn.Module) -> int:
    size = getattr(head, "out_features", None)  # nn.Linear and PEFT's wrapped Linear
    return int(size) if size is not None else head.weight.shape[0]


def hidden_token_logprobs(hidden: Tensor, head: nn.Module, targets: Tensor, temperatures: tuple[float, ...],
                          entropy: bool = False) -> tuple[list[Tensor], Tensor | None]:
    """hidden (B, T, d) final hidden states whose row t predicts targets[:, t] (B, T), through `head` (the output
    layer, hidden -> logits) -> ([(B, T) fp32 log-probs at each of `temperatures`], the (B, T) fp32 entropy at
    temperatures[0] if `entropy` else None), from chunks of at most CHUNK_ELEMENTS logits: never the whole
    (B, T, V) logits, in the forward or (with gradients: each chunk recomputed) the backward."""
    temperatures = tuple(_check(t) for t in temperatures)
    if not temperatures:
        raise ValueError("hidden_token_logprobs needs at least one temperature")
    flat = hidden.reshape(-1, hidden.shape[-1])  # (N, d), N = B*T
    index = targets.reshape(-1)  # (N,)
    rows = _chunk_rows(_vocab_size(head))
    fn = partial(_head_logprobs, head, temperatures, entropy)
    recompute = torch.is_grad_enabled() and flat.shape[0] > rows  # one chunk: keep its logits, no second matmul
    pieces = [checkpoint(fn, h, y, use_reentrant=False) if recompute else fn(h, y)
              for h, y in zip(flat.split(rows), index.split(rows))]  # split: one backward cat, not a slice per chunk
    outputs = [torch.cat(parts).view(targets.shape) for parts in zip(*pieces)]  # each (B, T)
    if entropy:
        return outputs[:-1], outputs[-1]
    return outputs, None


_CAPS = ("final_logit_softcapping", "logits_soft_cap", "unpadded_vocab_size")  # plain logits only when None
_SCALES = ("logit_scale", "logits_scaling", "output_multiplier", "lm_head_multiplier")  # plain logits only when None or 1
_HEAD_CHECKED: "weakref.WeakKeyDictionary[nn.Module, tuple[nn.Module, bool]]" = weakref.WeakKeyDictionary()
"""Per base model: (its head, whether its logits were found to equal head(decoder hidden states))."""


def _base(model: nn.Module) -> nn.Module:
    get = getattr(model, "get_base_model", None)  # a PeftModel
    return get() if callable(get) else model


def _plain_logits(owner) -> bool:
    if any(getattr(owner, name, None) is not None for name in _CAPS):
        return False
    scales = (getattr(owner, name, None) for name in _SCALES)
    return all(s is None or (isinstance(s, (int, float)) and s == 1) for s in scales)


def _logits_are_head_of_hidden(base: nn.Module, head: nn.Module) -> bool:
    """Two forwards of 4 tokens: are the model's logits head(decoder's last hidden states), within a few units of
    their dtype's rounding? Catches a scale or cap that no config attribute above names. No, too, for a model that
    cannot run this way (the logits path is then the safe one); running out of memory is raised, not cached."""
    modes = [(m, m.training) for m in base.modules()]
    try:
        embeddings, decoder = base.get_input_embeddings(), decoder_of(base)
        ids = (torch.arange(4) % embeddings.weight.shape[0]).unsqueeze(0).to(embeddings.weight.device)  # (1, 4)
        base.eval()  # no dropout between the two forwards
        with torch.no_grad():
            raw = base(input_ids=ids, use_cache=False).logits  # (1, 4, V)
            mine = head(decoder(input_ids=ids, use_cache=False).last_hidden_state).float()
            logits = raw.float()
            bound = 8 * torch.finfo(raw.dtype).eps * logits.abs().max() + 1e-6
            return mine.shape == logits.shape and bool((mine - logits).abs().max() <= bound)
    except torch.OutOfMemoryError:
        raise
    except Exception:  # noqa: BLE001  (NotImplementedError, a decoder that cannot run alone, meta weights, ...)
        return False
    finally:
        for m, training in modes:
            m.training = training


def output_layer(model: nn.Module) -> nn.Module | None:
    """The output head of a causal LM (its logits are head(decoder hidden states)), or None when they are not:
    a config attribute that changes them (_CAPS, _SCALES), or, checked once per model and head, logits that differ.
    (That check is two 4-token forwards on the first call: forward hooks and dispatch recorders see them.)"""
    base = _base(model)
    config = getattr(base, "config", None)
    owners = [base, config]
    if hasattr(config, "get_text_config"):
        owners.append(config.get_text_config())
    if not all(_plain_logits(o) for o in owners if o is not None):
        return None
    get = getattr(base, "get_output_embeddings", None)
    head = get() if callable(get) else None
    if head is None:
        return None
    checked = _HEAD_CHECKED.get(base)
    if checked is None or checked[0] is not head:  # a head replaced since (a resize, an adapter): checked again
        checked = _HEAD_CHECKED[base] = (head, _logits_are_head_of_hidden(base, head))
    return head if checked[1] else None


def decoder_of(model: nn.Module) -> nn.Module | None:
    """The module whose output's last_hidden_state feeds output_layer(model) (.model of a LlamaForCausalLM), or None."""
    get = getattr(_base(model), "get_decoder", None)
    return get() if callable(get) else None
