"""Per-token log-probs at a sampling temperature, from logits, without a full-size fp32 copy.

    logp[b, t] = z[b, t, y] - logsumexp_v z[b, t, v],   z = logits.float() / temperature

The temperature is the one the rollouts were sampled at: samples come from softmax(logits / T), so the
ratio, the gradient and the KL must use the same distribution (open-instruct, TRL and verl divide too).

The plain way (`(logits.float() / T).log_softmax(-1)`) keeps a (B, T, V) fp32 tensor alive for the
backward pass: 4 bytes per logit on top of the logits themselves, and another copy for the division. Here
the forward and backward work through the logits in chunks of rows, keep only the logits and the (B, T)
log-normaliser, and recompute each chunk's softmax in the backward: the extra memory is one chunk.
Checked against autograd in float64 (tests/test_logprobs.py).

`token_logprobs_entropy` gives the entropy at the same temperature from the same chunks,

    H[b, t] = logsumexp_v z - sum_v p_v z_v,   p = softmax(z),   dH/dz = -p (log p + H),

at the cost of one more exp over each chunk (the softmax); its backward runs only when the entropy has a
gradient (an entropy bonus), and costs one more multiply-add per logit then.
"""

import torch

Tensor = torch.Tensor

CHUNK_ELEMENTS = 1 << 25
"""Logits per chunk (32M: 128 MB in fp32); a chunk holds whole (batch, time) rows of V logits."""


def _chunks(rows: int, vocab: int):
    size = max(1, CHUNK_ELEMENTS // max(vocab, 1))
    for start in range(0, rows, size):
        yield slice(start, min(rows, start + size))


class _TokenLogprobs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits: Tensor, targets: Tensor, temperature: float) -> Tensor:
        flat = logits.reshape(-1, logits.shape[-1])  # (B*T, V), a view
        index = targets.reshape(-1, 1)  # (B*T, 1)
        dtype = torch.promote_types(logits.dtype, torch.float32)  # fp32, or fp64 for fp64 logits
        out = torch.empty(flat.shape[0], dtype=dtype, device=logits.device)  # (B*T,)
        lse = torch.empty_like(out)  # (B*T,)
        for rows in _chunks(flat.shape[0], flat.shape[1]):
            z = flat[rows].to(dtype) / temperature  # (c, V) fp32
            lse[rows] = torch.logsumexp(z, dim=-1)
            out[rows] = z.gather(-1, index[rows]).squeeze(-1) - lse[rows]
        ctx.save_for_backward(logits, targets, lse)
        ctx.temperature = temperature
        return out.view(targets.shape)

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        logits, targets, lse = ctx.saved_tensors
        temperature = ctx.temperature
        flat = logits.reshape(-1, logits.shape[-1])  # (B*T, V)
        index = targets.reshape(-1, 1)
        g_out = grad_out.reshape(-1, 1).to(lse.dtype)  # (B*T, 1)
        grad = torch.empty_like(flat)
        for rows in _chunks(flat.shape[0], flat.shape[1]):
            z = flat[rows].to(lse.dtype) / temperature  # (c, V)
            softmax = torch.exp(z - lse[rows].unsqueeze(-1))  # (c, V)
            g = softmax.mul_(-g_out[rows])  # d logp / d z = onehot(y) - softmax
            g.scatter_add_(-1, index[rows], g_out[rows])
            grad[rows] = g.div_(temperature).to(grad.dtype)  # dz / dlogits = 1 / T
        return grad.view(logits.shape), None, None


def token_logprobs(logits: Tensor, targets: Tensor, temperature: float = 1.0) -> Tensor:
    """logits (B, T, V) in any float dtype, targets (B, T) -> (B, T) fp32 log-probs at `temperature`."""
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    return _TokenLogprobs.apply(logits, targets, float(temperature))


class _TokenLogprobsEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits: Tensor, targets: Tensor, temperature: float) -> tuple[Tensor, Tensor]:
        ctx.set_materialize_grads(False)  # an entropy used only as a metric has no gradient: its backward share is skipped
        flat = logits.reshape(-1, logits.shape[-1])  # (B*T, V)
        index = targets.reshape(-1, 1)
        dtype = torch.promote_types(logits.dtype, torch.float32)
        out = torch.empty(flat.shape[0], dtype=dtype, device=logits.device)  # (B*T,)
        lse, entropy = torch.empty_like(out), torch.empty_like(out)
        for rows in _chunks(flat.shape[0], flat.shape[1]):
            z = (flat[rows].to(dtype) / temperature).clamp_min_(torch.finfo(dtype).min)  # (c, V); a -inf logit (a masked token) -> 0 * min, not nan
            top = z.amax(dim=-1, keepdim=True)  # (c, 1)
            e = torch.sub(z, top).exp_()  # (c, V) one exp serves the normaliser and the entropy
            total = e.sum(dim=-1)  # (c,)
            lse[rows] = top.squeeze(-1) + total.log()
            out[rows] = z.gather(-1, index[rows]).squeeze(-1) - lse[rows]
            entropy[rows] = lse[rows] - torch.linalg.vecdot(e, z) / total  # logsumexp - E_p[z]
        ctx.save_for_backward(logits, targets, lse, entropy)
        ctx.temperature = temperature
        return out.view(targets.shape), entropy.view(targets.shape)

    @staticmethod
    def backward(ctx, grad_logprobs: Tensor | None, grad_entropy: Tensor | None):
        logits, targets, lse, entropy = ctx.saved_tensors
        if grad_logprobs is None and grad_entropy is None:
            return None, None, None
        temperature = ctx.temperature
        flat = logits.reshape(-1, logits.shape[-1])
        index = targets.reshape(-1, 1)
        g_lp = None if grad_logprobs is None else grad_logprobs.reshape(-1, 1).to(lse.dtype)  # (B*T, 1)
        g_h = None if grad_entropy is None else grad_entropy.reshape(-1, 1).to(lse.dtype)
        grad = torch.empty_like(flat)
        for rows in _chunks(flat.shape[0], flat.shape[1]):
            log_p = (flat[rows].to(lse.dtype) / temperature).clamp_min_(torch.finfo(lse.dtype).min).sub_(lse[rows].unsqueeze(-1))  # (c, V), fresh
            softmax = torch.exp(log_p)
            if g_h is None:  # the entropy is a metric only: the log-probs' backward alone
                g = softmax.mul_(-g_lp[rows])
            else:  # dH/dz = -p (log p + H), and d logp_y / dz = onehot(y) - p
                g = log_p.add_(entropy[rows].unsqueeze(-1)).mul_(-g_h[rows])
                if g_lp is not None:
                    g.sub_(g_lp[rows])
                g.mul_(softmax)
            if g_lp is not None:
                g.scatter_add_(-1, index[rows], g_lp[rows])
            grad[rows] = g.div_(temperature).to(grad.dtype)
        return grad.view(logits.shape), None, None


def token_logprobs_entropy(logits: Tensor, targets: Tensor, temperature: float = 1.0) -> tuple[Tensor, Tensor]:
    """logits (B, T, V), targets (B, T) -> ((B, T) log-probs, (B, T) entropies), both fp32 at `temperature`."""
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    return _TokenLogprobsEntropy.apply(logits, targets, float(temperature))
