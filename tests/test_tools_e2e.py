"""Tool use through the real entry point: a model that calls the calculator (tests/tool_model.py: the builtin model
after a short fine-tune), trained with tools on HF generate (both call formats, your own module, an MCP server) and
on the suite's vLLM server; the start-up refusals; and a stopped run with tools resumed bit for bit."""

import json
import os
import sys

import pytest
import torch

from conftest import REPO, assert_one_line_error, run_cli
from tool_model import JSON_SYSTEM, TAGS_SYSTEM, rows, train_tool_caller

CALLER_VERSION = "tool_caller_v1"


@pytest.fixture(scope="session")
def tool_caller_dir(builtin_model_dir):
    """Trained once (~80 s on 2 cores) and kept in the suite's cache folder."""
    out = os.path.join(os.environ["OPEN_INSTRUCT2_CACHE"], CALLER_VERSION)
    if not os.path.exists(os.path.join(out, "config.json")):
        train_tool_caller(str(builtin_model_dir), out + ".tmp")
        os.replace(out + ".tmp", out)
    return out


def tool_args(tmp_path, model, system, *extra):
    data = tmp_path / "rows.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows(8, 1)))
    (tmp_path / "system.txt").write_text(system)
    return ["--model_name_or_path", model, "--dataset_mixer_list", data, "1.0", "--system_prompt_file", tmp_path / "system.txt",
            "--num_unique_prompts_rollout", "2", "--num_samples_per_prompt_rollout", "2", "--response_length", "48", "--num_training_steps", "2",
            "--train_mode", "lora", "--learning_rate", "1e-4", "--reference_mode", "none", "--beta", "0", "--policy_dtype", "float32",
            "--gradient_checkpointing", "false", "--filter_zero_std_groups", "false", "--num_evals", "0", "--save_rollouts", "true",
            "--output_dir", tmp_path / "out", "--run_name", "r", *extra]


def metrics_of(tmp_path):
    return [json.loads(line) for line in (tmp_path / "out" / "r" / "metrics.jsonl").read_text().splitlines() if '"reward/mean"' in line]


def dumped(tmp_path, step=1):
    return [json.loads(line) for line in (tmp_path / "out" / "r" / "rollouts" / f"step_{step}.jsonl").read_text().splitlines()]


def assert_called_and_masked(tmp_path, call_text):
    metrics = metrics_of(tmp_path)
    assert len(metrics) == 2 and all(m["tools/calls_per_response"] >= 0.75 for m in metrics), metrics
    assert all(m["train/optimizer_steps"] == 1 for m in metrics)
    samples = dumped(tmp_path)
    called = [s for s in samples if s["turns"][0]["call"] is not None]
    assert called, samples
    for s in called:
        assert call_text in s["turns"][0]["text"] and s["turns"][0]["output"]  # the call, and the output it got back
        assert s["tool_output_tokens"] > 0 and s["trained_tokens"] + s["tool_output_tokens"] == s["length"]  # output in the sequence, not trained
    return metrics, samples


