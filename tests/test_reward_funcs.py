"""Reward functions (--reward_funcs): loading, calling, combining, the builtins, and through the real entry point on a
conversational TRL-format dataset with the example file (examples/reward_funcs.py)."""

import json
import math
from types import SimpleNamespace

import pytest

from conftest import REPO, assert_one_line_error, run_cli
from open_instruct2.errors import UserError
from open_instruct2.reward_funcs.builtin import builtins, ngram_repetition, soft_overlong_penalty
from open_instruct2.reward_funcs.calling import call_all, check_columns, combine
from open_instruct2.reward_funcs.loading import load

EXAMPLE_DATA = REPO / "examples" / "arithmetic_conversational.jsonl"
EXAMPLE_FUNCS = REPO / "examples" / "reward_funcs.py"
SETTINGS = SimpleNamespace(overlong_buffer_len=4, overlong_penalty_factor=0.5, repetition_ngram_size=2, repetition_max_penalty=-1.0)


def test_soft_overlong_and_repetition_by_hand():
    # limit 10, buffer 4: no penalty up to 6 tokens, then linear to -factor at 10 (and past it)
    assert [soft_overlong_penalty(n, 10, 4, 0.5) for n in (3, 6, 7, 8, 10, 12)] == [0.0, 0.0, -0.125, -0.25, -0.5, -0.5]
    # "a b a b a": bigrams ab ba ab ba -> 2 distinct of 4 -> half repeat
    assert ngram_repetition("a b a b a", 2) == 0.5
    assert ngram_repetition("one two three", 2) == 0.0 and ngram_repetition("one", 2) == 0.0
    fns = builtins(SETTINGS, 10)
    assert fns["soft_overlong"](completion_ids=[[1] * 8, [1] * 2]) == [-0.25, 0.0]
    assert fns["repetition_penalty"](completions=["a b a b a", [{"role": "assistant", "content": "x y"}]]) == [-0.5, 0.0]
    assert fns["think_answer_format"](completions=["<think>r</think><answer>4</answer>", "4"]) == [1.0, 0.0]


def _write(tmp_path, text):
    path = tmp_path / "rewards.py"
    path.write_text(text)
    return str(path)


def test_weighted_sum_none_and_async_by_hand(tmp_path):
    path = _write(tmp_path, '''
import asyncio
def length(completions, **kwargs):
    return [float(len(c)) for c in completions]
async def only_even(completions, parity):
    await asyncio.sleep(0.01)
    return [1.0 if p == "even" else None for p in parity]
def nothing(completions):
    return [None, None, float("nan")]
''')
    funcs = load([f"{path}:length", f"{path}:only_even", f"{path}:nothing"], [0.5, 2.0, 1.0], builtins(SETTINGS, 10))
    assert [f.is_async for f in funcs] == [False, True, False]
    assert funcs[1].accepts == {"completions", "parity"} and funcs[0].accepts is None  # **kwargs: everything
    inputs = {"completions": ["ab", "abcd", "x"], "parity": ["even", "odd", "even"], "prompts": ["p", "q", "r"]}
    results = call_all(funcs, inputs, 3)
    assert results == {"length": [2.0, 4.0, 1.0], "only_even": [1.0, None, 1.0], "nothing": [None, None, None]}
    rewards, counted, metrics, errors = combine(funcs, results, 3)
    assert rewards == [0.5 * 2 + 2.0, 0.5 * 4, 0.5 * 1 + 2.0] and counted == [True, True, True] and not errors
    assert metrics["reward/only_even/mean"] == 1.0 and metrics["reward/only_even/none_fraction"] == pytest.approx(1 / 3)
    assert metrics["reward/length/std"] == pytest.approx(math.sqrt(((2 - 7 / 3) ** 2 + (4 - 7 / 3) ** 2 + (1 - 7 / 3) ** 2) / 3))
    assert "reward/nothing/mean" not in metrics  # nothing returned: no mean at all, never 0
    # a sample every function left out has no reward: it is not counted
    _, counted, _, _ = combine(funcs[1:], {"only_even": [1.0, None, None], "nothing": [None, None, None]}, 3)
    assert counted == [True, False, False]


