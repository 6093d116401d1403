"""logprobs.py: the chunked log-prob/entropy autograd function, and log-probs from hidden states through the output
layer without the (B, T, V) logits (values and gradients against the full softmax in float64; a dispatch-mode
recorder shows no vocabulary-sized tensor is allocated, forward or backward); output_layer / decoder_of."""

import pytest
import torch
from torch.utils import _pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode
from transformers import LlamaConfig, LlamaForCausalLM

from open_instruct2 import logprobs
from open_instruct2.logprobs import decoder_of, hidden_token_logprobs, output_layer, token_logprobs, token_logprobs_entropy

VOCAB, WIDTH = 300, 32


def full_softmax(logits: torch.Tensor, targets: torch.Tensor, temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The definitions: (B, T) log-probs and entropies from the whole (B, T, V) log-softmax."""
    ls = (logits / temperature).log_softmax(-1)
    return ls.gather(-1, targets.unsqueeze(-1)).squeeze(-1), -(ls.exp() * ls).sum(-1)


def tiny_llama(**overrides) -> LlamaForCausalLM:
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=WIDTH, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, max_position_embeddings=64, **overrides)
    config._attn_implementation = "eager"
    torch.manual_seed(0)
    return LlamaForCausalLM(config).double()


def grads(loss: torch.Tensor, tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    return list(torch.autograd.grad(loss, tensors))


def chunked_loss(hidden, head, targets, temperatures=(0.7, 1.0)):
    """A loss using every output: both temperatures' log-probs and the entropy (an entropy bonus)."""
    (lp, lp1), h = hidden_token_logprobs(hidden, head, targets, temperatures, entropy=True)
    return (lp * 0.3).sum() + lp1.sum() - 0.1 * h.sum(), (lp, lp1, h)


def full_loss(logits, targets, temperatures=(0.7, 1.0)):
    lp, h = full_softmax(logits, targets, temperatures[0])
    lp1, _ = full_softmax(logits, targets, temperatures[1])
    return (lp * 0.3).sum() + lp1.sum() - 0.1 * h.sum(), (lp, lp1, h)


@pytest.mark.parametrize("bias", [False, True])
def test_hidden_logprobs_match_the_full_softmax_in_float64(monkeypatch, bias):
    """2 x 12 rows of 300 logits, 7 rows a chunk: chunks of 7, 7, 7, 3; two temperatures and the entropy."""
    monkeypatch.setattr(logprobs, "CHUNK_ELEMENTS", 7 * VOCAB + 5)
    torch.manual_seed(0)
    head = torch.nn.Linear(WIDTH, VOCAB, bias=bias).double()
    hidden = torch.randn(2, 12, WIDTH, dtype=torch.float64, requires_grad=True)
    targets = torch.randint(0, VOCAB, (2, 12))
    params = [hidden, *head.parameters()]
    loss, got = chunked_loss(hidden, head, targets)
    want_loss, want = full_loss(head(hidden), targets)
    for g, w in zip(got, want):
        assert g.shape == (2, 12) and g.dtype == torch.float64
        torch.testing.assert_close(g, w, atol=1e-12, rtol=1e-12)
    for g, w in zip(grads(loss, params), grads(want_loss, params)):
        torch.testing.assert_close(g, w, atol=1e-12, rtol=1e-12)
    assert len(params) == (3 if bias else 2)


def test_without_gradients_and_in_one_chunk():
    torch.manual_seed(0)
    head = torch.nn.Linear(WIDTH, VOCAB).double()
    hidden = torch.randn(2, 5, WIDTH, dtype=torch.float64)
    targets = torch.randint(0, VOCAB, (2, 5))
    with torch.no_grad():
        (lp,), h = hidden_token_logprobs(hidden, head, targets, (0.7,), entropy=True)
        (lp_plain,), none = hidden_token_logprobs(hidden, head, targets, (0.7,))
        want_lp, want_h = full_softmax(head(hidden), targets, 0.7)
    assert not lp.requires_grad and none is None
    torch.testing.assert_close(lp, want_lp)
    torch.testing.assert_close(lp_plain, want_lp)
    torch.testing.assert_close(h, want_h)
    x = hidden.clone().requires_grad_()  # one chunk with gradients (the default CHUNK_ELEMENTS)
    loss, _ = chunked_loss(x, head, targets)
    want, _ = full_loss(head(x), targets)
    torch.testing.assert_close(grads(loss, [x, head.weight]), grads(want, [x, head.weight]))


@pytest.mark.parametrize("grad, rows_per_chunk, calls", [(False, 4, 3), (True, 4, 6), (True, 10, 1)])
def test_the_head_runs_once_per_chunk_for_every_temperature(monkeypatch, grad, rows_per_chunk, calls):
    """10 rows: 3 chunks of 4 rows run the head 3 times without gradients, 6 with (each recomputed in the
    backward); one chunk of 10 rows runs it once (no checkpoint, no recompute). Three temperatures, one head call."""
    monkeypatch.setattr(logprobs, "CHUNK_ELEMENTS", rows_per_chunk * VOCAB)
    head = torch.nn.Linear(WIDTH, VOCAB)
    seen = []
    head.register_forward_hook(lambda module, args, out: seen.append(tuple(out.shape)))
    hidden = torch.randn(2, 5, WIDTH, requires_grad=grad)
    targets = torch.randint(0, VOCAB, (2, 5))
    with torch.set_grad_enabled(grad):
        lps, h = hidden_token_logprobs(hidden, head, targets, (0.7, 1.0, 1.3), entropy=True)
        if grad:
            (sum(lp.sum() for lp in lps) + h.sum()).backward()
    assert len(seen) == calls and max(r for r, _ in seen) <= rows_per_chunk


class AllocationRecorder(TorchDispatchMode):
    """The largest fresh tensor (not sharing an input's storage: no views) whose last dimension is `vocab`, in the
    forward and in the backward."""

    def __init__(self, vocab: int):
        super().__init__()
        self.vocab, self.phase, self.largest = vocab, "forward", {"forward": 0, "backward": 0}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {t.untyped_storage().data_ptr() for t in pytree.tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)}
        for t in pytree.tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.dim() and t.shape[-1] == self.vocab and t.untyped_storage().data_ptr() not in inputs:
                self.largest[self.phase] = max(self.largest[self.phase], t.numel())
        return out