def test_a_calculator_run_with_tags_on_hf_generate(tmp_path, tool_caller_dir):
    proc = run_cli(*tool_args(tmp_path, tool_caller_dir, TAGS_SYSTEM, "--tools", "calculator"), timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    metrics, samples = assert_called_and_masked(tmp_path, "<calculator>")
    assert all(m["tools/calculator/calls"] >= 3 and m["tools/errors"] == 0 for m in metrics)
    assert sum(s["verifier_score"] for s in samples) >= 3  # the answer after the output is what was scored


def test_the_builtin_model_calls_the_calculator_when_shown_worked_examples(tmp_path, builtin_model_dir):
    """The demo's framing on the untuned builtin: its system prompt plus examples/calculator_few_shot.json as earlier
    turns (BENCHMARKS.md: 82% of answers called the tool, against 1% with the system prompt alone)."""
    args = tool_args(tmp_path, str(builtin_model_dir), (REPO / "examples" / "calculator_system_prompt.txt").read_text(), "--tools", "calculator",
                     "--few_shot_file", REPO / "examples" / "calculator_few_shot.json", "--num_samples_per_prompt_rollout", "4",
                     "--num_training_steps", "1")
    proc = run_cli(*args, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    metrics = metrics_of(tmp_path)
    assert len(metrics) == 1 and metrics[0]["tools/calculator/calls"] >= 2, metrics  # of 8 answers
    samples = dumped(tmp_path)
    assert all("23 plus 19" not in s["prompt"] for s in samples)  # the examples frame the row's question; they are not it
    assert any(s["turns"][0]["call"] is not None and s["tool_output_tokens"] > 0 for s in samples)


def test_the_json_format_with_the_chat_template(tmp_path, tool_caller_dir):
    proc = run_cli(*tool_args(tmp_path, tool_caller_dir, JSON_SYSTEM, "--tools", "calculator", "--tool_parser", "json"), timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    _, samples = assert_called_and_masked(tmp_path, "<tool_call>")
    assert any(s["turns"][0]["call"]["arguments"]["expression"].count("+") == 1 for s in samples if s["turns"][0]["call"])


def test_your_own_tool_module_and_its_faults_are_counted(tmp_path, tool_caller_dir):
    """A module's `calculator` replaces the builtin; it raises on odd sums: those calls are errors the model reads, the run goes on."""
    module = tmp_path / "my_tools.py"
    module.write_text(
        "def calculator(expression: str) -> str:\n"
        '    """Adds integers.\n\n    Args:\n        expression: integers joined by +\n    """\n'
        "    total = sum(int(x) for x in expression.split('+'))\n"
        f"    open({str(tmp_path / 'calls.txt')!r}, 'a').write(expression + '\\n')\n"
        "    if total % 2:\n        raise ValueError(f'odd total {total}')\n"
        "    return str(total)\n")
    proc = run_cli(*tool_args(tmp_path, tool_caller_dir, TAGS_SYSTEM, "--tool_module", module), timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    metrics, samples = assert_called_and_masked(tmp_path, "<calculator>")
    calls = (tmp_path / "calls.txt").read_text().splitlines()
    assert len(calls) == sum(m["tools/calculator/calls"] for m in metrics)  # our function ran for every counted call
    errors = [s for s in samples if s["turns"][0]["output"] and "ValueError: odd total" in s["turns"][0]["output"]]
    assert sum(m["tools/errors"] for m in metrics) >= len(errors)
    assert errors or all(sum(map(int, c.split("+"))) % 2 == 0 for c in calls)


def test_an_mcp_servers_tools(tmp_path, tool_caller_dir):
    import psutil

    command = f"{sys.executable} {REPO / 'tests' / 'mcp_example_server.py'}"
    proc = run_cli(*tool_args(tmp_path, tool_caller_dir, TAGS_SYSTEM, "--mcp_server_command", command), timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    metrics, _ = assert_called_and_masked(tmp_path, "<calculator>")
    assert all(m["tools/calculator/calls"] >= 3 and m["tools/errors"] == 0 for m in metrics)
    assert not [p for p in psutil.process_iter(["cmdline"]) if "mcp_example_server.py" in " ".join(p.info["cmdline"] or [])]


@pytest.mark.parametrize("parser, system, call_text", [("tags", TAGS_SYSTEM, "<calculator>"), ("json", JSON_SYSTEM, "<tool_call>")])
def test_tools_on_the_vllm_rollout_server(vllm_server, builtin_model_dir, tmp_path, tool_caller_dir, monkeypatch, parser, system, call_text):
    """The suite's server takes the tool caller's weights (merged LoRA sync) and samples every round from token ids,
    in either call format (json: the results rendered by the chat template as tool messages, then tokenized)."""
    from test_rollout_vllm import restore_builtin_weights
    from vllm_fixtures import API_KEY

    monkeypatch.setenv("OPEN_INSTRUCT2_ROLLOUT_API_KEY", API_KEY)
    try:
        proc = run_cli(*tool_args(tmp_path, tool_caller_dir, system, "--tools", "calculator", "--tool_parser", parser, "--rollout_backend", "vllm",
                                  "--rollout_vllm_endpoint", vllm_server, "--temperature", "1.0"), timeout=900)
    finally:
        restore_builtin_weights(vllm_server, builtin_model_dir)
    assert proc.returncode == 0, proc.stderr[-3000:]
    metrics, _ = assert_called_and_masked(tmp_path, call_text)
    assert all(m["train/sampler_mismatch_max"] < 1e-3 for m in metrics)  # the server's log-probs of its tokens are the policy's


@pytest.mark.parametrize("flags, needles", [
    (["--tools", "search"], ["--tools search needs --search_corpus"]),
    (["--tools", "search", "--search_corpus", "missing.jsonl"], ["missing.jsonl"]),
    (["--tool_module", "missing_tools.py"], ["missing_tools.py"]),
    (["--mcp_server_command", "no-such-mcp-server --stdio"], ["no-such-mcp-server"]),
])
def test_start_up_refusals_write_nothing(tmp_path, tiny_model_dir, flags, needles):
    proc = run_cli(*tool_args(tmp_path, tiny_model_dir, TAGS_SYSTEM, *flags), cwd=tmp_path)
    assert_one_line_error(proc, *needles)
    assert not (tmp_path / "out").exists()


def test_a_stopped_tool_run_resumes_bit_identical(tmp_path, tool_caller_dir):
    from conftest import tiny_config
    from test_resume import stopped_after, train_lines, weights

    from open_instruct2 import trainer

    system = tmp_path / "system.txt"
    system.write_text(TAGS_SYSTEM)
    data = tmp_path / "rows.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows(8, 2)))
    common = dict(tools=["calculator"], system_prompt_file=str(system), dataset_mixer_list=[str(data), "1.0"], num_training_steps=3,
                  checkpoint_state_freq=1, num_evals=0, train_mode="lora", lora_r=4, learning_rate=1e-3, beta=0.0, reference_mode="none",
                  num_samples_per_prompt_rollout=2, num_unique_prompts_rollout=1, response_length=40, filter_zero_std_groups=False, save_rollouts=True)
    straight = trainer.train(tiny_config(tmp_path / "a", tool_caller_dir, run_name="s", **common))
    stopped_after(tiny_config(tmp_path / "b", tool_caller_dir, run_name="s", **common), 1)
    resumed = trainer.train(tiny_config(tmp_path / "b", tool_caller_dir, run_name="s", **common))
    a, b = weights(straight), weights(resumed)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    lines = train_lines(resumed)
    assert [m["step"] for m in lines] == [1, 2, 3] and all(m["tools/calls_per_response"] > 0 for m in lines)
    assert [m["tools/calculator/calls"] for m in lines] == [m["tools/calculator/calls"] for m in train_lines(straight)]
