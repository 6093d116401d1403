"""Tool use: the calculator, the two call formats, the runner's fault handling, and the multi-turn loop's rules
(budgets, the call limit, masks, the scored answer). The loop's engine here replays scripted continuations (what a
policy would write), so each rule is checked exactly; the real engines (HF generate, the vLLM server) run in
tests/test_tools_e2e.py through the entry point."""

import time

import pytest
import torch

from open_instruct2.data import PromptBatch
from open_instruct2.rollout import Rollouts
from open_instruct2.tools.base import Tool, ToolError, string_tool
from open_instruct2.tools.calculator import calculator_tool, evaluate, format_number
from open_instruct2.tools.loop import ToolUse, rollouts_with_tools
from open_instruct2.tools.parsers import JsonParser, TagsParser
from open_instruct2.tools.runner import ToolRunner


@pytest.mark.parametrize("expression, value", [("19 + 24", "43"), ("7 / 2", "3.5"), ("(3 + 4) * 5", "35"), ("2 ** 10", "1024"),
                                               ("10 / 4 * 2", "5"), ("-5 - -3", "-2"), ("17 % 5", "2"), ("1 / 3", "0.3333333333"),
                                               ("19 × 3", "57"), ("2^3", "8")])
def test_the_calculator_computes(expression, value):
    assert format_number(evaluate(expression)) == value


@pytest.mark.parametrize("expression, needle", [("__import__('os').system('true')", "not Call"), ("x + 1", "not Name"),
                                                ("'a' * 3", "not Constant"), ("2 ** 100000", "exponent"), ("1 / 0", "division by zero"),
                                                ("10 ** 40", "reasonable size"), ("", "empty"), ("1 +", "not an arithmetic expression")])
def test_the_calculator_refuses_what_is_not_arithmetic(expression, needle):
    with pytest.raises(ToolError, match=needle):
        evaluate(expression)


