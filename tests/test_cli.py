"""The entry point as a user runs it: the original README's commands, --help, YAML, bad input."""

import json
import os

import pytest

from conftest import assert_one_line_error, run_cli
from open_instruct2.config import GROUPS
from open_instruct2.train_grpo import main

import dataclasses

# Every command of the original README (../shared/seeds/000_a89e1bfbc07ec332.txt), verbatim but for the
# <linux-gpu-host> placeholder, which a user replaces with a host name.
SEED_COMMANDS = {
    "linux_gpu_full_launch": """--runtime_target linux_gpu --train_mode full --reference_mode launch_local_vllm
        --model_name_or_path Qwen/Qwen3-0.6B --dataset_mixer_list ai2-adapt-dev/rlvr_gsm8k_zs 1.0
        --dataset_mixer_list_splits train --total_episodes 256 --num_unique_prompts_rollout 8
        --num_samples_per_prompt_rollout 2 --per_device_train_batch_size 2 --response_length 256
        --apply_verifiable_reward true""",
    "linux_gpu_lora_launch": """--runtime_target linux_gpu --train_mode lora --lora_r 16 --lora_alpha 32
        --lora_dropout 0.05 --reference_mode launch_local_vllm --model_name_or_path Qwen/Qwen3-0.6B
        --dataset_mixer_list ai2-adapt-dev/rlvr_gsm8k_zs 1.0 --dataset_mixer_list_splits train --total_episodes 256""",
    "linux_gpu_endpoint": """--runtime_target linux_gpu --reference_mode endpoint_vllm
        --reference_endpoint http://127.0.0.1:8000 --model_name_or_path Qwen/Qwen3-0.6B
        --dataset_mixer_list ai2-adapt-dev/rlvr_gsm8k_zs 1.0 --dataset_mixer_list_splits train --total_episodes 256""",
    "mac_launch": """--runtime_target mac --reference_mode launch_local_vllm --reference_launch_host 127.0.0.1
        --reference_launch_port 8000 --reference_api_key local-dev-key --reference_launch_dtype float16
        --model_name_or_path Qwen/Qwen3-0.6B --dataset_mixer_list ai2-adapt-dev/rlvr_gsm8k_zs 1.0
        --dataset_mixer_list_splits train --total_episodes 128""",
    "mac_endpoint": """--runtime_target mac --reference_mode endpoint_vllm --reference_endpoint http://gpu-host:8000
        --train_mode lora --model_name_or_path Qwen/Qwen3-0.6B --dataset_mixer_list ai2-adapt-dev/rlvr_gsm8k_zs 1.0
        --dataset_mixer_list_splits train --total_episodes 128""",
    "smoke_linux_gpu_launch": """--smoke_test true --runtime_target linux_gpu --reference_mode launch_local_vllm
        --model_name_or_path Qwen/Qwen3-0.6B --dataset_mixer_list ai2-adapt-dev/rlvr_gsm8k_zs 1.0
        --dataset_mixer_list_splits train""",
    "smoke_mac_launch": """--smoke_test true --runtime_target mac --reference_mode launch_local_vllm
        --reference_launch_host 127.0.0.1 --reference_launch_port 8000 --reference_api_key local-dev-key
        --model_name_or_path Qwen/Qwen3-0.6B --dataset_mixer_list ai2-adapt-dev/rlvr_gsm8k_zs 1.0
        --dataset_mixer_list_splits train""",
    "smoke_mac_endpoint": """--smoke_test true --runtime_target mac --reference_mode endpoint_vllm
        --reference_endpoint http://gpu-host:8000 --model_name_or_path Qwen/Qwen3-0.6B
        --dataset_mixer_list ai2-adapt-dev/rlvr_gsm8k_zs 1.0 --dataset_mixer_list_splits train""",
}


