"""Shared prefix in HF generation: each prompt prefilled once for its G samples, the same rollouts as the per-row
prefill (same seed: same tokens, stops, finish reasons; sampler log-probs within rounding), full and LoRA.

The random tiny model is almost uniform over 49k tokens: there the inverse-CDF draw flips between two neighbouring
tokens on a rounding-sized (1e-7) difference of the cumulative sums, about once in a few hundred draws. A trained
model's distribution is peaked, so the token comparisons use the tiny model with its (tied) embedding scaled up
(`confident`: mean sampled log-prob ~ -1), and the builtin model; the near-uniform model's logits are compared directly.
"""

import pytest
import torch
from transformers import AutoModelForCausalLM

from open_instruct2.data import Prompt, PromptBatch
from open_instruct2.rollout import generate_rollouts, share_prompt_prefill, shared_prefix_for

G = 4


def batch_of(tokenizer, lengths: list[int]) -> PromptBatch:
    """Prompts of exactly these token counts (different: left padding), cut from one text."""
    ids = tokenizer("The quick brown fox jumps over the lazy dog. " * 20).input_ids
    prompts = [Prompt(ids[7 * i : 7 * i + n], [], ["1"], ["gsm8k"], "test") for i, n in enumerate(lengths)]
    return PromptBatch(prompts, list(range(len(prompts))))


def sample(model, tokenizer, batch, shared, seed=0, stop=None, length=16, top_p=0.9, static_width=None):
    torch.manual_seed(seed)
    return generate_rollouts(model, tokenizer, batch, num_samples=G, response_length=length, temperature=1.0, top_p=top_p,
                             stop_strings=stop, device=torch.device("cpu"), static_width=static_width, shared_prefix=shared)


def assert_same_rollouts(a, b, atol=1e-4):
    assert torch.equal(a.input_ids, b.input_ids)
    assert torch.equal(a.attention_mask, b.attention_mask) and torch.equal(a.response_mask, b.response_mask)
    assert a.finish_reasons == b.finish_reasons and a.response_texts == b.response_texts and a.prompt_width == b.prompt_width
    torch.testing.assert_close(a.sampler_logprobs, b.sampler_logprobs, atol=atol, rtol=0)


def confident(model):
    with torch.no_grad():
        model.get_input_embeddings().weight.mul_(12)  # tied: the logits spread 12x (the final norm undoes the input side)
    return model


def lora(model):
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(1)
    policy = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "gate_proj"], lora_dropout=0.0))
    for name, p in policy.named_parameters():
        if "lora_B" in name:
            p.data.normal_(0, 0.5)  # a non-zero adapter: the LoRA path changes the logits
    return policy


@pytest.mark.parametrize("adapter", [False, True], ids=["full", "lora"])
def test_shared_prefill_samples_what_the_per_row_prefill_samples(tiny_model_dir, tokenizer, adapter):
    model = confident(AutoModelForCausalLM.from_pretrained(str(tiny_model_dir), dtype=torch.float32))
    model = lora(model) if adapter else model
    batch = batch_of(tokenizer, [3, 17, 9, 30])
    assert_same_rollouts(sample(model, tokenizer, batch, False), sample(model, tokenizer, batch, True))


def test_builtin_model_samples_the_same(builtin_model_dir, tokenizer):
    model = AutoModelForCausalLM.from_pretrained(str(builtin_model_dir), dtype=torch.float32)
    batch = batch_of(tokenizer, [5, 21, 12])
    assert_same_rollouts(sample(model, tokenizer, batch, False, length=12), sample(model, tokenizer, batch, True, length=12))