def tags_parser():
    add = Tool("add", "adds", {"type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}}, "required": ["a", "b"]},
               lambda args: str(args["a"] + args["b"]))
    return TagsParser({"calculator": calculator_tool(), "add": add})


def test_the_tags_parser_finds_the_call_a_segment_ends_with():
    parser = tags_parser()
    assert set(parser.stop_strings) == {"</calculator>", "</add>"}
    call = parser.find_call("Let me compute. <calculator> 19 + 24 </calculator>\n")
    assert (call.name, call.arguments, call.problem) == ("calculator", {"expression": "19 + 24"}, None)
    assert parser.find_call('<add>{"a": 2, "b": 3}</add>').arguments == {"a": 2, "b": 3}  # several arguments: a JSON object
    assert parser.find_call("no call here") is None
    assert parser.find_call("<calculator>1+1</calculator><").arguments == {"expression": "1+1"}  # what the tag's last token carried
    assert parser.find_call("<calculator>1+1</calculator> and then more text") is None  # not at the end: not a finished call
    assert "opening tag" in parser.find_call("19 + 24</calculator>").problem
    assert "JSON object" in parser.find_call("<add>2, 3</add>").problem
    assert parser.output_text("43") == "<output>\n43\n</output>\n"


QWEN_LIKE_TEMPLATE = (  # the shape of Qwen2.5's: tools in the system turn, a tool result as a user turn in <tool_response>
    "{% if tools %}<|im_start|>system\nTools: {{ tools | tojson }}<|im_end|>\n{% endif %}"
    "{% for m in messages %}"
    "{% if m.role == 'tool' %}<|im_start|>user\n<tool_response>\n{{ m.content }}\n</tool_response><|im_end|>\n"
    "{% else %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def test_the_json_parser_reads_tool_calls_and_renders_results_with_the_template(tokenizer):
    tok = tokenizer.__class__.from_pretrained(tokenizer.name_or_path)
    tok.chat_template = QWEN_LIKE_TEMPLATE
    parser = JsonParser({"calculator": calculator_tool()}, tok)
    call = parser.find_call('Sure.\n<tool_call>\n{"name": "calculator", "arguments": {"expression": "6 * 7"}}\n</tool_call>')
    assert (call.name, call.arguments) == ("calculator", {"expression": "6 * 7"})
    assert parser.find_call('<tool_call>{"name": "calculator", "arguments": "{\\"expression\\": \\"1\\"}"}</tool_call>').arguments == {"expression": "1"}
    assert "not valid JSON" in parser.find_call("<tool_call>{name: calculator}</tool_call>").problem
    assert parser.find_call("just text") is None
    # what the template writes after the assistant's text when a tool message follows, up to the next assistant header
    assert parser.output_text("42") == "<|im_end|>\n<|im_start|>user\n<tool_response>\n42\n</tool_response><|im_end|>\n<|im_start|>assistant\n"


def test_the_json_parser_refuses_a_template_without_tool_messages(tokenizer):
    from open_instruct2.errors import UserError

    tok = tokenizer.__class__.from_pretrained(tokenizer.name_or_path)
    tok.chat_template = "{% for m in messages %}{% if m.role == 'tool' %}{{ raise_exception('no tools') }}{% endif %}{{ m.content }}{% endfor %}"
    with pytest.raises(UserError, match="--tool_parser tags"):
        JsonParser({"calculator": calculator_tool()}, tok)


def test_the_runner_counts_faults_and_never_fakes_a_result():
    def boom(text):
        raise RuntimeError("disk on fire")

    tools = {"calculator": calculator_tool(), "boom": string_tool("boom", "fails", "x", "anything", boom),
             "slow": string_tool("slow", "sleeps", "x", "seconds", lambda s: time.sleep(float(s)) or "woke"),
             "long": string_tool("long", "talks", "x", "n", lambda n: "y" * int(n))}
    runner = ToolRunner(tools, timeout_s=0.5, max_concurrency=4, max_output_chars=50)
    from open_instruct2.tools.parsers import Call

    calls = [Call("calculator", {"expression": "6 * 7"}), Call("calculator", {"expression": "1 / 0"}), Call("boom", {"x": "1"}),
             Call("slow", {"x": "3"}), Call("nope", {"x": "1"}), Call("calculator", {"wrong": "1"}), Call("calculator", None, "bad JSON"),
             Call("long", {"x": "500"})]
    start = time.perf_counter()
    outcomes = runner.run(calls)
    assert time.perf_counter() - start < 2.5  # the slow call is given up on after its timeout, not waited for
    texts = [o.text for o in outcomes]
    assert texts[0] == "42" and not outcomes[0].error
    assert texts[1] == "error: division by zero"
    assert texts[2] == "error: RuntimeError: disk on fire"
    assert outcomes[3].timeout and "within 0.5 s" in texts[3]
    assert "there is no tool 'nope'" in texts[4]
    assert "wrong arguments for calculator" in texts[5]
    assert texts[6] == "error: bad JSON"
    assert texts[7].startswith("y" * 50) and "[output cut to 50 characters]" in texts[7] and not outcomes[7].error
    stats = runner.stats(responses=4)
    assert stats["tools/errors"] == 6 and stats["tools/timeouts"] == 1 and stats["tools/calls_per_response"] == 2
    assert stats["tools/calculator/calls"] == 4 and stats["tools/unknown/calls"] == 1 and stats["tools/boom/calls"] == 1
    runner.close()


# ---------------------------------------------------------------- the loop, with a scripted policy


class ScriptedEngine:
    """Continues each row with the text `script(row text so far)` returns (sampler log-prob -0.5 per token), stopping
    like an engine does: at a stop string (kept), at eos, or at max_new_tokens."""

    def __init__(self, tokenizer, script):
        self.tok, self.script, self.calls, self.budgets = tokenizer, script, [], []
        self.eos_ids = {tokenizer.eos_token_id}

    def first(self, batch, num_samples, stop_strings):
        rows = [p.prompt_ids for p in batch.prompts for _ in range(num_samples)]
        return self.more(rows, [i for i in range(len(batch.prompts)) for _ in range(num_samples)], [1000] * len(rows), stop_strings)

    def more(self, sequences, prompt_index, budgets, stop_strings):
        self.calls.append(len(sequences))
        self.budgets.append(list(budgets))
        outs, reasons = [], []
        for seq, max_new_tokens in zip(sequences, budgets):
            text = self.script(self.tok.decode(seq))
            cut = min([text.index(s) + len(s) for s in stop_strings if s in text], default=None)
            ids = self.tok.encode(text if cut is None else text[:cut], add_special_tokens=False)
            if cut is None and text.endswith("<eos>"):
                ids = self.tok.encode(text[: -len("<eos>")], add_special_tokens=False) + [self.tok.eos_token_id]
            reason = "length" if len(ids) > max_new_tokens else "stop" if cut is not None or ids[-1:] == [self.tok.eos_token_id] else "length"
            outs.append(ids[:max_new_tokens])
            reasons.append(reason)
        width = max(len(s) for s in sequences)
        span = max(1, max(len(o) for o in outs))
        n = len(sequences)
        input_ids = torch.full((n, width + span), self.tok.pad_token_id)
        attention, response = torch.zeros((n, width + span), dtype=torch.long), torch.zeros((n, span), dtype=torch.long)
        for i, (seq, out) in enumerate(zip(sequences, outs)):
            input_ids[i, width - len(seq) : width] = torch.tensor(seq)
            attention[i, width - len(seq) : width + len(out)] = 1
            if out:
                input_ids[i, width : width + len(out)] = torch.tensor(out)
            response[i, : len(out)] = 1
        return Rollouts(input_ids, attention, response, width, reasons, self.tok.batch_decode(outs, skip_special_tokens=True), list(prompt_index),
                        sampler_logprobs=-0.5 * response.float())


def batch_of(tokenizer, questions):
    from open_instruct2.data import Prompt

    prompts = [Prompt(prompt_ids=tokenizer.encode(q, add_special_tokens=False), messages=[], ground_truth=["0"], verifiers=["gsm8k"], source="test")
               for q in questions]
    return PromptBatch(prompts, list(range(len(prompts))))


def tool_use(tokenizer, max_tool_calls=3, mask=True):
    tools = {"calculator": calculator_tool()}
    return ToolUse(TagsParser(tools), ToolRunner(tools, 5.0, 4, 200), tokenizer, max_tool_calls, mask)


def arithmetic_policy(text: str) -> str:
    """Calls the calculator on the question's expression, then answers with the output it read."""
    if "<output>" not in text:
        return f"Let me compute. <calculator>{text.split('Q:')[1].split('?')[0].strip()}</calculator> this part is cut"
    return f"#### {text.rsplit('<output>', 1)[1].split('</output>')[0].strip()}<eos>"


def test_a_tool_round_trip_masks_the_output_and_scores_the_answer(tokenizer):
    engine = ScriptedEngine(tokenizer, arithmetic_policy)
    use = tool_use(tokenizer)
    out = rollouts_with_tools(engine, use, batch_of(tokenizer, ["Q: 19 + 24?", "Q: 6 * 7?"]), num_samples=2, response_length=64, stop_strings=None)
    assert engine.calls == [4, 4]  # round 1 for all rows, round 2 for the rows that called the tool
    assert out.finish_reasons == ["stop"] * 4
    assert out.answer_texts == ["#### 43", "#### 43", "#### 42", "#### 42"]
    assert out.response_texts[0] == "Let me compute. <calculator>19 + 24</calculator><output>\n43\n</output>\n#### 43"
    assert out.turns[0][0]["call"]["arguments"] == {"expression": "19 + 24"} and out.turns[0][0]["output"] == "<output>\n43\n</output>\n"
    ids = out.input_ids[0, out.prompt_width :].tolist()
    output_ids = tokenizer.encode("<output>\n43\n</output>\n", add_special_tokens=False)
    n_first = len(tokenizer.encode("Let me compute. <calculator>19 + 24</calculator>", add_special_tokens=False))
    assert ids[n_first : n_first + len(output_ids)] == output_ids  # the output's tokens, as appended
    assert out.tool_mask[0, n_first : n_first + len(output_ids)].tolist() == [1] * len(output_ids)
    assert out.response_mask[0, n_first : n_first + len(output_ids)].tolist() == [0] * len(output_ids)  # in the sequence, not in the loss
    assert int(out.response_mask[0].sum()) + int(out.tool_mask[0].sum()) == int(out.response_lengths[0])
    assert (out.attention_mask[0, out.prompt_width :].sum() == out.response_lengths[0])
    assert (out.sampler_logprobs[0] == -0.5 * out.response_mask[0]).all()  # sampler log-probs on the policy's tokens only
    assert out.stats["tools/calculator/calls"] == 4 and out.stats["tools/used_fraction"] == 1.0
    assert out.rows([0, 2]).response_mask.shape[1] == int(out.response_lengths[[0, 2]].max())  # rows() keeps the tool output

    unmasked = rollouts_with_tools(ScriptedEngine(tokenizer, arithmetic_policy), tool_use(tokenizer, mask=False),
                                   batch_of(tokenizer, ["Q: 19 + 24?"]), num_samples=2, response_length=64, stop_strings=None)
    assert torch.equal(unmasked.response_mask[0], unmasked.attention_mask[0, unmasked.prompt_width :])  # --mask_tool_use false


def test_the_call_limit_and_the_length_budget(tokenizer):
    always_calls = ScriptedEngine(tokenizer, lambda text: "<calculator>1 + 1</calculator>")
    out = rollouts_with_tools(always_calls, tool_use(tokenizer, max_tool_calls=2), batch_of(tokenizer, ["Q: 1 + 1?"]), num_samples=2,
                              response_length=200, stop_strings=None)
    assert out.finish_reasons == ["tool_limit"] * 2 and always_calls.calls == [2, 2, 2]  # 2 calls run, the 3rd asked for ends it
    assert out.response_texts[0].count("<output>") == 2 and out.stats["tools/calculator/calls"] == 4
    # response_length bounds the whole response, tool output included
    short = rollouts_with_tools(ScriptedEngine(tokenizer, lambda text: "<calculator>1 + 1</calculator>"), tool_use(tokenizer, max_tool_calls=5),
                                batch_of(tokenizer, ["Q: 1 + 1?"]), num_samples=2, response_length=20, stop_strings=None)
    assert short.finish_reasons == ["length"] * 2 and int(short.response_lengths.max()) == 20
    # a user stop string still ends a response, with no call
    stopped = rollouts_with_tools(ScriptedEngine(tokenizer, lambda text: "The end. STOP <calculator>2</calculator>"), tool_use(tokenizer),
                                  batch_of(tokenizer, ["Q: 2?"]), num_samples=2, response_length=64, stop_strings=["STOP"])
    assert stopped.finish_reasons == ["stop"] * 2 and stopped.stats["tools/calls_per_response"] == 0
    assert stopped.answer_texts == stopped.response_texts  # no tool output: the whole response is the answer


def test_with_the_mask_on_tool_output_gets_no_gradient(tokenizer, tiny_model_dir):
    """The loss's gradient with respect to the logits is zero at every position that predicts a tool-output token."""
    from transformers import AutoModelForCausalLM

    from open_instruct2.losses import LossNorm, grpo_loss
    from open_instruct2.logprobs import token_logprobs

    out = rollouts_with_tools(ScriptedEngine(tokenizer, arithmetic_policy), tool_use(tokenizer), batch_of(tokenizer, ["Q: 19 + 24?"]),
                              num_samples=2, response_length=64, stop_strings=None)
    model = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir), torch_dtype=torch.float32)
    logits = model(input_ids=out.input_ids, attention_mask=out.attention_mask).logits[:, out.prompt_width - 1 : -1].detach().requires_grad_(True)
    logprobs = token_logprobs(logits, out.input_ids[:, out.prompt_width :], 0.7)
    loss, _ = grpo_loss(logprobs, logprobs.detach(), logprobs.detach() + 0.1, torch.tensor([1.0, -1.0]), out.response_mask,
                        LossNorm(num_tokens=int(out.response_mask.sum()), num_sequences=2, max_response_length=64), clip_lower=0.2,
                        clip_higher=0.2, beta=0.1, kl_estimator="kl3", aggregation="token_mean", sampler_logprobs=out.sampler_logprobs,
                        importance_cap=2.0, importance_level="token")
    loss.backward()
    per_position = logits.grad.abs().sum(dim=-1)  # (N, T)
    assert (per_position[out.tool_mask.bool()] == 0).all()
    assert (per_position[out.response_mask.bool()] > 0).any()


