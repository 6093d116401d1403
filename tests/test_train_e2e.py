"""The real entry point as a subprocess: TensorBoard scalars, checkpoints, final models, smoke test."""

import json
import os

import torch
from transformers import AutoModelForCausalLM

from conftest import run_cli, write_rows

# A user verifier (the --verifier_module path): reward responses with an even number of characters,
# true for about half of a random tiny model's responses, so groups have a learning signal.
VERIFIER = '''
from open_instruct2.verifiers import register

@register("even_length", "1 if the response has an even number of characters")
def even_length(response, ground_truth):
    return float(len(response) % 2 == 0)
'''


def scalars(run_dir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(os.path.join(run_dir, "tensorboard"), size_guidance={"scalars": 0, "tensors": 0})
    acc.Reload()
    return acc


def tiny_args(tmp_path, model_dir, *extra):
    (tmp_path / "v.py").write_text(VERIFIER)
    data = write_rows(tmp_path / "rows.jsonl", 16)
    return [
        "--model_name_or_path", model_dir, "--dataset_mixer_list", data, "1.0", "--verifier_module", tmp_path / "v.py",
        "--remap_verifier", "gsm8k=even_length", "--reference_mode", "in_process", "--num_unique_prompts_rollout", "2",
        "--num_samples_per_prompt_rollout", "4", "--response_length", "12", "--policy_dtype", "float32",
        "--learning_rate", "1e-3", "--output_dir", tmp_path / "out", "--run_name", "e2e", "--temperature", "1.0", *extra,
    ]


def test_full_training_run(tmp_path, tiny_model_dir):
    proc = run_cli(*tiny_args(tmp_path, tiny_model_dir, "--num_training_steps", "3", "--save_freq", "1",
                              "--keep_last_n_checkpoints", "2", "--per_device_train_batch_size", "3", "--beta", "0.1"))
    assert proc.returncode == 0, proc.stderr[-4000:]
    run_dir = tmp_path / "out" / "e2e"
    assert "step 3/3" in proc.stdout
    # the effective generation settings, said once; a random model never stops: most responses truncate
    assert proc.stdout.count("generation: temperature 1, top_p 1, top_k off, no penalties") == 1
    assert "100% of responses hit --response_length" in proc.stdout
    acc = scalars(run_dir)
    tags = set(acc.Tags()["scalars"])
    for tag in ["reward/mean", "reward/std", "reward/verifiable", "reward/verifier_accuracy", "rollout/response_length_mean",
                "rollout/response_length_max", "rollout/truncated_fraction", "rollout/filtered_group_fraction",
                "train/lr", "time/rollout", "time/reward", "time/reference", "time/update", "time/step",
                "rollout/tokens_per_second"]:
        assert [e.step for e in acc.Scalars(tag)] == [1, 2, 3], tag
    # The policy was updated on at least one step (groups with mixed rewards), with its loss metrics logged.
    for tag in ["train/policy_loss", "train/kl", "train/clip_fraction", "train/grad_norm", "train/tokens_per_second",
                "train/optimizer_steps"]:
        assert tag in tags and acc.Scalars(tag), tag
    assert "samples" in " ".join(acc.Tags()["tensors"])
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in lines] == [1, 2, 3]
    assert sorted(os.listdir(run_dir / "checkpoints")) == ["step_2", "step_3"]  # keep_last_n_checkpoints 2
    ckpt = AutoModelForCausalLM.from_pretrained(str(run_dir / "checkpoints" / "step_2"))
    final = AutoModelForCausalLM.from_pretrained(str(run_dir))
    start = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir))
    assert not torch.equal(final.model.norm.weight, start.model.norm.weight)
    assert torch.equal(final.model.norm.weight, AutoModelForCausalLM.from_pretrained(str(run_dir / "checkpoints" / "step_3")).model.norm.weight)
    assert ckpt.config.num_hidden_layers == 2
    saved = json.loads((run_dir / "open_instruct2_config.json").read_text())
    assert saved["flags"]["beta"] == 0.1 and saved["derived"]["num_training_steps"] == 3


