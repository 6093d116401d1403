"""Exact resume: a run killed with SIGKILL and rerun ends bit-identical to an uninterrupted one; signals
save a resumable state; an interrupted save leaves the previous state usable; changed flags are refused;
non-finite updates are skipped and, K in a row, stop the run."""

import errno
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from conftest import REPO, assert_one_line_error, tiny_config
from open_instruct2 import checkpoint, trainer, update
from open_instruct2.errors import UserError
from open_instruct2.rollout import generate_rollouts
from open_instruct2.signals import Stopped, StopRequest
from test_train_e2e import tiny_args


def weights(folder):
    out = {}
    for name in os.listdir(folder):
        if name.endswith(".safetensors"):
            out.update(load_file(os.path.join(folder, name)))
    return out


def train_lines(run_dir):
    return [json.loads(line) for line in open(os.path.join(run_dir, "metrics.jsonl")) if '"reward/mean"' in line]


def start(args):
    return subprocess.Popen([sys.executable, "-m", "open_instruct2.train_grpo", *map(str, args)], cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_for(path, proc, timeout=300):
    """Until `path` exists and is not empty (metrics.jsonl exists from start-up on, with lines from step 1)."""
    deadline = time.time() + timeout
    while not (os.path.exists(path) and os.path.getsize(path) > 0):
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        assert time.time() < deadline, f"{path} never appeared"
        time.sleep(0.02)


def run_args(tmp_path, tiny_model_dir, name):
    # beta > 0 keeps every group in the update (the KL term), so every step makes a real optimizer step
    return tiny_args(tmp_path, tiny_model_dir, "--num_training_steps", "8", "--checkpoint_state_freq", "2", "--beta", "0.1",
                     "--response_length", "24", "--run_name", name, "--num_evals", "0", "--keep_last_n_checkpoints", "2")


def test_sigkill_then_the_same_command_ends_bit_identical(tmp_path, tiny_model_dir):
    straight = subprocess.run([sys.executable, "-m", "open_instruct2.train_grpo", *map(str, run_args(tmp_path, tiny_model_dir, "straight"))],
                              cwd=REPO, capture_output=True, text=True, timeout=600)
    assert straight.returncode == 0, straight.stderr[-3000:]
    args = run_args(tmp_path, tiny_model_dir, "killed")
    run_dir = tmp_path / "out" / "killed"
    proc = start(args)
    wait_for(run_dir / "checkpoints" / "step_2" / "training_state.json", proc)
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    done_before = len(train_lines(run_dir))
    assert 2 <= done_before < 8  # killed mid-run, after a state
    rerun = subprocess.run([sys.executable, "-m", "open_instruct2.train_grpo", *map(str, args)], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert "resume: continuing" in rerun.stdout and "from step" in rerun.stdout
    a, b = weights(tmp_path / "out" / "straight"), weights(run_dir)
    start_weights = weights(tiny_model_dir)
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a), [k for k in a if not torch.equal(a[k], b[k])][:5]
    assert not torch.equal(a["model.norm.weight"], start_weights["model.norm.weight"])  # it trained
    lines = train_lines(run_dir)
    assert [m["step"] for m in lines] == list(range(1, 9))  # no step twice, none missing
    assert all(m["train/optimizer_steps"] >= 1 for m in lines)  # real updates on every step
    assert [m["reward/mean"] for m in lines] == [m["reward/mean"] for m in train_lines(tmp_path / "out" / "straight")]
    from test_train_e2e import scalars

    assert [e.step for e in scalars(run_dir).Scalars("reward/mean")] == list(range(1, 9))
    assert checkpoint.list_checkpoints(str(run_dir)) == ["step_6", "step_8"]  # keep_last_n_checkpoints 2


def test_sigterm_saves_a_state_and_the_rerun_finishes(tmp_path, tiny_model_dir):
    args = run_args(tmp_path, tiny_model_dir, "r")
    args[args.index("--checkpoint_state_freq") + 1] = "100"  # no state would be due before the end
    run_dir = tmp_path / "out" / "r"
    proc = start(args)
    wait_for(run_dir / "metrics.jsonl", proc)
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 143, stderr
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("stopped by SIGTERM after step") and "rerun the same command to continue" in lines[0]
    step = len(train_lines(run_dir))
    assert checkpoint.newest_state(str(run_dir)).endswith(f"step_{step}")
    rerun = subprocess.run([sys.executable, "-m", "open_instruct2.train_grpo", *map(str, args)], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert [m["step"] for m in train_lines(run_dir)] == list(range(1, 9))


def test_sigint_without_checkpointing_says_a_rerun_starts_over(tmp_path, tiny_model_dir):
    args = run_args(tmp_path, tiny_model_dir, "r")
    args[args.index("--checkpoint_state_freq") + 1] = "-1"
    proc = start(args)
    wait_for(tmp_path / "out" / "r" / "metrics.jsonl", proc)
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130, stderr
    assert "stopped by SIGINT after step" in stderr and "set --checkpoint_state_freq to be able to resume" in stderr


# ---------------------------------------------------------------- in-process: LoRA, bf16, failures


def stopped_after(cfg, steps):
    """train() with a stop request that fires once `steps` steps have run."""
    stop = StopRequest()
    original = trainer.train_step

    def counting(run, step):
        metrics = original(run, step)
        if step == steps:
            stop.signum = signal.SIGTERM
        return metrics

    trainer.train_step = counting
    try:
        with pytest.raises(Stopped) as info:
            trainer.train(cfg, stop)
    finally:
        trainer.train_step = original
    return info.value


@pytest.mark.parametrize("mode", ["lora", "bf16"])
def test_stop_and_resume_in_process_matches_a_straight_run(tmp_path, tiny_model_dir, mode):
    """LoRA (the adapter is reloaded through PEFT) and a bf16 policy (fp32 masters restored) resume exactly."""
    extra = {"lora": dict(train_mode="lora", lora_r=4), "bf16": dict(policy_dtype="bfloat16", train_mode="full")}[mode]
    common = dict(num_training_steps=4, checkpoint_state_freq=3, beta=0.1, num_evals=0, learning_rate=1e-2, **extra)
    straight = trainer.train(tiny_config(tmp_path / "a", tiny_model_dir, run_name="s", **common))
    cfg = tiny_config(tmp_path / "b", tiny_model_dir, run_name="s", **common)
    stopped = stopped_after(cfg, 2)
    assert "stopped by SIGTERM after step 2; resumable state in" in stopped.message and stopped.exit_code == 143
    resumed = trainer.train(tiny_config(tmp_path / "b", tiny_model_dir, run_name="s", **common))
    a, b = weights(straight), weights(resumed)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert [m["step"] for m in train_lines(resumed)] == [1, 2, 3, 4]


def test_an_interrupted_save_leaves_the_previous_state_loadable_and_resumable(tmp_path, tiny_model_dir, monkeypatch):
    cfg = tiny_config(tmp_path, tiny_model_dir, run_name="r", num_training_steps=3, checkpoint_state_freq=1, num_evals=0)
    saves = []
    real_save = torch.save

    def failing_save(obj, path, *a, **k):
        saves.append(path)
        if len(saves) == 2:  # the writer of step 2's state fails half-way: the model files are already written
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(obj, path, *a, **k)

    monkeypatch.setattr(checkpoint.torch, "save", failing_save)
    with pytest.raises(UserError, match=r"cannot write checkpoint .*step_2 \(the disk is full\); the previous state .*step_1 is intact"):
        trainer.train(cfg)
    monkeypatch.setattr(checkpoint.torch, "save", real_save)
    run_dir = tmp_path / "out" / "r"
    assert os.listdir(run_dir / "checkpoints") == ["step_1"]  # no half-written step_2, no temporary folder
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(str(run_dir / "checkpoints" / "step_1"))  # loadable on its own
    done = trainer.train(tiny_config(tmp_path, tiny_model_dir, run_name="r", num_training_steps=3, checkpoint_state_freq=1, num_evals=0))
    assert [m["step"] for m in train_lines(done)] == [1, 2, 3]  # resumed from step 1: no step twice


def test_changed_flags_are_refused_and_harmless_ones_allowed(tmp_path, tiny_model_dir):
    from open_instruct2.train_grpo import main

    args = [str(a) for a in run_args(tmp_path, tiny_model_dir, "r")]
    args[args.index("--num_training_steps") + 1] = "2"
    args[args.index("--checkpoint_state_freq") + 1] = "1"
    assert main(args) == 0  # a finished run with states in it
    run_dir = tmp_path / "out" / "r"
    before = {p: os.path.getmtime(os.path.join(run_dir, p)) for p in os.listdir(run_dir)}
    changed = args[:]
    changed[changed.index("--learning_rate") + 1] = "0.5"
    proc = subprocess.run([sys.executable, "-m", "open_instruct2.train_grpo", *changed], cwd=REPO, capture_output=True, text=True)
    assert_one_line_error(proc, "--learning_rate is 0.5 but the run in", "was trained with 0.001", "another --run_name")
    proc = subprocess.run([sys.executable, "-m", "open_instruct2.train_grpo", *args, "--resume", "false"], cwd=REPO, capture_output=True, text=True)
    assert_one_line_error(proc, "holds a resumable state", "--resume is false")
    assert {p: os.path.getmtime(os.path.join(run_dir, p)) for p in os.listdir(run_dir)} == before  # nothing touched
    # a harmless change (how often samples are logged) resumes; the run is complete, so nothing is left to do
    proc = subprocess.run([sys.executable, "-m", "open_instruct2.train_grpo", *args, "--log_samples_freq", "5"], cwd=REPO,
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "resume: continuing" in proc.stdout and [m["step"] for m in train_lines(run_dir)] == [1, 2]


def test_nonfinite_updates_are_skipped_and_k_in_a_row_stop_the_run(tmp_path, tiny_model_dir, monkeypatch, capsys):
    cfg = tiny_config(tmp_path, tiny_model_dir, run_name="r", num_training_steps=6, checkpoint_state_freq=1, max_nonfinite_updates=2,
                      filter_zero_std_groups=False, num_evals=0)
    real = trainer.compute_advantages
    monkeypatch.setattr(trainer, "compute_advantages", lambda *a: real(*a) * float("nan") if seen.append(1) or len(seen) > 1 else real(*a))
    seen = []
    with pytest.raises(UserError, match=r"2 steps in a row \(up to step 3\) had a non-finite loss or gradient and made no update; "
                                        r"the last state is .*step_3"):
        trainer.train(cfg)
    lines = train_lines(tmp_path / "out" / "r")
    assert [(m["train/optimizer_steps"], m["train/nonfinite_updates"]) for m in lines] == [(1.0, 0.0), (0.0, 1.0), (0.0, 1.0)]
    console = [line for line in capsys.readouterr().out.splitlines() if line.startswith(("step 2/6", "step 3/6"))]
    assert len(console) == 2 and all("| no update: the loss or gradient was not finite" in line for line in console)  # not "equal rewards"
    assert all(torch.isfinite(t).all() for t in weights(tmp_path / "out" / "r" / "checkpoints" / "step_3").values())


def test_a_nonfinite_gradient_leaves_weights_and_adam_untouched(tmp_path, tiny_model_dir):
    cfg = tiny_config(tmp_path, tiny_model_dir, train_mode="full")
    run = trainer.setup(cfg)
    batch = trainer.next_batch(run.prompts, run.sampler, 2)
    rollouts = generate_rollouts(run.policy, run.tokenizer, batch, num_samples=3, response_length=8, temperature=0.7, top_p=1.0,
                                 stop_strings=None, device=torch.device("cpu"))
    before = {n: p.detach().clone() for n, p in run.policy.named_parameters()}
    rows = update.LossRows(list(range(6)), list(range(6)))
    metrics = update.update_policy(run, rollouts, torch.tensor([1.0, float("nan"), 0.5, -0.5, 2.0, -2.0]), None, rows)
    assert metrics["train/nonfinite_updates"] == 1.0 and metrics["train/optimizer_steps"] == 0.0
    assert all(torch.equal(p, before[n]) for n, p in run.policy.named_parameters())
    assert run.optimizer.state_dict()["state"] == {}  # AdamW never saw the bad gradient


# ---------------------------------------------------------------- hardening: what a resume must never do silently


def files_of(folder):
    """path -> (size, mtime) of every file under `folder`: to check nothing was written."""
    out = {}
    for root, _, names in os.walk(folder):
        for name in names:
            path = os.path.join(root, name)
            out[path] = (os.path.getsize(path), os.path.getmtime(path))
    return out


def test_a_state_is_never_resumed_at_another_precision(tmp_path, tiny_model_dir, monkeypatch):
    """A state saved where --policy_dtype auto gave fp32 (no master weights), resumed where auto gives bf16 (here: a
    CPU that reports native bf16): the master list zipped against the empty saved one and the starting weights
    were written over the loaded ones, silently. Now: one line naming both sides and the fix, nothing written; the
    fix it names (--policy_dtype float32, an explicit flag where auto was used) resumes."""
    from open_instruct2 import runtime
    from test_train_e2e import VERIFIER

    (tmp_path / "v.py").write_text(VERIFIER)  # even_length: groups differ, so every step really moves the weights
    common = dict(policy_dtype=None, num_training_steps=3, checkpoint_state_freq=1, num_evals=0, beta=0.1, learning_rate=1e-2,
                  verifier_module=str(tmp_path / "v.py"), remap_verifier=["gsm8k=even_length"], temperature=1.0, num_samples_per_prompt_rollout=4)
    native = runtime.cpu_has_native_bf16()
    saved, other = ("bfloat16", "float32") if native else ("float32", "bfloat16")
    stopped_after(tiny_config(tmp_path, tiny_model_dir, run_name="r", **common), 2)
    run_dir = tmp_path / "out" / "r"
    before = files_of(run_dir)
    monkeypatch.setattr(runtime, "cpu_has_native_bf16", lambda: not native)  # the same command on another machine
    with pytest.raises(UserError, match=rf"trained on cpu in {saved}, but this run resolves to cpu in {other}; resume it with --policy_dtype {saved}"):
        trainer.train(tiny_config(tmp_path, tiny_model_dir, run_name="r", **common))
    assert files_of(run_dir) == before  # nothing written, nothing lost
    # a state from before the runtime was recorded in it: the run's saved config says what it ran on
    meta_path, config_path = run_dir / "checkpoints" / "step_2" / "training_state.json", run_dir / checkpoint.CONFIG_FILE
    meta, config = json.loads(meta_path.read_text()), json.loads(config_path.read_text())
    meta_path.write_text(json.dumps({k: v for k, v in meta.items() if k not in ("runtime", "master_shapes")}))
    before = files_of(run_dir)
    with pytest.raises(UserError, match=rf"trained on cpu in {saved}, but this run resolves to cpu in {other}"):
        trainer.train(tiny_config(tmp_path, tiny_model_dir, run_name="r", **common))
    # and without that either: the master weights' count, read off the saved tensors, before anything is restored
    config_path.write_text(json.dumps({k: v for k, v in config.items() if k != "runtime"}))
    before = files_of(run_dir)
    with pytest.raises(UserError, match="fp32 master weights, but this run's policy needs"):
        trainer.train(tiny_config(tmp_path, tiny_model_dir, run_name="r", **common))
    assert files_of(run_dir) == before
    meta_path.write_text(json.dumps(meta))
    config_path.write_text(json.dumps(config))
    done = trainer.train(tiny_config(tmp_path, tiny_model_dir, run_name="r", **{**common, "policy_dtype": saved}))
    assert [m["step"] for m in train_lines(done)] == [1, 2, 3]
    straight = trainer.train(tiny_config(tmp_path / "s", tiny_model_dir, run_name="r", **{**common, "policy_dtype": saved}))
    a, b, start_weights = weights(straight), weights(done), weights(tiny_model_dir)
    assert all(torch.equal(a[k], b[k]) for k in a)  # it continued from the saved weights, not from the start
    assert not torch.equal(a["model.layers.0.mlp.down_proj.weight"], start_weights["model.layers.0.mlp.down_proj.weight"])  # it trained


def test_the_eval_table_and_the_failure_streaks_survive_a_resume(tmp_path, tiny_model_dir, monkeypatch, capsys):
    """The state holds the evaluations so far (the before/after table keeps step 0) and the streak counters (a
    non-finite step before the stop and one after it are two in a row)."""
    data = tmp_path / "rows.jsonl"
    common = dict(num_training_steps=4, checkpoint_state_freq=1, beta=0.1, num_evals=2, max_nonfinite_updates=2,
                  dataset_mixer_eval_list=[str(data), "4"], dataset_mixer_eval_list_splits=["train"])
    real = trainer.compute_advantages
    poisoned = set()
    step_of = {"n": 0}

    def advantages(*a):
        step_of["n"] += 1
        return real(*a) * float("nan") if step_of["n"] in poisoned else real(*a)

    monkeypatch.setattr(trainer, "compute_advantages", advantages)
    poisoned.add(2)
    stopped_after(tiny_config(tmp_path, tiny_model_dir, run_name="r", **common), 2)
    meta = json.loads((tmp_path / "out" / "r" / "checkpoints" / "step_2" / "training_state.json").read_text())
    assert meta["streaks"] == {"nonfinite": 1, "judge": 0, "reward": 0} and [s for s, _ in meta["evals"]] == [0]  # step 2's comes after its save
    step_of["n"], poisoned = 2, {3}  # the resumed run's first step (3) is non-finite too: 2 in a row
    with pytest.raises(UserError, match=r"2 steps in a row \(up to step 3\) had a non-finite loss"):
        trainer.train(tiny_config(tmp_path, tiny_model_dir, run_name="r", **common))
    capsys.readouterr()
    step_of["n"], poisoned = 2, set()
    trainer.train(tiny_config(tmp_path, tiny_model_dir, run_name="r", **{**common, "max_nonfinite_updates": 3}))
    table = capsys.readouterr().out
    assert "| metric | step 0 | step 4 | change |" in table  # step 0 came from the state


def test_logs_after_the_state_are_dropped_and_a_torn_line_is_survived(tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    lines = [json.dumps({"step": s, "reward/mean": 0.5}) for s in range(1, 5)]
    (run_dir / "metrics.jsonl").write_text("\n".join(lines) + '\n{"step": 5, "reward/me')  # a crash mid-write
    (run_dir / "adaptive_rubrics_r.jsonl").write_text("".join(json.dumps({"step": s, "prompt_id": "p"}) + "\n" for s in (1, 2, 3, 3, 4)))
    from open_instruct2 import state

    state.truncate_logs(str(run_dir), 2, "r")
    assert [json.loads(x)["step"] for x in (run_dir / "metrics.jsonl").read_text().splitlines()] == [1, 2]
    assert [json.loads(x)["step"] for x in (run_dir / "adaptive_rubrics_r.jsonl").read_text().splitlines()] == [1, 2]


def test_a_crash_while_a_step_is_saved_again_keeps_it(tmp_path):
    """Re-saving step N moves step_N aside (.step_N.old) and the new one (.step_N.tmp, complete) in: a crash
    between the two renames left only those two, and start-up deleted both. Now the new copy becomes step_N."""
    root = tmp_path / "run" / "checkpoints"
    (root / "step_1").mkdir(parents=True)
    (root / ".step_2.old").mkdir()
    (root / ".step_2.old" / "training_state.json").write_text("old")
    (root / ".step_2.tmp").mkdir()
    (root / ".step_2.tmp" / "training_state.json").write_text("new")
    (root / ".step_2.tmp" / "training_state.pt").write_text("tensors")
    (root / ".step_3.tmp").mkdir()  # a save cut short before anything was moved: thrown away
    from open_instruct2.config import check_run_dir_free

    assert check_run_dir_free(str(tmp_path / "run"), resume=True)  # the rerun resumes from it (it said: no resumable state)
    checkpoint.remove_partial_saves(str(tmp_path / "run"))
    assert sorted(os.listdir(root)) == ["step_1", "step_2"] and (root / "step_2" / "training_state.json").read_text() == "new"
    (root / ".step_4.old").mkdir()  # only the old copy: it comes back
    (root / ".step_4.old" / "x").write_text("old")
    checkpoint.remove_partial_saves(str(tmp_path / "run"))
    assert sorted(os.listdir(root)) == ["step_1", "step_2", "step_4"] and (root / "step_4" / "x").read_text() == "old"


def test_the_final_model_and_the_config_are_written_beside_then_renamed(tmp_path, tiny_model_dir, monkeypatch):
    """A full disk while the final model is written: the model already at the run folder's root stays whole and
    loadable, and the error is one line naming the last state."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model, tok = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir)), AutoTokenizer.from_pretrained(str(tiny_model_dir))
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    checkpoint.save_final(model, tok, str(run_dir), lora=False, merged=False)
    first = (run_dir / "model.safetensors").read_bytes()
    real = type(model).save_pretrained

    def full_disk(self, folder, *a, **k):
        with open(os.path.join(folder, "model.safetensors"), "wb") as f:
            f.write(b"half a file")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(type(model), "save_pretrained", full_disk)
    with pytest.raises(UserError, match=r"cannot write the final model into .* \(the disk is full\)"):
        checkpoint.save_final(model, tok, str(run_dir), lora=False, merged=False)
    monkeypatch.setattr(type(model), "save_pretrained", real)
    assert (run_dir / "model.safetensors").read_bytes() == first and not (run_dir / ".final.tmp").exists()
    AutoModelForCausalLM.from_pretrained(str(run_dir))
    checkpoint.save_config({"flags": {"a": 1}}, str(run_dir))
    assert json.loads((run_dir / checkpoint.CONFIG_FILE).read_text()) == {"flags": {"a": 1}}
    real_dump = checkpoint.json.dump

    def dump_half(obj, f, **k):  # a full disk half-way through the config: the rerun's flag check reads the old one whole
        f.write('{"flags": {"a"')
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(checkpoint.json, "dump", dump_half)
    with pytest.raises(UserError, match=r"cannot write .*open_instruct2_config.json \(the disk is full\)"):
        checkpoint.save_config({"flags": {"a": 2}}, str(run_dir))
    monkeypatch.setattr(checkpoint.json, "dump", real_dump)
    assert json.loads((run_dir / checkpoint.CONFIG_FILE).read_text()) == {"flags": {"a": 1}}
    assert not list(run_dir.glob("*.tmp"))


def test_connection_and_generation_flags_may_change_on_resume(tmp_path):
    """The judge-failure message says to check --llm_judge_base_url: following it must not make resume impossible;
    generation paths that sample the same distribution may change too. A flag of the math still may not."""
    from open_instruct2.config import ConfigError
    from open_instruct2.state import check_same_flags

    saved = {"llm_judge_base_url": None, "llm_judge_timeout": 60, "llm_judge_max_retries": 3, "llm_judge_max_concurrency": 16,
             "llm_judge_api_key_env": "OPENAI_API_KEY", "llm_judge_max_failed_steps": 3, "generation_cache": "auto",
             "generation_linear": "auto", "lora_generation": "auto", "rollout_vllm_lora_sync": "auto", "policy_dtype": None,
             "learning_rate": 2e-5}
    (tmp_path / checkpoint.CONFIG_FILE).write_text(json.dumps({"flags": saved}))
    changed = {"llm_judge_base_url": "http://127.0.0.1:9/v1", "llm_judge_timeout": 30, "llm_judge_max_retries": 5,
               "llm_judge_max_concurrency": 4, "llm_judge_api_key_env": "MY_KEY", "llm_judge_max_failed_steps": 9,
               "generation_cache": "dynamic", "generation_linear": "plain", "lora_generation": "adapters",
               "rollout_vllm_lora_sync": "merged", "policy_dtype": "float32", "learning_rate": 2e-5}
    check_same_flags(str(tmp_path), changed)  # nothing refused (the dtype is compared as resolved, in the state)
    with pytest.raises(ConfigError, match="--learning_rate is 0.1"):
        check_same_flags(str(tmp_path), {**changed, "learning_rate": 0.1})


def test_the_kl_temperature_of_a_state_must_not_change_on_resume(tmp_path):
    """A plugin endpoint (KL at the sampling temperature) restarted plainly (KL at 1) would change the objective
    mid-run: the rerun is refused, naming how to start the endpoint."""
    from open_instruct2.config import ConfigError
    from open_instruct2.state import check_kl_temperature

    (tmp_path / "training_state.json").write_text(json.dumps({"step": 2, "kl_temperature": 0.7}))
    check_kl_temperature(str(tmp_path), 0.7)
    check_kl_temperature(str(tmp_path), None)  # beta 0 now: no KL term to compare
    with pytest.raises(ConfigError, match="KL term at temperature 0.7, but the reference now serves log-probs at temperature 1; "
                                          "start the endpoint with OPEN_INSTRUCT2_LOGPROB_TEMPERATURE=0.7"):
        check_kl_temperature(str(tmp_path), 1.0)