def record(compute) -> dict:
    """compute(hidden, head, targets)'s largest fresh vocabulary-last tensor in the forward and the backward, and
    "saved": the logits held for the backward outside any checkpoint (saved-tensor hooks, by storage)."""
    torch.manual_seed(0)
    head = torch.nn.Linear(WIDTH, VOCAB)
    hidden = torch.randn(2, 12, WIDTH, requires_grad=True)
    targets = torch.randint(0, VOCAB, (2, 12))
    recorder, saved = AllocationRecorder(VOCAB), {}
    weights = {p.untyped_storage().data_ptr() for p in head.parameters()}  # the saved (d, V) weight.t() is no logits

    def pack(t):
        if t.dim() and t.shape[-1] == VOCAB and t.untyped_storage().data_ptr() not in weights:
            saved[t.untyped_storage().data_ptr()] = t.numel()
        return t

    with recorder, torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        lps, h = compute(hidden, head, targets)
        loss = sum(lp.sum() for lp in lps) + h.sum()
    recorder.phase = "backward"
    with recorder:
        loss.backward()
    assert hidden.grad is not None and head.weight.grad is not None and head.bias.grad is not None
    return {**recorder.largest, "saved": sum(saved.values())}


def test_no_vocabulary_sized_tensor_forward_or_backward(monkeypatch):
    """B x T x V = 24 x 300 logits, 8 chunks of 3 rows: no tensor of more than one chunk's 900 logits is allocated and
    no logits are held for the backward; the same recorder sees the naive path (head(hidden) then token_logprobs)
    allocate all 7,200 both ways and hold them, and the chunks without their checkpoint hold all 8 chunks."""
    bound = 3 * VOCAB
    monkeypatch.setattr(logprobs, "CHUNK_ELEMENTS", bound)

    def chunked(hidden, head, targets):
        return hidden_token_logprobs(hidden, head, targets, (0.7, 1.0), entropy=True)

    def naive(hidden, head, targets):
        logits = head(hidden)  # (B, T, V)
        lp, h = token_logprobs_entropy(logits, targets, 0.7)
        return [lp, token_logprobs(logits, targets, 1.0)], h

    got = record(chunked)
    assert 0 < got["forward"] <= bound and 0 < got["backward"] <= bound and got["saved"] == 0, got  # the recompute is seen
    full = record(naive)
    assert full["forward"] == full["backward"] == full["saved"] == 24 * VOCAB > bound, full
    monkeypatch.setattr(logprobs, "checkpoint", lambda fn, *args, **kwargs: fn(*args))
    kept = record(chunked)
    assert kept["forward"] <= bound and kept["saved"] == 24 * VOCAB, kept