def test_each_row_continues_with_its_own_budget_and_an_eos_at_the_limit_is_a_stop(tokenizer):
    """A row further along asks for fewer tokens (a vLLM request beyond the context would be refused)."""
    call = "<calculator>1 + 1</calculator>"
    engine = ScriptedEngine(tokenizer, lambda text: call)
    batch = batch_of(tokenizer, ["Q: 1 + 1?", "Q: a longer question, 2 + 2?"])
    rollouts_with_tools(engine, tool_use(tokenizer, max_tool_calls=2), batch, num_samples=1, response_length=100, stop_strings=None)
    used = len(tokenizer.encode(call, add_special_tokens=False)) + len(tokenizer.encode("<output>\n2\n</output>\n", add_special_tokens=False))
    assert engine.budgets[1] == [100 - used, 100 - used] and engine.budgets[2][0] < engine.budgets[1][0]
    answer = "#### 2"
    n = len(tokenizer.encode(answer, add_special_tokens=False)) + 1  # with eos
    exact = rollouts_with_tools(ScriptedEngine(tokenizer, lambda text: answer + "<eos>"), tool_use(tokenizer), batch_of(tokenizer, ["Q: 2?"]),
                                num_samples=2, response_length=n, stop_strings=None)
    assert exact.finish_reasons == ["stop", "stop"] and int(exact.response_lengths[0]) == n


