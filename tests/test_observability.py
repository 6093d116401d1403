"""Observability: memory profiling, evaluation during training, rollout dumps, the "no update" line,
offline wandb and the plot command, through the real entry point where a user would use them."""

import json
import os
import subprocess
import sys
import time

import pytest

from conftest import REPO, assert_one_line_error, run_cli, write_rows
from open_instruct2 import memory_profile as mp
from open_instruct2.evaluation import eval_schedule
from test_train_e2e import scalars, tiny_args

SECRET = "sk-test-0123456789abcdef"


# ---------------------------------------------------------------- memory profiling


def test_sanitize_masks_keys_in_command_lines():
    cmd = f"python -m vllm.entrypoints.openai.api_server --api-key {SECRET} --model m --hf_token=hf_abcdefghijkl --port 8000"
    clean = mp.sanitize(cmd, ("local-dev-key",))
    assert SECRET not in clean and "hf_abcdefghijkl" not in clean
    assert "--api-key ***" in clean and "--hf_token=***" in clean and "--model m" in clean and "--port 8000" in clean
    assert mp.sanitize("serve --reference_api_key local-dev-key") == "serve --reference_api_key ***"
    assert mp.sanitize("x local-dev-key y", ("local-dev-key",)) == "x *** y"


def test_summary_attributes_peaks_to_phases_and_children():
    def sample(t, phase, trainer, children, marker=""):
        return {"t_s": t, "marker": marker, "phase": phase, "trainer_rss_mb": trainer, "children_rss_mb": sum(c[1] for c in children),
                "total_rss_mb": trainer + sum(c[1] for c in children), "system_available_mb": 1000.0 - t, "python_heap_mb": None,
                "cuda_allocated_mb": None, "top_children": [{"pid": p, "rss_mb": r, "cmd": f"proc {p}"} for p, r in children]}

    samples = [sample(0, "setup", 300, []), sample(1, "step 1 rollout", 500, [(7, 900), (8, 100)], "step_1_start"),
               sample(2, "step 1 reference", 450, [(7, 2500), (8, 120)]), sample(3, "step 1 update", 1200, [(7, 2400)])]
    s = mp.summarize(samples)
    assert s["peak_trainer"] == {"mb": 1200, "t_s": 3, "phase": "step 1 update", "marker": ""}
    assert s["peak_children"]["mb"] == 2620 and s["peak_children"]["phase"] == "step 1 reference"
    assert s["peak_total"]["mb"] == 3600 and s["peak_total"]["phase"] == "step 1 update"
    assert [(c["pid"], c["peak_rss_mb"], c["phase"]) for c in s["top_children"]] == [(7, 2500, "step 1 reference"), (8, 120, "step 1 reference")]
    assert s["by_phase"]["reference"]["children_mb"] == 2620 and s["markers"] == 1 and s["min_system_available_mb"] == 997
    assert "| children (vLLM server and workers, ...) | 2620 | step 1 reference |" in mp.summary_markdown(s)


