"""Every bad input through the real entry point (`main`, as `python -m open_instruct2.train_grpo` calls it):
exit 2, one line on stderr naming the problem, no traceback, and a run folder that existed before is left
exactly as it was (no new folder either). Flags, data, paths and servers; each case is a whole training
invocation, not a dry run, so checks that need the data, the model or a server are exercised too."""

import importlib.util
import json
import os
import socket

import pytest

from conftest import write_rows
from open_instruct2.train_grpo import main


def rows_file(tmp_path, name, lines):
    path = tmp_path / name
    path.write_text("".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines))
    return str(path)


GOOD_ROW = {"messages": [{"role": "user", "content": "What is 1 + 1?"}], "ground_truth": "2", "dataset": "gsm8k"}


def cases(tmp_path, tiny_model_dir):
    data = write_rows(tmp_path / "good.jsonl", 4)
    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen()
    busy_port = busy.getsockname()[1]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead_port = s.getsockname()[1]
    (tmp_path / "a_file").write_text("not a folder")
    return busy, {
        # flags
        "unknown flag": (["--learning_rat", "1e-3"], "unrecognized arguments: --learning_rat"),
        "wrong type": (["--learning_rate", "fast"], "--learning_rate"),
        "bad boolean": (["--smoke_test", "maybe"], "--smoke_test"),
        "out of range": (["--num_samples_per_prompt_rollout", "1"], "must be >= 2"),
        "temperature 0": (["--temperature", "0"], "--temperature must be > 0"),
        "top_p above 1": (["--top_p", "1.5"], "--top_p must be in (0, 1]"),
        "beta without a reference": (["--reference_mode", "none", "--beta", "0.1"], "needs --beta 0"),
        "mini-batches do not divide": (["--num_mini_batches", "5"], "does not divide"),
        "response longer than allowed": (["--response_length", "400"], "--max_token_length"),
        "float16": (["--policy_dtype", "float16"], "loss scaling"),
        "state frequency 0": (["--checkpoint_state_freq", "0"], "--checkpoint_state_freq must be -1"),
        "template kwargs not JSON": (["--chat_template_kwargs", "{thinking: no}"], "not valid JSON"),
        "lora dropout": (["--train_mode", "lora", "--lora_dropout", "1.5"], "--lora_dropout"),
        "merged without lora": (["--save_merged_model", "true"], "needs --train_mode lora"),
        "no reward": (["--apply_verifiable_reward", "false"], "no reward is active"),
        "odd mixer": (["--dataset_mixer_list", data], "pairs"),
        "negative eval count": (["--num_evals", "-1"], "--num_evals must be >= 0"),
        "served name of a launched rollout server": (["--rollout_backend", "vllm", "--rollout_vllm_served_model_name", "m"],
                                                     "--rollout_vllm_served_model_name names the model of an endpoint"),
        # data
        "missing data file": (["--dataset_mixer_list", str(tmp_path / "nope.jsonl"), "1.0"], "not found"),
        "empty data file": (["--dataset_mixer_list", rows_file(tmp_path, "empty.jsonl", []), "1.0"], "empty.jsonl"),
        "malformed JSON line": (["--dataset_mixer_list", rows_file(tmp_path, "bad.jsonl", [GOOD_ROW, "{not json"]), "1.0"], "bad.jsonl"),
        "row without messages": (["--dataset_mixer_list", rows_file(tmp_path, "nomsg.jsonl", [{"ground_truth": "1", "dataset": "gsm8k"}]), "1.0"],
                                 "messages"),
        "row with a wrong type": (["--dataset_mixer_list", rows_file(tmp_path, "type.jsonl", [{**GOOD_ROW, "messages": "What is 1 + 1?"}]), "1.0"],
                                  "type.jsonl"),
        "unknown verifier": (["--dataset_mixer_list", rows_file(tmp_path, "unk.jsonl", [{**GOOD_ROW, "dataset": "no_such"}]), "1.0"],
                             "unknown verifier"),
        "every prompt too long": (["--max_prompt_token_length", "5"], "no prompts left"),
        "rubric rows without a judge": (["--dataset_mixer_list", rows_file(tmp_path, "rub.jsonl", [{**GOOD_ROW, "dataset": "general_rubric",
                                         "ground_truth": json.dumps({"query": "q", "rubrics": [{"description": "d"}]})}]), "1.0"], "set --llm_judge_model"),
        "malformed rubric": (["--dataset_mixer_list", rows_file(tmp_path, "badrub.jsonl", [{**GOOD_ROW, "dataset": "general_rubric",
                              "ground_truth": json.dumps({"query": "q", "rubrics": []})}]), "1.0", "--llm_judge_model", "m",
                              "--llm_judge_base_url", "http://127.0.0.1:9/v1"], "badrub.jsonl row 1"),
        "judge without its key": (["--llm_judge_model", "m", "--llm_judge_base_url", "https://judge.example.com/v1",
                                   "--llm_judge_api_key_env", "OI2_NO_SUCH_KEY"], "$OI2_NO_SUCH_KEY"),
        "missing eval file": (["--dataset_mixer_eval_list", str(tmp_path / "gone.jsonl"), "1.0"], "not found"),
        # paths
        "model folder missing": (["--model_name_or_path", str(tmp_path / "no_model")], "no_model"),
        "output_dir is a file": (["--output_dir", str(tmp_path / "a_file")], "is a file"),
        "output_dir under a file": (["--output_dir", str(tmp_path / "a_file" / "sub")], "is a file"),
        "system prompt missing": (["--system_prompt_file", str(tmp_path / "sys.txt")], "not found"),
        "worked examples missing": (["--few_shot_file", str(tmp_path / "no_shots.json")], "not found"),
        "worked examples out of order": (["--few_shot_file", rows_file(tmp_path, "shots.json", [json.dumps([{"role": "assistant", "content": "4"},
                                          {"role": "user", "content": "2 + 2?"}])])], "turn 0 must be"),
        "verifier module missing": (["--verifier_module", str(tmp_path / "v.py")], "not found"),
        "existing run folder": (["--run_name", "existing"], "already exists"),
        # servers
        "port out of range": (["--reference_mode", "launch_local_vllm", "--reference_launch_port", "70000"], "1..65535"),
        "endpoint without a scheme": (["--reference_mode", "endpoint_vllm", "--reference_endpoint", "localhost:8000"], "http://"),
        "unreachable endpoint": (["--reference_mode", "endpoint_vllm", "--reference_endpoint", f"http://127.0.0.1:{dead_port}"],
                                 "does not answer /health"),
        "port in use": (["--reference_mode", "launch_local_vllm", "--reference_launch_port", str(busy_port)],
                        "already in use" if importlib.util.find_spec("vllm") else "needs vLLM"),
        "rollout server unreachable": (["--rollout_backend", "vllm", "--rollout_vllm_endpoint", f"http://127.0.0.1:{dead_port}"],
                                       "does not answer /health"),
        "rollout port in use": (["--rollout_backend", "vllm", "--rollout_vllm_port", str(busy_port)],
                                "already in use" if importlib.util.find_spec("vllm") else "vLLM is not installed"),
        "rollout and reference on one port": (["--rollout_backend", "vllm", "--reference_mode", "launch_local_vllm", "--reference_launch_port", "8001"],
                                              "need different ports"),
        "rollout server as reference": (["--rollout_backend", "vllm", "--rollout_vllm_endpoint", "http://127.0.0.1:8000", "--reference_mode",
                                         "endpoint_vllm", "--reference_endpoint", "http://127.0.0.1:8000/"], "cannot also be the frozen reference"),
        "importance cap below 1": (["--rollout_backend", "vllm", "--importance_sampling_cap", "0.5"], "0 (off) or >= 1"),
        # HF generate
        "packed generation through adapters": (["--train_mode", "lora", "--generation_linear", "packed", "--lora_generation", "adapters"],
                                               "drop one of them"),
    }