def test_lora_run_saves_adapter_and_merged_model(tmp_path, tiny_model_dir):
    proc = run_cli(*tiny_args(tmp_path, tiny_model_dir, "--train_mode", "lora", "--lora_r", "4", "--num_training_steps", "2",
                              "--save_merged_model", "true", "--learning_rate", "1e-2", "--num_mini_batches", "2"))
    assert proc.returncode == 0, proc.stderr[-4000:]
    run_dir = tmp_path / "out" / "e2e"
    assert (run_dir / "adapter_config.json").is_file() and (run_dir / "adapter_model.safetensors").is_file()
    from peft import PeftModel

    base = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir))
    ids = torch.tensor([[1, 400, 500, 600]])
    with torch.no_grad():
        base_logits = base(ids).logits
        adapted = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(tiny_model_dir)), str(run_dir))
        merged = AutoModelForCausalLM.from_pretrained(str(run_dir / "merged"))
        assert torch.allclose(adapted(ids).logits, merged(ids).logits, atol=1e-4)
        assert not torch.allclose(merged(ids).logits, base_logits, atol=1e-4)


def test_unknown_verifier_is_refused_before_training(tmp_path, tiny_model_dir):
    data = write_rows(tmp_path / "rows.jsonl")
    text = (tmp_path / "rows.jsonl").read_text().replace('"gsm8k"', '"no_such_verifier"')
    (tmp_path / "rows.jsonl").write_text(text)
    proc = run_cli("--model_name_or_path", tiny_model_dir, "--dataset_mixer_list", data, "1.0", "--reference_mode", "in_process",
                   "--output_dir", tmp_path / "out", "--num_training_steps", "1")
    from conftest import assert_one_line_error

    assert_one_line_error(proc, "unknown verifier(s) no_such_verifier", "--remap_verifier")
    assert not (tmp_path / "out").exists()  # refused before anything was written


def test_smoke_test_on_builtin_defaults(tmp_path):
    """The issue's command: --smoke_test true --reference_mode in_process on the builtin model and data."""
    proc = run_cli("--smoke_test", "true", "--reference_mode", "in_process", "--output_dir", tmp_path / "out", "--run_name", "smoke")
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "step 2/2" in proc.stdout
    run_dir = tmp_path / "out" / "smoke"
    assert (run_dir / "model.safetensors").is_file() and not (run_dir / "checkpoints").exists()
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [m for m in lines if "reward/mean" in m]
    assert [m["step"] for m in steps] == [1, 2]
    # the whole path runs even when every answer is wrong: equal-reward groups are kept in smoke mode,
    # so each step makes its optimizer step with the KL term (beta 0.05 against the in-process reference)
    assert all(m["train/optimizer_steps"] == 1.0 and "train/kl" in m for m in steps)
    assert "| kl " in proc.stdout
    # the builtin data's held-out split is evaluated before and after (smoke: 8 prompts, one evaluation)
    assert [m["step"] for m in lines if "eval/accuracy" in m] == [0, 2] and proc.stdout.count("8 prompts in") == 2


def test_bad_ground_truth_is_refused_before_training(tmp_path, tiny_model_dir):
    import json as _json

    from conftest import assert_one_line_error

    rows = [{"messages": [{"role": "user", "content": "Write in French."}], "dataset": "ifeval",
             "ground_truth": _json.dumps({"instruction_id": ["language:response_language"], "kwargs": [{"language": "fr"}]})}]
    path = tmp_path / "if.jsonl"
    path.write_text("".join(_json.dumps(r) + "\n" for r in rows))
    proc = run_cli("--model_name_or_path", tiny_model_dir, "--dataset_mixer_list", path, "1.0", "--reference_mode", "in_process",
                   "--output_dir", tmp_path / "out", "--num_training_steps", "1")
    assert_one_line_error(proc, "if.jsonl row 1", "language:response_language", "not supported")


def test_an_existing_run_folder_is_never_reused(tmp_path):
    import pytest

    from open_instruct2.errors import UserError
    from open_instruct2.run_setup import make_run_dir

    make_run_dir(str(tmp_path / "a"))  # new
    make_run_dir(str(tmp_path / "a"))  # exists but empty: fine
    (tmp_path / "a" / "metrics.jsonl").write_text("{}\n")
    with pytest.raises(UserError, match="already exists and is not empty"):
        make_run_dir(str(tmp_path / "a"))
    assert (tmp_path / "a" / "metrics.jsonl").read_text() == "{}\n"