def test_the_near_uniform_model_gets_the_same_logits(tiny_model_dir, tokenizer, monkeypatch):
    """What the Sampler is given at the first step (the prefill's last column; every row's own distribution)."""
    from open_instruct2 import rollout

    model = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir), dtype=torch.float32)
    seen, draw = [], rollout.Sampler.__call__
    monkeypatch.setattr(rollout.Sampler, "__call__", lambda self, ids, scores: (seen.append(scores.clone()), draw(self, ids, scores))[1])
    batch = batch_of(tokenizer, [3, 17, 9, 30])
    sample(model, tokenizer, batch, False, length=1)
    sample(model, tokenizer, batch, True, length=1)
    per_row, shared = seen
    assert per_row.shape == (4 * G, len(tokenizer))
    torch.testing.assert_close(shared, per_row, atol=1e-5, rtol=0)


def test_stop_strings_and_eos_stop_the_same_rows(tiny_model_dir, tokenizer):
    model = confident(AutoModelForCausalLM.from_pretrained(str(tiny_model_dir), dtype=torch.float32))
    batch = batch_of(tokenizer, [4, 19, 11])
    free = sample(model, tokenizer, batch, False, length=24)
    P = free.prompt_width
    # a stop string from the middle of sample 1's response (so some rows stop on it and others run to the end)
    stop = tokenizer.decode(free.input_ids[1, P + 6 : P + 8].tolist())
    per_row, shared = sample(model, tokenizer, batch, False, stop=[stop], length=24), sample(model, tokenizer, batch, True, stop=[stop], length=24)
    assert_same_rollouts(per_row, shared)
    assert "stop" in shared.finish_reasons and "length" in shared.finish_reasons
    assert shared.response_texts[1].endswith(stop)


def test_each_prompt_is_prefilled_once(tiny_model_dir, tokenizer):
    """The embedding layer sees every token the model forwards: N x P in the per-row prefill, U x (P - 1) + N with
    the shared one (generate forwards only the column the cache lacks), then N per decoding step in both."""
    model = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir), dtype=torch.float32)
    seen = []
    model.get_input_embeddings().register_forward_pre_hook(lambda module, args: seen.append(tuple(args[0].shape)))
    batch = batch_of(tokenizer, [3, 17, 9])
    U, N, P, steps = 3, 3 * G, 17, 16
    sample(model, tokenizer, batch, False, length=steps)
    assert seen == [(N, P)] + [(N, 1)] * (steps - 1)
    seen.clear()
    sample(model, tokenizer, batch, True, length=steps)
    assert seen == [(U, P - 1)] + [(N, 1)] * steps


def test_no_sharing_with_a_static_cache_or_one_sample(tiny_model_dir, tokenizer):
    model = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir), dtype=torch.float32)
    seen = []
    model.get_input_embeddings().register_forward_pre_hook(lambda module, args: seen.append(tuple(args[0].shape)))
    batch = batch_of(tokenizer, [3, 17])
    sample(model, tokenizer, batch, True, length=4, static_width=32)  # generate allocates and fills a static cache itself
    assert seen[0] == (2 * G, 32)
    seen.clear()
    torch.manual_seed(0)
    generate_rollouts(model, tokenizer, batch, num_samples=1, response_length=4, temperature=1.0, top_p=1.0, stop_strings=None,
                      device=torch.device("cpu"), greedy=True, shared_prefix=True)
    assert seen[0] == (2, 17)


def test_when_generation_shares():
    prompts = batch_of_widths([5, 300])
    assert not shared_prefix_for("off", prompts, 8)
    assert shared_prefix_for("on", prompts, 2) and not shared_prefix_for("on", prompts, 1)
    assert shared_prefix_for("auto", prompts, 8) == share_prompt_prefill(300, 8)
    assert not shared_prefix_for("auto", batch_of_widths([3]), 8) and shared_prefix_for("on", batch_of_widths([3]), 8)
    assert not share_prompt_prefill(4096, 1)
    assert share_prompt_prefill(256, 8)


def batch_of_widths(widths):
    return [Prompt(list(range(1, n + 1)), [], ["1"], ["gsm8k"], "test") for n in widths]