def test_profiler_separates_a_child_from_the_trainer(tmp_path):
    """A child holding ~200 MB (with a key on its command line) next to this process: the four files,
    the child's peak attributed to it and its phase, its command line masked, markers recorded."""
    child = subprocess.Popen([sys.executable, "-c", "import sys, time; x = bytearray(200 * 2**20); print('ready', flush=True); time.sleep(60)",
                              "--api-key", SECRET], stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline().strip() == "ready"
        profiler = mp.MemoryProfiler(0.05, 4, tracemalloc_on=True).start()
        profiler.mark("step_1_start", "step 1 rollout")
        time.sleep(0.3)
        profiler.attach(str(tmp_path))  # samples taken before the run folder existed are written now
        profiler.mark("step_1_after_rollout", "step 1 reward")
        time.sleep(0.2)
        summary = profiler.stop()
    finally:
        child.kill()
        child.wait()
    folder = tmp_path / "memory_profile"
    assert sorted(os.listdir(folder)) == ["memory_samples.csv", "memory_samples.jsonl", "memory_summary.json", "memory_summary.md"]
    assert summary["peak_children"]["mb"] > 190 and summary["samples"] >= 6
    [top] = [c for c in summary["top_children"] if c["pid"] == child.pid]
    assert top["peak_rss_mb"] > 190 and SECRET not in top["cmd"] and "--api-key ***" in top["cmd"]
    rows = [json.loads(line) for line in (folder / "memory_samples.jsonl").read_text().splitlines()]
    assert [r["marker"] for r in rows if r["marker"]] == ["profiler_start", "step_1_start", "step_1_after_rollout", "profiler_stop"]
    assert {r["phase"] for r in rows} >= {"setup", "step 1 rollout", "step 1 reward"}
    assert all(r["python_heap_mb"] is not None for r in rows)
    assert (folder / "memory_samples.csv").read_text().count("\n") == len(rows) + 1
    for name in os.listdir(folder):
        assert SECRET not in (folder / name).read_text()


# ---------------------------------------------------------------- evaluation during training


def test_eval_schedule():
    assert eval_schedule(10, 5) == {0, 2, 4, 6, 8, 10}
    assert eval_schedule(3, 10) == {0, 1, 2, 3}  # at most one per step
    assert eval_schedule(7, 1) == {0, 7}
    assert eval_schedule(100, 0) == set()


def test_the_eta_counts_training_steps_not_set_up_or_evaluations(tmp_path, capsys, monkeypatch):
    """A slow set-up and a long evaluation before step 1 made the first ETA 8h26m for a run that had 70 min to go."""
    from open_instruct2.tracking import Tracker

    monkeypatch.setattr(sys.stdout, "isatty", lambda: False)  # the plain line, not the bar
    clock = [1000.0]
    monkeypatch.setattr(time, "time", lambda: clock[0])
    tracker = Tracker(str(tmp_path), 10, "cfg")
    clock[0] += 600 + 60  # 10 min of set-up and a step-0 evaluation, then a 60 s step
    tracker.log(1, {"time/step": 60.0})
    clock[0] += 50
    tracker.log(2, {"time/step": 50.0})
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].endswith("elapsed 11m00s | eta 9m00s")  # 9 steps at 60 s, not at 660 s
    assert lines[1].endswith("elapsed 11m50s | eta 7m20s")  # 8 at the mean 55 s
    tracker.writer.close()