@pytest.mark.parametrize("body, needle", [
    ("def f(completions):\n    return [1.0]", "returned 1 values for 2 completions"),
    ("def f(completions):\n    return ['good', 1.0]", "returned 'good' (str) for completion 0"),
    ("def f(completions):\n    return 1.0", "returned a float"),
    ("def f(completions):\n    raise KeyError('solution')", "raised KeyError"),
    ("def f(completions):\n    return [float('inf'), 0.0]", "returned inf"),
    ("async def f(completions):\n    raise RuntimeError('judge down')", "raised RuntimeError: judge down"),
])
def test_a_bad_result_is_an_error_naming_the_function(tmp_path, body, needle):
    funcs = load([f"{_write(tmp_path, body)}:f"], None, builtins(SETTINGS, 10))
    result = call_all(funcs, {"completions": ["a", "b"]}, 2)["f"]
    assert isinstance(result, Exception) and "'f'" in str(result) and needle in str(result), result
    _, counted, metrics, errors = combine(funcs, {"f": result}, 2)
    assert counted == [False, False] and metrics["reward/f/errors"] == 1.0 and errors


def test_loading_refusals(tmp_path):
    b = builtins(SETTINGS, 10)
    path = _write(tmp_path, "def f(completions):\n    return [0.0]\nNUMBER = 3\n")
    for specs, weights, needle in [
        (["no_such_builtin"], None, "is not a builtin"),
        ([f"{tmp_path}/missing.py:f"], None, "not found"),
        ([f"{path}:g"], None, "has no 'g'; its functions: f"),
        ([f"{path}:NUMBER"], None, "is a int, not a function"),
        (["not_a_module_xyz.fn"], None, "cannot import 'not_a_module_xyz'"),
        ([f"{path}:f", f"{path}:f"], None, "twice"),
        ([f"{path}:f"], [1.0, 2.0], "--reward_weights has 2 values for 1"),
    ]:
        with pytest.raises(UserError) as e:
            load(specs, weights, b)
        assert needle in str(e.value), (needle, str(e.value))
    funcs = load([f"{path}:f", f"{EXAMPLE_FUNCS}:correct_number"], None, b)
    with pytest.raises(UserError, match="needs 'id', 'solution'"):
        check_columns(funcs, {"answer"}, "data.jsonl row 1")
    with pytest.raises(UserError, match="column 'completions' has the name of an argument"):
        check_columns(funcs, {"completions", "solution", "id"}, "data.jsonl row 1")
    check_columns(funcs, {"solution", "id", "kind"}, "data.jsonl row 1")


def example_args(tmp_path, model_dir, *extra):
    return [
        "--model_name_or_path", model_dir, "--dataset_mixer_list", EXAMPLE_DATA, "1.0", "--reference_mode", "in_process",
        "--num_unique_prompts_rollout", "3", "--num_samples_per_prompt_rollout", "2", "--response_length", "10",
        "--policy_dtype", "float32", "--learning_rate", "1e-3", "--output_dir", tmp_path / "out", "--run_name", "fns",
        "--num_training_steps", "2", "--save_rollouts", "true", "--num_evals", "0", *extra,
    ]