@pytest.mark.parametrize("name", sorted(SEED_COMMANDS))
def test_original_readme_commands_dry_run(name):
    import torch

    proc = run_cli(*SEED_COMMANDS[name].split(), "--dry_run", "true")
    assert "local-dev-key" not in proc.stdout + proc.stderr
    if "linux_gpu" in SEED_COMMANDS[name] and not torch.cuda.is_available():
        assert_one_line_error(proc, "linux_gpu", "CUDA")
        return
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads(proc.stdout)
    assert summary["flags"]["model_name_or_path"] == "Qwen/Qwen3-0.6B"
    assert summary["flags"]["dataset_mixer_list"] == ["ai2-adapt-dev/rlvr_gsm8k_zs", "1.0"]
    if "reference_api_key" in SEED_COMMANDS[name]:
        assert summary["flags"]["reference_api_key"] == "***"
    if "smoke_test" in SEED_COMMANDS[name]:
        # The original's overrides: 1 prompt x 2 samples, 2 steps, response_length <= 64.
        assert summary["flags"]["num_unique_prompts_rollout"] == 1
        assert summary["flags"]["num_samples_per_prompt_rollout"] == 2
        assert summary["flags"]["response_length"] == 64
        assert summary["derived"]["num_training_steps"] == 2
    else:
        total = summary["flags"]["total_episodes"]
        batch = summary["flags"]["num_unique_prompts_rollout"] * summary["flags"]["num_samples_per_prompt_rollout"]
        assert summary["derived"]["num_training_steps"] == total // batch
    # the device the runtime picks on this machine: CUDA where there is one (linux_gpu and auto alike), else CPU
    # (mac picks MPS, absent on the machines this suite runs on, else the CPU)
    expected = "cuda" if torch.cuda.is_available() and "runtime_target mac" not in SEED_COMMANDS[name] else "cpu"
    assert summary["runtime"]["device"] == expected


def test_dry_run_loads_nothing_and_writes_nothing(tmp_path):
    proc = run_cli("--dry_run", "true", "--output_dir", tmp_path / "out", "--model_name_or_path", "no/such-model")
    assert proc.returncode == 0, proc.stderr
    assert not (tmp_path / "out").exists()


def test_help_lists_every_flag_with_its_doc():
    proc = run_cli("--help")
    assert proc.returncode == 0
    text = " ".join(proc.stdout.split())
    for cls in GROUPS.values():
        for f in dataclasses.fields(cls):
            assert f"--{f.name}" in text, f.name
            doc = " ".join(f.metadata["help"].replace("%%", "%").split())  # argparse prints %% as %
            assert doc[:60] in text, f"doc of --{f.name} missing from --help"


def test_yaml_config_and_flag_override(tmp_path, capsys):
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(
        "learning_rate: 1.0e-6\nbeta: 0.0\nreference_mode: none\ntrain_mode: lora\n"
        "dataset_mixer_list: [builtin:arithmetic, '0.5']\nstop_strings: ['</answer>']\nmask_truncated_completions: true\n"
    )
    assert main([str(cfg), "--learning_rate", "3e-6", "--dry_run", "true"]) == 0
    flags = json.loads(capsys.readouterr().out)["flags"]
    assert flags["learning_rate"] == 3e-6  # the flag after the file wins
    assert flags["train_mode"] == "lora" and flags["reference_mode"] == "none"
    assert flags["dataset_mixer_list"] == ["builtin:arithmetic", "0.5"]
    assert flags["stop_strings"] == ["</answer>"] and flags["mask_truncated_completions"] is True


def test_api_key_from_environment_is_masked(capsys, monkeypatch):
    monkeypatch.setenv("OPEN_INSTRUCT2_REFERENCE_API_KEY", "sk-secret-123")
    assert main(["--dry_run", "true"]) == 0
    out = capsys.readouterr().out
    assert "sk-secret-123" not in out and json.loads(out)["flags"]["reference_api_key"] == "***"


