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
from open_instruct2.rollout import generate_rollouts, generate_rows
from open_instruct2.rollout_prefix import cache_expandable, later_rounds_share, padded_rows, prefix_groups, share_prompt_prefill, shared_prefix_for

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


def test_the_packed_generation_copy_samples_the_same_shared_or_not(tiny_model_dir, tokenizer):
    """--generation_linear packed (the CPU default in bf16 on AVX-512): the prefix forward runs the copy's
    pre-packed linear layers, as generate does."""
    from open_instruct2.generation_model import GenerationModel, PackedLinear, packing_available

    if not packing_available():
        pytest.skip("pre-packed linear weights need an x86 CPU with oneDNN")
    policy = lora(confident(AutoModelForCausalLM.from_pretrained(str(tiny_model_dir), dtype=torch.float32)))
    copy = GenerationModel(policy, merged=True, static_width=None, packed=True).model()
    assert any(isinstance(m, PackedLinear) for m in copy.modules()) and cache_expandable(copy)  # (else generate would not share)
    batch = batch_of(tokenizer, [3, 17, 9, 30])
    assert_same_rollouts(sample(copy, tokenizer, batch, False), sample(copy, tokenizer, batch, True))


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


@pytest.mark.parametrize("adapter", [False, True], ids=["full", "lora"])
def test_a_static_cache_is_prefilled_once_too(tiny_model_dir, tokenizer, adapter):
    """generate over a static cache (--generation_cache static; compiled on CUDA, uncompiled here): under `on` the
    prefixes are forwarded once into a static cache, and the rows sample what the per-row prefill samples, stop
    strings included; under auto the engine keeps the per-row prefill there."""
    from open_instruct2.rollout import HFEngine

    model = confident(AutoModelForCausalLM.from_pretrained(str(tiny_model_dir), dtype=torch.float32))
    model = lora(model) if adapter else model
    seen = []
    model.get_input_embeddings().register_forward_pre_hook(lambda module, args: seen.append(tuple(args[0].shape)))
    batch = batch_of(tokenizer, [3, 17])
    per_row = sample(model, tokenizer, batch, False, length=12, static_width=32)
    assert seen[0] == (2 * G, 32)  # generate allocates and fills a static cache itself
    seen.clear()
    shared = sample(model, tokenizer, batch, True, length=12, static_width=32)
    assert seen[:2] == [(2, 31), (2 * G, 1)]  # the prefixes left-padded to the static width, then each row's last column
    assert_same_rollouts(per_row, shared)
    stop = tokenizer.decode(per_row.input_ids[1, 32 + 4 : 32 + 6].tolist())
    assert_same_rollouts(sample(model, tokenizer, batch, False, stop=[stop], length=12, static_width=32),
                         sample(model, tokenizer, batch, True, stop=[stop], length=12, static_width=32))
    seen.clear()
    torch.manual_seed(0)
    auto = HFEngine(model, tokenizer, response_length=12, shared_prefix="auto", temperature=1.0, top_p=0.9, device=torch.device("cpu"),
                    static_width=32).first(batch_of(tokenizer, [20, 30]), G, [])
    assert seen[0] == (2 * G, 32) and auto.prompt_width == 32


def test_no_sharing_with_one_sample(tiny_model_dir, tokenizer):
    model = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir), dtype=torch.float32)
    seen = []
    model.get_input_embeddings().register_forward_pre_hook(lambda module, args: seen.append(tuple(args[0].shape)))
    batch = batch_of(tokenizer, [3, 17])
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
    assert not shared_prefix_for("auto", prompts, 8, static_cache=True) and shared_prefix_for("on", prompts, 8, static_cache=True)
    assert not share_prompt_prefill(4096, 1)
    assert share_prompt_prefill(256, 8)


def batch_of_widths(widths):
    return [Prompt(list(range(1, n + 1)), [], ["1"], ["gsm8k"], "test") for n in widths]


# A tool loop's later rounds: each row is its prompt and its response so far; the rows of a prompt share the prompt
# and whatever their responses still have in common.