def test_bad_inputs_are_one_line_exit_2_and_touch_nothing(tmp_path, tiny_model_dir, capsys):
    out = tmp_path / "out"
    existing = out / "existing"
    existing.mkdir(parents=True)
    (existing / "metrics.jsonl").write_text('{"step": 1}\n')
    busy, table = cases(tmp_path, tiny_model_dir)
    assert len(table) >= 25
    data = write_rows(tmp_path / "rows.jsonl", 4)
    base = ["--model_name_or_path", str(tiny_model_dir), "--dataset_mixer_list", data, "1.0", "--reference_mode", "in_process",
            "--num_unique_prompts_rollout", "2", "--num_samples_per_prompt_rollout", "2", "--response_length", "8", "--num_training_steps", "1",
            "--output_dir", str(out), "--run_name", "new", "--num_evals", "0"]
    failures = []
    try:
        for name, (argv, needle) in table.items():
            code = main(base + argv)
            captured = capsys.readouterr()
            lines = [line for line in captured.err.splitlines() if line.strip()]
            problem = None
            if code != 2:
                problem = f"exit {code}"
            elif len(lines) != 1 or "Traceback" in captured.err:
                problem = f"{len(lines)} stderr lines: {captured.err[-1500:]}"
            elif needle not in lines[0]:
                problem = f"{needle!r} not in {lines[0]!r}"
            elif sorted(os.listdir(out)) != ["existing"] or os.listdir(existing) != ["metrics.jsonl"]:
                problem = f"the output folder changed: {sorted(os.listdir(out))}"
            elif (existing / "metrics.jsonl").read_text() != '{"step": 1}\n':
                problem = "the existing run folder's file changed"
            if problem:
                failures.append(f"{name}: {problem}")
    finally:
        busy.close()
    assert not failures, "\n".join(failures)


@pytest.mark.parametrize("flag", ["--output_dir", "--run_name"])
def test_a_dry_run_refuses_the_same_paths(tmp_path, flag, capsys):
    (tmp_path / "f").write_text("x")
    value = str(tmp_path / "f") if flag == "--output_dir" else "f"
    assert main([flag, value, "--output_dir" if flag == "--run_name" else "--run_name", str(tmp_path) if flag == "--run_name" else "r",
                 "--dry_run", "true"]) == 2
    assert "is a file" in capsys.readouterr().err