def test_tied_embeddings_get_the_head_gradient(monkeypatch):
    monkeypatch.setattr(logprobs, "CHUNK_ELEMENTS", 5 * VOCAB)
    model = tiny_llama(tie_word_embeddings=True)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    ids = torch.randint(0, VOCAB, (2, 9))
    params = [p for p in model.parameters()]
    hidden = decoder_of(model)(input_ids=ids).last_hidden_state[:, :-1]  # (2, 8, d): row t predicts ids[:, t + 1]
    loss, got = chunked_loss(hidden, output_layer(model), ids[:, 1:])
    want_loss, want = full_loss(model(input_ids=ids).logits[:, :-1], ids[:, 1:])
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w)
    for g, w in zip(grads(loss, params), grads(want_loss, params)):
        torch.testing.assert_close(g, w)


def test_a_lora_wrapped_head_gets_its_gradient(monkeypatch):
    from peft import LoraConfig, get_peft_model

    monkeypatch.setattr(logprobs, "CHUNK_ELEMENTS", 5 * VOCAB)
    base = tiny_llama(tie_word_embeddings=False)
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj", "lm_head"], init_lora_weights=False))
    head = output_layer(model)
    assert head is base.lm_head and hasattr(head, "lora_A")
    ids = torch.randint(0, VOCAB, (2, 9))
    params = [p for p in model.parameters() if p.requires_grad]
    head_params = [p for name, p in model.named_parameters() if "lm_head.lora_" in name]
    assert len(head_params) == 2
    hidden = decoder_of(model)(input_ids=ids).last_hidden_state[:, :-1]
    loss, got = chunked_loss(hidden, head, ids[:, 1:])
    want_loss, want = full_loss(model(input_ids=ids).logits[:, :-1], ids[:, 1:])
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w)
    got_grads, want_grads = grads(loss, params), grads(want_loss, params)
    for g, w in zip(got_grads, want_grads):
        torch.testing.assert_close(g, w)
    by_id = {id(p): g for p, g in zip(params, got_grads)}
    assert all(by_id[id(p)].abs().sum() > 0 for p in head_params)  # lora_A and lora_B of the head


def test_low_precision_hidden_states_give_fp32_logprobs(monkeypatch):
    monkeypatch.setattr(logprobs, "CHUNK_ELEMENTS", 4 * VOCAB)
    torch.manual_seed(0)
    head = torch.nn.Linear(WIDTH, VOCAB).to(torch.bfloat16)
    hidden = torch.randn(2, 6, WIDTH, dtype=torch.bfloat16)
    targets = torch.randint(0, VOCAB, (2, 6))
    (lp,), h = hidden_token_logprobs(hidden, head, targets, (0.7,), entropy=True)
    want_lp, want_h = full_softmax(head(hidden).float(), targets, 0.7)
    assert lp.dtype == h.dtype == torch.float32
    torch.testing.assert_close(lp, want_lp)
    torch.testing.assert_close(h, want_h)


def test_output_layer_and_decoder_of():
    from peft import LoraConfig, get_peft_model
    from transformers import CohereConfig, CohereForCausalLM, Gemma2Config, Gemma2ForCausalLM

    llama = tiny_llama()
    assert output_layer(llama) is llama.lm_head and isinstance(llama.lm_head, torch.nn.Linear)
    assert decoder_of(llama) is llama.model
    peft = get_peft_model(tiny_llama(), LoraConfig(r=2, target_modules=["q_proj"]))
    assert output_layer(peft) is peft.get_base_model().lm_head and decoder_of(peft) is peft.get_base_model().model
    small = dict(vocab_size=VOCAB, hidden_size=WIDTH, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                 num_key_value_heads=1, head_dim=16)
    assert output_layer(Gemma2ForCausalLM(Gemma2Config(**small))) is None  # tanh soft-cap (30 by default)
    uncapped = Gemma2ForCausalLM(Gemma2Config(**small, final_logit_softcapping=None))
    assert output_layer(uncapped) is uncapped.lm_head
    assert output_layer(CohereForCausalLM(CohereConfig(**small))) is None  # logits * logit_scale (0.0625)
    assert output_layer(CohereForCausalLM(CohereConfig(**small, logit_scale=1.0))) is not None
    capped = tiny_llama()
    capped.config.final_logit_softcapping = 30.0
    assert output_layer(capped) is None
    assert output_layer(torch.nn.Linear(2, 2)) is None and decoder_of(torch.nn.Linear(2, 2)) is None