def test_a_hung_function_does_not_hold_up_later_calls_and_sys_exit_is_an_error():
    import threading

    release = threading.Event()
    tools = {"hang": string_tool("hang", "never answers", "x", "anything", lambda x: release.wait(60) and "late"),
             "quit": string_tool("quit", "exits", "x", "anything", lambda x: exit(3)), "calculator": calculator_tool()}
    from open_instruct2.tools.parsers import Call

    runner = ToolRunner(tools, timeout_s=0.3, max_concurrency=1, max_output_chars=100)
    start = time.perf_counter()
    first = runner.run([Call("hang", {"x": "1"}), Call("hang", {"x": "2"})])
    later = runner.run([Call("calculator", {"expression": "2 + 2"}), Call("quit", {"x": "1"})])
    assert [o.timeout for o in first] == [True, True] and later[0].text == "4"
    assert later[1].error and "SystemExit" in later[1].text
    assert time.perf_counter() - start < 2.0  # the hung threads hold no slot
    assert all(t.daemon for t in threading.enumerate() if t.name.startswith("tool-hang"))  # they never keep the process alive
    release.set()


def test_a_tool_with_an_invalid_argument_schema_is_refused_at_start_up():
    from open_instruct2.errors import UserError
    from open_instruct2.tools import check_schemas

    broken = Tool("broken", "x", {"type": "object", "properties": {"a": {"type": "str"}}}, lambda args: "")
    with pytest.raises(UserError, match="'broken' describes its arguments with an invalid JSON schema"):
        check_schemas({"broken": broken, "calculator": calculator_tool()})