BAD_INPUT = [
    (["--no_such_flag", "1"], "unrecognized arguments"),
    (["--seed", "abc"], "--seed"),
    (["--train_mode", "half"], "train_mode"),
    (["--use_fast_tokenizer", "maybe"], "use_fast_tokenizer"),
    (["--dataset_mixer_list", "builtin:arithmetic"], "pairs"),
    (["--dataset_mixer_list", "builtin:arithmetic", "lots"], "not a number"),
    (["--dataset_mixer_list", "a", "1.0", "b", "1.0", "--dataset_mixer_list_splits", "train", "test", "dev"], "one split"),
    (["--dataset_mixer_list", "missing.jsonl", "1.0"], "not found"),
    (["--num_samples_per_prompt_rollout", "1"], ">= 2"),
    (["--num_unique_prompts_rollout", "0"], "must be > 0"),
    (["--response_length", "-5"], "must be > 0"),
    (["--temperature", "0"], "temperature"),
    (["--top_p", "1.5"], "top_p"),
    (["--beta", "-0.1"], "beta"),
    (["--clip_lower", "1.0"], "clip_lower"),
    (["--num_mini_batches", "3"], "divide"),
    (["--reference_mode", "none"], "--beta 0"),
    (["--reference_mode", "endpoint_vllm", "--reference_endpoint", "localhost:8000"], "http://"),
    (["--train_mode", "lora", "--lora_r", "0"], "lora_r"),
    (["--apply_verifiable_reward", "false"], "no reward"),
    (["--response_length", "400"], "max_token_length"),
    (["--total_episodes", "10"], "total_episodes"),
    (["--save_freq", "0"], "save_freq"),
    (["--system_prompt_file", "nope.txt"], "not found"),
    (["--device", "tpu"], "--device"),
    (["--policy_dtype", "float16"], "loss scaling"),
    (["--chat_template_kwargs", "{enable_thinking: false}"], "not valid JSON"),
    (["--chat_template_kwargs", "[1]"], "JSON object"),
    (["--inference_batch_size", "0"], "inference_batch_size"),
    (["--attn_implementation", "flash_attention_2"], "flash_attention_2"),
    (["--use_general_rubric", "true"], "needs a judge: set --llm_judge_model"),
    (["--memory_profile_interval_s", "0"], "--memory_profile_interval_s must be > 0"),
    (["--llm_judge_model", "gpt-4.1-mini", "--llm_judge_base_url", "https://api.example.com/v1", "--llm_judge_api_key_env", "NO_SUCH_KEY_VAR"],
     "$NO_SUCH_KEY_VAR"),
    (["--llm_judge_model", "m", "--llm_judge_base_url", "ftp://judge"], "http://"),
]


@pytest.mark.parametrize("argv,needle", BAD_INPUT, ids=[" ".join(a) for a, _ in BAD_INPUT])
def test_bad_input_is_one_line_exit_2(argv, needle, capsys):
    assert main([*argv, "--dry_run", "true"]) == 2
    captured = capsys.readouterr()
    lines = [line for line in captured.err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), captured.err
    assert needle in lines[0]
    assert captured.out == ""


def test_bad_input_as_subprocess_and_existing_run_folder_untouched(tmp_path):
    run_dir = tmp_path / "runs" / "mine"
    run_dir.mkdir(parents=True)
    (run_dir / "model.safetensors").write_text("precious")
    proc = run_cli("--output_dir", tmp_path / "runs", "--run_name", "mine", "--reference_mode", "none", "--beta", "0")
    assert_one_line_error(proc, "already exists", "--run_name")
    assert (run_dir / "model.safetensors").read_text() == "precious"
    assert sorted(os.listdir(run_dir)) == ["model.safetensors"]


def test_bad_yaml_is_one_line(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("learning_rate: [1, 2\n")
    assert_one_line_error(run_cli(bad, "--dry_run", "true"), "not valid YAML")
    unknown = tmp_path / "unknown.yaml"
    unknown.write_text("learning_rat: 0.1\n")
    assert_one_line_error(run_cli(unknown, "--dry_run", "true"), "unknown flag 'learning_rat'")