def test_prefix_groups_share_the_longest_common_prefix_of_each_prompt():
    rows = [[1, 2, 3, 4, 5], [1, 2, 3, 9], [1, 2, 3, 4, 7, 7], [6, 6, 6], [8, 8, 1, 2], [8, 8, 1, 3]]
    shared, group = prefix_groups(rows, [0, 0, 0, 1, 2, 2])
    assert shared == [3, 3, 3, 2, 3, 3]  # a lone row shares all but its last token with itself
    assert group == [0, 0, 0, 1, 2, 2]
    assert prefix_groups([[1, 2, 3]] * 3, [4, 4, 4]) == ([2, 2, 2], [0, 0, 0])  # identical rows (round 1): all but the last
    assert prefix_groups([[1, 2], [1, 3]], [0, 1]) == ([0, 0], None)  # no prompt with two rows
    assert prefix_groups([[1, 2], [3, 4]], [0, 0]) == ([0, 0], None)  # nothing in common
    ids, mask, C = padded_rows([[1, 2, 3, 4, 5], [1, 2, 9], [6, 6]], [2, 2, 1], pad=0, width=0, device="cpu")
    assert C == 2
    assert ids.tolist() == [[1, 2, 3, 4, 5], [1, 2, 0, 0, 9], [0, 6, 0, 0, 6]]  # prefixes end at C, own tokens at the end
    assert mask.tolist() == [[1, 1, 1, 1, 1], [1, 1, 0, 0, 1], [0, 1, 0, 0, 1]]
    ids, mask, _ = padded_rows([[1, 2, 3], [4]], [0, 0], pad=0, width=4, device="cpu")
    assert ids.tolist() == [[0, 1, 2, 3], [0, 0, 0, 4]]  # nothing shared: left padding, to `width` at least
    ids, mask, C = padded_rows([[1, 2, 3], [1, 2, 4]], [2, 2], pad=0, width=5, device="cpu")
    assert (ids.tolist(), C) == ([[0, 0, 1, 2, 3], [0, 0, 1, 2, 4]], 4)  # a wider (static) width: more left padding


def later_round_rows(tokenizer):
    """Three prompts of different lengths, their rows continued differently: a response in common beyond the prompt
    for two rows of prompt 0, responses of different lengths, and a lone row of prompt 2."""
    prompts = [p.prompt_ids for p in batch_of(tokenizer, [6, 21, 13]).prompts]
    said = tokenizer("<calculator>12 + 30</calculator><output>\n42\n</output>\n#### 42 and then some more words").input_ids
    rows = [prompts[0] + said[:9], prompts[0] + said[:14], prompts[0] + said[:3] + said[20:22], prompts[1] + said[:1],
            prompts[1] + said[5:17], prompts[1] + said[2:8], prompts[2] + said[:11]]
    return rows, [0, 0, 0, 1, 1, 1, 2]


def continue_rows(model, tokenizer, rows, prompt_index, shared, seed=0, length=12):
    torch.manual_seed(seed)
    return generate_rows(model, tokenizer, rows, prompt_index, response_length=length, temperature=1.0, top_p=0.9, stop_strings=None,
                         device=torch.device("cpu"), shared_prefix=shared)


def assert_same_continuations(a, b, atol=1e-4):
    """The generated tokens (the layouts of the given rows differ: middle padding) and all that follows from them."""
    assert torch.equal(a.input_ids[:, a.prompt_width :], b.input_ids[:, b.prompt_width :])
    assert torch.equal(a.response_mask, b.response_mask)
    assert a.finish_reasons == b.finish_reasons and a.response_texts == b.response_texts
    torch.testing.assert_close(a.sampler_logprobs, b.sampler_logprobs, atol=atol, rtol=0)


@pytest.mark.parametrize("adapter", [False, True], ids=["full", "lora"])
def test_later_rounds_sample_what_the_per_row_prefill_samples(tiny_model_dir, tokenizer, adapter):
    model = confident(AutoModelForCausalLM.from_pretrained(str(tiny_model_dir), dtype=torch.float32))
    model = lora(model) if adapter else model
    rows, prompt_index = later_round_rows(tokenizer)
    for seed in (0, 1):
        assert_same_continuations(continue_rows(model, tokenizer, rows, prompt_index, False, seed),
                                  continue_rows(model, tokenizer, rows, prompt_index, True, seed))


def test_later_rounds_forward_each_prompts_common_part_once(tiny_model_dir, tokenizer):
    """The embedding layer sees the U distinct prefixes (U, C), then each row's own columns (N, S), where the per-row
    prefill forwards every row whole (N, W)."""
    model = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir), dtype=torch.float32)
    seen = []
    model.get_input_embeddings().register_forward_pre_hook(lambda module, args: seen.append(tuple(args[0].shape)))
    rows, prompt_index = later_round_rows(tokenizer)
    shared, _ = prefix_groups(rows, prompt_index)
    C, S = max(shared), max(len(r) - k for r, k in zip(rows, shared))
    continue_rows(model, tokenizer, rows, prompt_index, False, length=4)
    assert seen[0] == (7, max(len(r) for r in rows))
    seen.clear()
    continue_rows(model, tokenizer, rows, prompt_index, True, length=4)
    assert seen[:2] == [(3, C), (7, S)]