def test_eval_rollout_dumps_no_update_line_and_plot(tmp_path, tiny_model_dir):
    """A tiny run with a held-out set, rollout dumps and beta 0: evaluations before training and after
    steps 2 and 4 in TensorBoard, metrics.jsonl and evals/; dumps that say what the update used; the console
    says when a step made no update and why; the curves PNG at the end and from the plot command."""
    held_out = write_rows(tmp_path / "held_out.jsonl", 5)
    proc = run_cli(*tiny_args(tmp_path, tiny_model_dir, "--num_training_steps", "4", "--dataset_mixer_eval_list", held_out, "1.0",
                              "--num_evals", "2", "--save_rollouts", "true", "--beta", "0", "--reference_mode", "none"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    run_dir = tmp_path / "out" / "e2e"
    acc = scalars(run_dir)
    for tag in ["eval/accuracy", "eval/reward_mean", "eval/even_length/accuracy", "eval/response_length_mean"]:
        assert [e.step for e in acc.Scalars(tag)] == [0, 2, 4], tag
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    evals = [m for m in lines if "eval/accuracy" in m]
    assert [m["step"] for m in evals] == [0, 2, 4] and all(m["eval/prompts"] == 5 for m in evals)
    assert sorted(os.listdir(run_dir / "evals")) == ["step_0.jsonl", "step_2.jsonl", "step_4.jsonl"]
    records = [json.loads(line) for line in (run_dir / "evals" / "step_0.jsonl").read_text().splitlines()]
    assert len(records) == 5 and records[0]["prompt"].startswith("What is 0 + 1?") and records[0]["verifiers"] == ["even_length"]
    for r in records:  # the reward is the training reward: 10 x the verifier score for even_length
        assert r["reward"] == 10.0 * r["verifier_score"] and r["verifier_score"] == float(len(r["response"]) % 2 == 0)
    accuracy = sum(r["verifier_score"] for r in records) / 5
    assert evals[0]["eval/accuracy"] == pytest.approx(accuracy)
    assert proc.stdout.count("eval at step") == 3 and "5 prompts in" in proc.stdout
    # rollout dumps: every sample of every step, with what the update made of it
    assert sorted(os.listdir(run_dir / "rollouts")) == [f"step_{i}.jsonl" for i in range(1, 5)]
    for step in range(1, 5):
        rows = [json.loads(line) for line in (run_dir / "rollouts" / f"step_{step}.jsonl").read_text().splitlines()]
        assert len(rows) == 8
        for group in (rows[:4], rows[4:]):
            rewards = [r["reward"] for r in group]
            same = len(set(rewards)) == 1
            assert all(r["zero_std_group"] == same and r["computed"] == (not same) and r["in_loss"] for r in group)
            assert (sum(r["advantage"] for r in group) == pytest.approx(0.0, abs=1e-5))
            assert all((r["advantage"] > 0) == (r["reward"] > sum(rewards) / 4) or same for r in group)
            assert all(r["reward_breakdown"]["verifiable"] == r["reward"] and r["finish_reason"] == "length" and r["length"] == 12 for r in group)
        step_line = next(m for m in lines if m["step"] == step and "reward/mean" in m)
        if step_line["rollout/zero_std_group_fraction"] == 1.0:
            assert f"step {step}/4 |" in proc.stdout and "no update: every group had equal rewards" in proc.stdout
    # the plot: at the end of the run, and from the command
    assert (run_dir / "curves.png").stat().st_size > 10_000
    out = tmp_path / "again.png"
    plot = subprocess.run([sys.executable, "-m", "open_instruct2.plot", str(run_dir), "--out", str(out)], capture_output=True, text=True, cwd=REPO)
    assert plot.returncode == 0, plot.stderr
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out.stat().st_size > 10_000
    missing = subprocess.run([sys.executable, "-m", "open_instruct2.plot", str(tmp_path / "nothing")], capture_output=True, text=True, cwd=REPO)
    assert missing.returncode == 2 and "metrics.jsonl not found" in missing.stderr


def test_no_update_line_when_every_group_has_equal_rewards(tmp_path, tiny_model_dir):
    data = write_rows(tmp_path / "rows.jsonl", 4)  # gsm8k rows: a random tiny model never answers right
    proc = run_cli("--model_name_or_path", tiny_model_dir, "--dataset_mixer_list", data, "1.0", "--reference_mode", "none", "--beta", "0",
                   "--num_unique_prompts_rollout", "2", "--num_samples_per_prompt_rollout", "2", "--response_length", "4",
                   "--num_training_steps", "2", "--output_dir", tmp_path / "out", "--run_name", "r")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("| no update: every group had equal rewards (no signal) |") == 2
    lines = [json.loads(line) for line in (tmp_path / "out" / "r" / "metrics.jsonl").read_text().splitlines()]
    assert [m["train/optimizer_steps"] for m in lines] == [0.0, 0.0]


# ---------------------------------------------------------------- wandb


def test_wandb_offline_gets_the_scalars_samples_and_a_masked_config(tmp_path, tiny_model_dir):
    from wandb_reader import read_offline_run

    proc = run_cli(*tiny_args(tmp_path, tiny_model_dir, "--num_training_steps", "2", "--with_tracking", "true", "--log_samples_freq", "1",
                              "--wandb_project_name", "oi2-test", "--reference_api_key", SECRET, "--num_evals", "0"),
                   env={"WANDB_MODE": "offline", "WANDB_SILENT": "true"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "wandb" not in proc.stderr.lower(), proc.stderr  # wandb says nothing on our stderr
    run_dir = tmp_path / "out" / "e2e"
    run = read_offline_run(str(run_dir))
    steps = [h for h in run["history"] if "reward/mean" in h]
    assert [h["_step"] for h in steps] == [1, 2]
    jsonl = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [h["reward/mean"] for h in steps] == [m["reward/mean"] for m in jsonl]
    assert all("time/step" in h and "rollout/response_length_mean" in h for h in steps)
    assert any(h.get("samples/_type") == "table-file" for h in run["history"])
    table = next(f for f in run["files"] if f.startswith("files/media/table/samples"))
    [offline] = (run_dir / "wandb").glob("offline-run-*")
    assert "response" in json.loads((offline / table).read_text())["columns"]
    assert run["config"]["flags"]["reference_api_key"] == "***" and run["config"]["flags"]["with_tracking"] is True
    for root, _, files in os.walk(run_dir):
        for name in files:
            with open(os.path.join(root, name), "rb") as f:
                assert SECRET.encode() not in f.read(), name


def test_wandb_missing_is_one_line_with_the_install_command(tmp_path):
    shim = tmp_path / "shim"
    shim.mkdir()
    # a sitecustomize that hides wandb from this interpreter, as if it were not installed
    (shim / "sitecustomize.py").write_text(
        "import importlib.util, sys\n"
        "_find = importlib.util.find_spec\n"
        "importlib.util.find_spec = lambda name, *a, **k: None if name == 'wandb' else _find(name, *a, **k)\n"
    )
    proc = run_cli("--with_tracking", "true", "--dry_run", "true", env={"PYTHONPATH": f"{shim}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"})
    assert_one_line_error(proc, "--with_tracking true needs wandb", "pip install 'open-instruct2[wandb]'")


# The memory profile of a run with a launched vLLM server: tests/test_reference_vllm.py::test_launch_local_vllm_survives_a_killed_server_and_sigterm_then_saves_a_resumable_state
# (one launched run serves both checks).


def test_a_resumed_run_continues_its_wandb_run(tmp_path, tiny_model_dir, monkeypatch):
    """The wandb id is saved with the state and the rerun opens the same run (resume="allow"), not a new one."""
    from conftest import tiny_config
    from test_resume import stopped_after

    from open_instruct2 import trainer

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    common = dict(num_training_steps=3, checkpoint_state_freq=1, num_evals=0, with_tracking=True, wandb_project_name="oi2-test")
    stopped_after(tiny_config(tmp_path, tiny_model_dir, run_name="w", **common), 1)
    run_dir = tmp_path / "out" / "w"
    saved = json.loads((run_dir / "checkpoints" / "step_1" / "training_state.json").read_text())["wandb_id"]
    trainer.train(tiny_config(tmp_path, tiny_model_dir, run_name="w", **common))
    runs = sorted((run_dir / "wandb").glob("offline-run-*"))
    assert len(runs) == 2 and saved and all(r.name.endswith(f"-{saved}") for r in runs)


def test_a_short_try_out_does_not_spend_its_time_evaluating(tmp_path, tiny_model_dir):
    """On builtin data a run evaluated 256 prompts before step 1 and after every step of a 5-step try-out. Without
    --num_evals: at most one evaluation per 10 steps (none here, said once), 64 prompts on a CPU, and the plan and
    its cost are logged; a value given is used as is."""
    from open_instruct2.config import default_config, derive

    assert derive(default_config(num_training_steps=5)).num_evals == 0
    assert derive(default_config(num_training_steps=35)).num_evals == 3
    assert derive(default_config(num_training_steps=500)).num_evals == 10  # the original's default on a long run
    assert derive(default_config(num_training_steps=5, num_evals=10)).num_evals == 10
    base = ["--model_name_or_path", tiny_model_dir, "--dataset_mixer_list", "builtin:arithmetic", "1.0", "--reference_mode", "none",
            "--beta", "0", "--num_unique_prompts_rollout", "2", "--num_samples_per_prompt_rollout", "2", "--response_length", "8",
            "--policy_dtype", "float32", "--output_dir", tmp_path / "out"]
    proc = run_cli(*base, "--num_training_steps", "3", "--run_name", "short")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "evaluation: off for a 3-step run" in proc.stdout and "eval at step" not in proc.stdout
    assert not (tmp_path / "out" / "short" / "evals").exists()
    proc = run_cli(*base, "--num_training_steps", "20", "--run_name", "longer")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "evaluation: 64 held-out prompts, greedy, up to 8 tokens each, at steps 0, 10, 20 (3 evaluations" in proc.stdout
    assert "evaluation: 2 more, about" in proc.stdout and proc.stdout.count("eval at step") == 3
