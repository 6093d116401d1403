"""Sampled evaluation (pass@k) and the evaluation command (`python -m open_instruct2.evaluate`), through the real
entry points: pass@k against hand-computed values, the end-of-run table, a gsm8k-shaped local dataset with
--prompt_column/--verifier/--ground_truth_column, and the command on a base model and on a trained LoRA run's folder
(the same numbers as the run's own final evaluation)."""

import json
import subprocess
import sys

import pytest

from conftest import REPO, assert_one_line_error, run_cli
from open_instruct2.evaluation import pass_at_k, pass_ks, pass_metrics


def test_pass_at_k_by_hand():
    assert pass_at_k(4, 1, 1) == pytest.approx(0.25)
    assert pass_at_k(4, 1, 2) == pytest.approx(1 - 3 / 6)  # C(3,2) / C(4,2)
    assert pass_at_k(5, 2, 2) == pytest.approx(1 - 3 / 10)  # C(3,2) / C(5,2)
    assert pass_at_k(4, 0, 4) == 0.0 and pass_at_k(4, 3, 2) == 1.0  # n - c < k: some draw has a right one
    assert pass_ks(8) == [1, 2, 4, 8] and pass_ks(6) == [1, 2, 4, 6] and pass_ks(1) == [1]
    # two prompts x 4 answers: 1 right, then 2 right of 3 scored (the judge failed the 4th: left out, not wrong)
    correct = [1, 0, 0, 0, 1, 1, 0, 0]
    scored = [True] * 7 + [False]
    m = pass_metrics(correct, scored, 4)
    assert m["eval/pass@1"] == pytest.approx((1 / 4 + 2 / 3) / 2)
    assert m["eval/pass@2"] == pytest.approx(((1 - 3 / 6) + (1 - 0 / 3)) / 2)  # C(1,2) = 0
    assert m["eval/pass@4"] == pytest.approx(1 - 0)  # only the first prompt has 4 scored answers: C(3,4) = 0
    assert m["eval/mean@4"] == pytest.approx(3 / 7)


def gsm8k_rows(path, n=8):
    rows = [{"question": f"What is {i} + {i + 2}?", "answer": f"{i} plus {i + 2} is {2 * i + 2}.\n#### {2 * i + 2}"} for i in range(n)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def common(tmp_path, model_dir, data, *extra):
    return [
        "--model_name_or_path", model_dir, "--dataset_mixer_list", data, "1.0", "--dataset_mixer_eval_list", data, "6",
        "--reference_mode", "in_process", "--num_unique_prompts_rollout", "2", "--num_samples_per_prompt_rollout", "2",
        "--response_length", "8", "--policy_dtype", "float32", "--learning_rate", "1e-2", "--output_dir", tmp_path / "out",
        "--prompt_column", "question", "--verifier", "gsm8k", "--ground_truth_column", "answer", "--temperature", "1.0", *extra,
    ]


def run_evaluate(*args, timeout=600):
    return subprocess.run([sys.executable, "-m", "open_instruct2.evaluate", *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, cwd=REPO)


def test_a_run_on_gsm8k_shaped_rows_evaluates_pass_at_k(tmp_path, tiny_model_dir):
    data = gsm8k_rows(tmp_path / "gsm8k.jsonl")
    proc = run_cli(*common(tmp_path, tiny_model_dir, data, "--run_name", "pk", "--num_training_steps", "2", "--num_evals", "1",
                           "--eval_num_samples", "4", "--eval_temperature", "1.5"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "TRL standard prompts (prompt is a string); columns for the reward functions: answer" in proc.stdout
    assert "evaluation: 6 held-out prompts, 4 answers each at temperature 1.5" in proc.stdout
    assert "evaluation on 6 held-out prompts (4 sampled answers each; accuracy = right answers / answers)" in proc.stdout
    for name in ("pass@1", "pass@2", "pass@4", "mean@4", "gsm8k/accuracy"):
        assert f"| {name} |" in proc.stdout, name
    run_dir = tmp_path / "out" / "pk"
    records = [json.loads(line) for line in (run_dir / "evals" / "step_2.jsonl").read_text().splitlines()]
    assert len(records) == 24 and [r["sample"] for r in records[:4]] == [0, 1, 2, 3]
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    last = next(m for m in reversed(metrics) if "eval/pass@4" in m)
    # the logged pass@k is the estimator over the written answers
    by_prompt = [records[i : i + 4] for i in range(0, 24, 4)]
    assert last["eval/pass@2"] == pytest.approx(sum(pass_at_k(4, sum(r["success"] for r in g), 2) for g in by_prompt) / 6)
    assert last["eval/mean@4"] == pytest.approx(sum(r["success"] for r in records) / 24)


def test_the_evaluation_command_on_a_base_model_and_on_a_trained_adapter(tmp_path, tiny_model_dir):
    data = gsm8k_rows(tmp_path / "gsm8k.jsonl")
    base = run_evaluate(tiny_model_dir, *common(tmp_path, tiny_model_dir, data, "--run_name", "base")[2:])
    assert base.returncode == 0, base.stderr[-3000:]
    assert "evaluation on 6 prompts (greedy):" in base.stdout and "| gsm8k/accuracy |" in base.stdout
    base_metrics = json.loads((tmp_path / "out" / "base" / "metrics.json").read_text())
    assert len((tmp_path / "out" / "base" / "completions.jsonl").read_text().splitlines()) == 6
    # a LoRA run, then the command on its folder (the adapter) with the run's flags: the run's final evaluation again
    train_args = common(tmp_path, tiny_model_dir, data, "--train_mode", "lora", "--lora_r", "4", "--num_training_steps", "2",
                        "--num_evals", "1")
    proc = run_cli(*train_args, "--run_name", "lora")
    assert proc.returncode == 0, proc.stderr[-3000:]
    run_dir = tmp_path / "out" / "lora"
    final = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if '"eval/' in line][-1]
    again = run_evaluate(run_dir, *train_args[2:], "--run_name", "again")
    assert again.returncode == 0, again.stderr[-3000:]
    metrics = json.loads((tmp_path / "out" / "again" / "metrics.json").read_text())
    for key in ("eval/accuracy", "eval/reward_mean", "eval/response_length_mean", "eval/truncated_fraction"):
        assert metrics[key] == pytest.approx(final[key], abs=1e-9), key
    trained = [json.loads(line)["response"] for line in (run_dir / "evals" / "step_2.jsonl").read_text().splitlines()]
    assert [json.loads(line)["response"] for line in (tmp_path / "out" / "again" / "completions.jsonl").read_text().splitlines()] == trained
    assert base_metrics["eval/response_length_mean"] > 0
    # bad input: one line, exit 2
    assert_one_line_error(run_evaluate("--dataset_mixer_eval_list", data, "1.0"), "give the model to evaluate first")
    assert_one_line_error(run_evaluate(tiny_model_dir, "--eval_num_samples", "0"), "--eval_num_samples must be >= 1")