def test_no_sharing_where_the_layout_would_be_wider_or_forward_more():
    long_prompt, short_prompt = list(range(100, 160)), list(range(200, 210))
    rows = [long_prompt + [1], long_prompt + [2], short_prompt + list(range(50)), short_prompt + list(range(60, 110))]
    # shared: 60 + 50 columns wide, the longest row 60: 1.8 times
    assert prefix_groups(rows, [0, 0, 1, 1]) == ([0] * 4, None)
    assert prefix_groups(rows[:2], [0, 0])[1] == [0, 0]


def test_when_later_rounds_share():
    long, short = list(range(40)), list(range(5))
    assert not later_rounds_share("off", [long, long], [0, 0])
    assert later_rounds_share("on", [short, short], [0, 0]) and not later_rounds_share("on", [long, long], [0, 1])
    assert later_rounds_share("auto", [long] * 4, [0, 0, 1, 1]) and not later_rounds_share("auto", [short] * 4, [0, 0, 1, 1])
    # the prompt with the most rows still going decides (prefix_groups then shares only where columns are saved)
    assert later_rounds_share("auto", [long] * 6, [0, 0, 0, 1, 2, 3]) and not later_rounds_share("auto", [long] * 3, [0, 1, 2])
    assert later_rounds_share("auto", [long, long, short], [0, 0, 1])  # another prompt's short row does not decide


def test_a_tool_loop_with_the_builtin_model_is_the_same_shared_or_not(builtin_model_dir, tokenizer):
    """rollouts_with_tools over HFEngine, the calculator demo's prompt (system prompt and worked examples), with
    --shared_prefix on and off: the same responses, tool calls and outputs; the later rounds forward each prompt's
    common part once."""
    import json

    from open_instruct2.data import tokenize_prompt, with_frame
    from open_instruct2.rollout import HFEngine
    from open_instruct2.tools.loop import ToolUse, rollouts_with_tools
    from open_instruct2.tools.parsers import TagsParser
    from open_instruct2.tools.runner import ToolRunner
    from open_instruct2.tools.calculator import calculator_tool

    model = AutoModelForCausalLM.from_pretrained(str(builtin_model_dir), dtype=torch.float32)
    system = open("examples/calculator_system_prompt.txt").read()
    few_shot = json.load(open("examples/calculator_few_shot.json"))
    questions = ["What is 38 plus 47? Put the final answer after ####.", "Compute 9 times 14. Put the final answer after ####."]
    prompts = [Prompt(tokenize_prompt(tokenizer, with_frame([{"role": "user", "content": q}], system, few_shot)), [], ["1"], ["gsm8k"], "t")
               for q in questions]
    batch = PromptBatch(prompts, [0, 1])
    tools = {"calculator": calculator_tool()}
    use = ToolUse(TagsParser(tools), ToolRunner(tools, 5.0, 2, 200), tokenizer, 2, True)
    seen = []
    model.get_input_embeddings().register_forward_pre_hook(lambda module, args: seen.append(tuple(args[0].shape)))

    def run(mode):
        seen.clear()
        torch.manual_seed(0)
        engine = HFEngine(model, tokenizer, response_length=40, shared_prefix=mode, temperature=1.0, top_p=1.0, device=torch.device("cpu"))
        return rollouts_with_tools(engine, use, batch, num_samples=G, response_length=40, stop_strings=None), list(seen)

    (off, off_seen), (on, on_seen) = run("off"), run("on")
    assert on.stats["tools/calculator/calls"] >= 2  # later rounds happened (the model calls the calculator)
    assert torch.equal(on.input_ids, off.input_ids) and torch.equal(on.response_mask, off.response_mask)
    assert torch.equal(on.tool_mask, off.tool_mask) and on.finish_reasons == off.finish_reasons and on.turns == off.turns
    torch.testing.assert_close(on.sampler_logprobs, off.sampler_logprobs, atol=1e-4, rtol=0)
    P = max(len(p.prompt_ids) for p in prompts)
    assert sum(n * w for n, w in on_seen) < sum(n * w for n, w in off_seen)
    assert any(n <= 2 and w >= P for n, w in on_seen[1:]), on_seen  # a later round's prefixes: one row per prompt, the prompt and more