def test_the_chunked_function_against_autograd(monkeypatch):
    """gradcheck in float64 of the log-probs alone, both outputs, and the entropy alone, over 3 chunks of 2 rows
    (one ragged); a -inf logit (a masked token) leaves the values and gradients finite, equal to the full softmax's."""
    monkeypatch.setattr(logprobs, "CHUNK_ELEMENTS", 2 * 7)
    torch.manual_seed(0)
    logits = torch.randn(1, 5, 7, dtype=torch.float64, requires_grad=True)
    targets = torch.randint(0, 6, (1, 5))
    assert torch.autograd.gradcheck(lambda x: token_logprobs(x, targets, 0.7), (logits,))
    assert torch.autograd.gradcheck(lambda x: token_logprobs_entropy(x, targets, 0.7), (logits,))
    assert torch.autograd.gradcheck(lambda x: token_logprobs_entropy(x, targets, 1.3)[1], (logits,))
    torch.testing.assert_close(token_logprobs(logits, targets, 0.7), full_softmax(logits, targets, 0.7)[0], atol=1e-12, rtol=0)
    masked = logits.detach().clone()
    masked[..., 6] = -torch.inf
    for fn in (lambda x: (token_logprobs(x, targets, 0.7),), lambda x: token_logprobs_entropy(x, targets, 0.7)):
        x = masked.clone().requires_grad_()
        outputs = fn(x)
        sum(o.sum() for o in outputs).backward()
        y = masked.clone().requires_grad_()
        ls = (y / 0.7).log_softmax(-1)
        want = [ls.gather(-1, targets.unsqueeze(-1)).squeeze(-1), -(ls.exp() * ls.nan_to_num(neginf=0.0)).sum(-1)][: len(outputs)]
        sum(w.sum() for w in want).backward()
        for o, w in zip(outputs, want):
            assert torch.isfinite(o).all()
            torch.testing.assert_close(o, w)
        assert torch.isfinite(x.grad).all()
        torch.testing.assert_close(x.grad, y.grad.nan_to_num(0.0))


def test_temperatures_must_be_positive():
    head = torch.nn.Linear(WIDTH, VOCAB)
    with pytest.raises(ValueError, match="temperature"):
        hidden_token_logprobs(torch.randn(1, 2, WIDTH), head, torch.zeros(1, 2, dtype=torch.long), (1.0, 0.0))
    with pytest.raises(ValueError, match="temperature"):
        token_logprobs(torch.randn(1, 2, 5), torch.zeros(1, 2, dtype=torch.long), -1.0)


class HalvedLogits(LlamaForCausalLM):
    """A model whose forward changes the logits after the head, with no config attribute saying so."""

    def forward(self, *args, **kwargs):
        out = super().forward(*args, **kwargs)
        out.logits = out.logits * 0.5
        return out


def test_logits_that_are_not_the_head_of_the_hidden_states_take_the_logits_path():
    """Falcon-H1 multiplies its logits by lm_head_multiplier (µP); a model may scale them in its forward with no
    attribute naming it: output_layer checks once, on 4 tokens, that head(hidden) is the logits, so that both get
    the model's own log-probs (through its logits) rather than silently different ones."""
    from transformers import FalconH1Config, FalconH1ForCausalLM

    from open_instruct2.policy import response_logprobs

    falcon = FalconH1ForCausalLM(FalconH1Config(vocab_size=VOCAB, hidden_size=WIDTH, intermediate_size=64, num_hidden_layers=1,
                                                num_attention_heads=2, num_key_value_heads=1, mamba_d_ssm=32, mamba_n_heads=4,
                                                mamba_d_head=8, mamba_d_state=8, lm_head_multiplier=0.05))
    assert output_layer(falcon) is None and falcon not in logprobs._HEAD_CHECKED  # refused by its config, before any forward
    config = tiny_llama().config
    halved = HalvedLogits(config).double()
    assert output_layer(halved) is None
    assert halved.training  # the check leaves the modules' modes as it found them
    ids = torch.randint(0, VOCAB, (2, 9))
    mask = torch.ones_like(ids)
    got = response_logprobs(halved, ids, mask, 4, temperature=0.7)  # (2, 5)
    with torch.no_grad():
        want, _ = full_softmax(halved(input_ids=ids).logits[:, 3:-1], ids[:, 4:], 0.7)
    torch.testing.assert_close(got.double(), want)
    plain = LlamaForCausalLM(config).double()
    assert output_layer(plain) is plain.lm_head