def test_reward_functions_from_a_file_train_on_a_conversational_dataset(tmp_path, tiny_model_dir):
    proc = run_cli(*example_args(tmp_path, tiny_model_dir, "--reward_funcs", f"{EXAMPLE_FUNCS}:correct_number",
                                 f"{EXAMPLE_FUNCS}:brevity", "soft_overlong", "--reward_weights", "1.0", "0.2", "0.5",
                                 "--overlong_buffer_len", "4"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "TRL conversational prompts (prompt is a list of messages); columns for the reward functions: id, kind, solution" in proc.stdout
    assert "rewards: 1 x correct_number + 0.2 x brevity (async) + 0.5 x soft_overlong" in proc.stdout
    run_dir = tmp_path / "out" / "fns"
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    for m in lines:
        for name in ("correct_number", "brevity", "soft_overlong"):
            assert f"reward/{name}/mean" in m and f"reward/{name}/std" in m and m[f"reward/{name}/errors"] == 0.0
        assert "reward/verifier_accuracy" not in m  # no verifier scored anything
    rows = [json.loads(line) for f in sorted((run_dir / "rollouts").iterdir()) for line in f.read_text().splitlines()]
    assert len(rows) == 2 * 6
    data = {r["prompt"][0]["content"]: r for r in map(json.loads, EXAMPLE_DATA.read_text().splitlines())}
    for r in rows:
        parts = r["reward_functions"]
        kind = data[r["prompt"]]["kind"]
        assert (parts["brevity"] is None) == (kind == "word")  # None where the function does not apply
        expected = parts["correct_number"] + 0.2 * (parts["brevity"] or 0.0) + 0.5 * parts["soft_overlong"]
        assert r["reward"] == pytest.approx(expected, abs=1e-6)
        assert parts["soft_overlong"] == pytest.approx(soft_overlong_penalty(r["length"], 10, 4, 1.0))


def test_a_broken_reward_function_is_one_line_naming_it(tmp_path, tiny_model_dir):
    path = _write(tmp_path, "def needs_float(completions, solution):\n    return [s for s in solution]\n")
    proc = run_cli(*example_args(tmp_path, tiny_model_dir, "--reward_funcs", f"{path}:needs_float"))
    assert_one_line_error(proc, "reward function 'needs_float' returned", "(str) for completion 0", "fix the function")
    proc = run_cli(*example_args(tmp_path, tiny_model_dir, "--run_name", "fns2", "--reward_funcs", f"{EXAMPLE_FUNCS}:correct_number",
                                 "--dataset_mixer_list", REPO / "examples" / "rubric_questions.jsonl", "1.0"))
    assert_one_line_error(proc, "reward function 'correct_number' needs 'id', 'solution'")


def test_a_function_from_trl_trains_unchanged(tmp_path, tiny_model_dir):
    proc = run_cli(*example_args(tmp_path, tiny_model_dir, "--reward_funcs", "trl.rewards.think_format_reward", "repetition_penalty",
                                 "--num_training_steps", "1"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    m = json.loads((tmp_path / "out" / "fns" / "metrics.jsonl").read_text().splitlines()[0])
    assert m["reward/think_format_reward/mean"] == 0.0  # a random model writes no <think> block
    assert m["reward/think_format_reward/errors"] == 0.0 and "reward/repetition_penalty/mean" in m


def test_the_builtins_pass_on_todays_scores_unchanged():
    """`verifiable` is today's reward (None where the judge answered nothing), `rubric` the judge's score (None elsewhere)."""
    import torch

    from open_instruct2.data import Prompt
    from open_instruct2.reward_funcs import RewardFunctions
    from open_instruct2.rewards import Scores

    funcs = RewardFunctions(load(["verifiable", "rubric"], [1.0, 3.0], builtins(SETTINGS, 10)), max_steps=5)
    assert funcs.needs_base
    base = Scores(rewards=torch.tensor([10.0, 0.0, 0.5]), breakdown={"verifiable": torch.tensor([10.0, 0.0, 0.5])},
                  verifier_scores=torch.tensor([1.0, 0.0, 0.5]), verifier_errors=0, valid=torch.tensor([True, True, False]),
                  rubric_scores=[None, 0.0, None])
    prompts = [Prompt([1], [{"role": "user", "content": "q"}], ["1"], ["gsm8k"], "d.jsonl", 1, columns={"ground_truth": "1", "dataset": "gsm8k"})] * 3
    inputs = funcs.inputs(4, prompts, ["a", "b", "c"], [[1], [2], [3]], ["stop"] * 3, [0, 0, 1], base)
    assert inputs["verifier_rewards"] == [10.0, 0.0, None] and inputs["ground_truth"] == ["1"] * 3
    assert inputs["completions"][0] == [{"role": "assistant", "content": "a"}] and inputs["trainer_state"].global_step == 4
    scores = funcs.score(inputs, base)
    assert scores.rewards.tolist() == [10.0, 0.0, 0.0] and scores.valid.tolist() == [True, True, False]
    assert scores.function_values == {"verifiable": [10.0, 0.0, None], "rubric": [None, 0.0, None]}
    assert torch.equal(scores.verifier_scores, base.verifier_scores)


def test_reward_funcs_verifiable_is_the_default_reward(tmp_path, tiny_model_dir):
    """--reward_funcs verifiable trains exactly as no --reward_funcs (same rewards, same losses, same weights)."""
    from test_train_e2e import tiny_args

    runs = {}
    for name, extra in {"default": [], "listed": ["--reward_funcs", "verifiable"]}.items():
        proc = run_cli(*tiny_args(tmp_path, tiny_model_dir, "--num_training_steps", "2", "--run_name", name, "--beta", "0.1", *extra))
        assert proc.returncode == 0, proc.stderr[-3000:]
        runs[name] = [json.loads(line) for line in (tmp_path / "out" / name / "metrics.jsonl").read_text().splitlines()]
    for a, b in zip(runs["default"], runs["listed"]):
        for key in ("reward/mean", "reward/std", "reward/verifier_accuracy", "train/policy_loss", "train/kl", "train/grad_norm"):
            assert a.get(key) == b.get(key), key
    assert runs["listed"][0]["reward/verifiable/mean"] == runs["listed"][0]["reward/mean"]


def test_async_functions_share_one_loop_and_work_under_a_running_loop(tmp_path):
    """A client bound to the loop of its first call (e.g. AsyncOpenAI) keeps working on later batches, and a caller that is
    itself inside an event loop (a notebook) can score; a file with dataclasses and postponed annotations loads."""
    import asyncio

    path = _write(tmp_path, '''
from __future__ import annotations
import asyncio
from dataclasses import dataclass

@dataclass
class Client:
    loop: object = None

CLIENT = Client()

async def bound(completions):
    loop = asyncio.get_running_loop()
    CLIENT.loop = CLIENT.loop or loop
    if CLIENT.loop is not loop:
        raise RuntimeError("Event loop is closed")
    return [1.0 for _ in completions]
''')
    funcs = load([f"{path}:bound"], None, builtins(SETTINGS, 10))
    assert call_all(funcs, {"completions": ["a"]}, 1) == {"bound": [1.0]}
    assert call_all(funcs, {"completions": ["a", "b"]}, 2) == {"bound": [1.0, 1.0]}

    async def inside_a_loop():
        return call_all(funcs, {"completions": ["c"]}, 1)

    assert asyncio.run(inside_a_loop()) == {"bound": [1.0]}


def test_reward_functions_that_keep_failing_stop_the_run_after_saving(tmp_path, tiny_model_dir):
    path = _write(tmp_path, '''
def flaky(completions, trainer_state):
    if trainer_state.global_step >= 1:  # fine on the first batch, then a server it needs goes away
        raise ConnectionError("sandbox unreachable")
    return [0.5 for _ in completions]
''')
    proc = run_cli(*example_args(tmp_path, tiny_model_dir, "--reward_funcs", f"{path}:flaky", "--num_training_steps", "6",
                                 "--reward_funcs_max_failed_steps", "2", "--checkpoint_state_freq", "1"))
    assert_one_line_error(proc, "every reward function failed for 2 steps in a row (up to step 3)", "checkpoints/step_3")
    assert "reward function 'flaky' raised ConnectionError: sandbox unreachable" in proc.stdout
    lines = [json.loads(line) for line in (tmp_path / "out" / "fns" / "metrics.jsonl").read_text().splitlines()]
    assert [m["reward/functions_failed"] for m in lines] == [0.0, 1.0, 1.0]
    assert lines[1]["rollout/loss_samples"] == 0.0  # nothing rewarded: nothing in the loss, never a made-up 0
