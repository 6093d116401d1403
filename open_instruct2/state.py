"""The resumable training state, saved and loaded as one unit (`--checkpoint_state_freq N`).

A state checkpoint (checkpoints/step_<N>/, written atomically by checkpoint.py) holds:
- the model (full) or the adapter (LoRA), as save_pretrained files: loadable on their own;
- training_state.pt: the fp32 master weights of low-precision parameters, the AdamW state, the scheduler,
  and the RNG states (Python, NumPy, torch CPU, every CUDA device);
- training_state.json: the step, the responses sampled so far (episodes), the prompt sampler's position, the rubric
  buffer (plain JSON), the evaluations so far (for the before/after table), the failure-streak counters, the wandb run id,
  the resolved runtime (device kind and dtype) and the master weights' shapes, and the flags it was trained with.

Rerunning the same command continues from the newest state in the run folder: weights, optimizer,
schedule, data order and random streams come back exactly, so on a CPU the weights at the end are
bit-identical to an uninterrupted run's (tests/test_resume.py). Metrics after the state's step (a crashed
run may have logged a few) are dropped from metrics.jsonl and TensorBoard, so the logs continue without
duplicate or missing steps (adaptive_rubrics_<run>.jsonl too; a torn last line, from a crash mid-write, is
dropped). Changing a flag that alters the math between the crash and the rerun is refused (naming the flag); the
flags in HARMLESS may change. The runtime flags (RESOLVED) are compared as what they resolve to: a state saved in
fp32 is never resumed in bf16 because `--policy_dtype auto` resolves differently on another machine, and
nothing is restored from a state whose tensors do not fit the model (count and shapes checked first).
"""

import json
import logging
import os
import random

import numpy as np
import torch

from .checkpoint import CONFIG_FILE, STATE_META, STATE_TENSORS
from .errors import ConfigError

log = logging.getLogger(__name__)

HARMLESS = {
    # logging, checkpointing and profiling: what is written, not what is learned
    "log_level", "log_samples_freq", "save_rollouts", "save_freq", "checkpoint_state_freq", "keep_last_n_checkpoints",
    "with_tracking", "wandb_project_name", "wandb_entity", "num_evals", "eval_max_samples", "shuffle_eval_dataset",
    "dataset_mixer_eval_list", "dataset_mixer_eval_list_splits", "eval_num_samples", "eval_temperature", "eval_success_threshold",
    "reward_funcs_max_failed_steps",
    "dry_run", "resume",
    "enable_memory_profile", "memory_profile_interval_s", "memory_profile_top_n_children", "memory_profile_mark_steps",
    "memory_profile_step_interval", "memory_profile_enable_tracemalloc",
    # where the reference is served from (not which model it is), timeouts and retries, threads
    "reference_endpoint", "reference_api_key", "reference_served_model_name", "reference_launch_host", "reference_launch_port",
    "reference_launch_gpu_memory_utilization", "reference_launch_tensor_parallel_size", "reference_launch_extra_args",
    "reference_startup_timeout_s", "reference_timeout_s", "reference_max_retries", "num_threads", "max_nonfinite_updates",
    # where the rollout server runs (its weights are always the policy's)
    "rollout_vllm_endpoint", "rollout_vllm_port", "rollout_vllm_gpu_memory_utilization", "rollout_vllm_extra_args",
    "rollout_vllm_served_model_name",
    # how generation runs, not what it samples (the same distribution; the importance weights correct a copy's rounding)
    "generation_cache", "generation_linear", "lora_generation", "rollout_vllm_lora_sync",
    # how the judge is reached (not which judge it is): what the judge-failure message tells a user to fix
    "llm_judge_base_url", "llm_judge_timeout", "llm_judge_max_retries", "llm_judge_max_concurrency", "llm_judge_api_key_env",
    "llm_judge_max_failed_steps",
}
RESOLVED = {"runtime_target", "device", "policy_dtype"}
"""Compared as the device kind and dtype they resolve to (saved in the state), not as flags: `--policy_dtype
float32` continues a state that auto saved in fp32, and auto resolving to bf16 on another machine is refused."""


def capture(run, step: int) -> tuple[dict, dict]:
    """(tensors for torch.save, JSON-able meta) of the state after `step`."""
    cuda = [t.cpu() for t in torch.cuda.get_rng_state_all()] if torch.cuda.is_available() else []
    tensors = {
        "masters": [m.detach().clone() for _, m in run.master.pairs],
        "optimizer": run.optimizer.state_dict(),
        "scheduler": run.scheduler.state_dict(),
        "rng": {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(), "cuda": cuda},
    }
    cfg = run.cfg
    meta = {
        "step": step,
        "episodes": run.episodes,  # every sampled response, --dynamic_sampling's further rounds included
        "sampler": run.sampler.state_dict(),
        "rubric_buffer": run.rubric_buffer,
        "evals": [[s, m] for s, m in run.evals],
        "streaks": {"nonfinite": run.nonfinite_streak, "judge": run.judge_streak, "reward": run.reward_streak},
        "wandb_id": run.tracker.wandb_id,
        "runtime": runtime_key(run.runtime),
        "kl_temperature": None if run.reference is None else run.reference.temperature,
        "master_shapes": [list(m.shape) for _, m in run.master.pairs],
        "flags": cfg.masked(),
        "train_mode": cfg.lora.train_mode,
    }
    return tensors, meta


def runtime_key(runtime) -> dict:
    """What a state must be resumed on: the device kind and the policy's dtype."""
    return {"device": runtime.device.type, "dtype": str(runtime.dtype).removeprefix("torch.")}


def config_runtime(folder: str) -> dict | None:
    """A state saved before the runtime was recorded in it: the runtime of the run's saved config (the config of the
    run that wrote the newest state)."""
    path = os.path.join(os.path.dirname(os.path.dirname(folder)), CONFIG_FILE)
    try:
        with open(path) as f:
            described = json.load(f).get("runtime") or {}
    except (OSError, ValueError):
        return None
    if "device" not in described or "dtype" not in described:
        return None
    return {"device": str(described["device"]).split(":")[0], "dtype": str(described["dtype"])}


def read_meta(folder: str) -> dict:
    with open(os.path.join(folder, STATE_META)) as f:
        return json.load(f)


def check_resumable(folder: str, runtime, master) -> None:
    """Refuse, before anything is restored or written, a state saved on another device kind or dtype, or whose
    master weights do not fit this model (one line naming both sides and the fix)."""
    meta = read_meta(folder)
    saved, here = meta.get("runtime") or config_runtime(folder), runtime_key(runtime)
    if saved is not None and saved != here:
        raise ConfigError(
            f"the state in {folder} was trained on {saved['device']} in {saved['dtype']}, but this run resolves to {here['device']} in "
            f"{here['dtype']}; resume it with --policy_dtype {saved['dtype']}" + (f" --device {saved['device']}" if saved["device"] != here["device"] else "")
            + " (or start a new run with another --run_name)"
        )
    shapes = meta.get("master_shapes")
    if shapes is None:  # a state saved before the shapes were recorded: read them off its tensors (mapped, not loaded)
        masters = torch.load(os.path.join(folder, STATE_TENSORS), map_location="cpu", mmap=True, weights_only=False)["masters"]
        shapes = [list(t.shape) for t in masters]
    check_masters(folder, shapes, master)


def check_kl_temperature(folder: str, temperature: float | None) -> None:
    """Refuse continuing with the KL term at another temperature than the state was trained with (a reference
    endpoint restarted with or without OPEN_INSTRUCT2_LOGPROB_TEMPERATURE)."""
    saved = read_meta(folder).get("kl_temperature")
    if saved is not None and temperature is not None and abs(saved - temperature) > 1e-9:
        from .vllm_plugin import ENV

        fix = f"start the endpoint with {ENV}={saved:g}" if saved != 1.0 else f"start the endpoint without {ENV}"
        raise ConfigError(f"the state in {folder} was trained with the KL term at temperature {saved:g}, but the reference now serves "
                          f"log-probs at temperature {temperature:g}; {fix} to resume (or start a new run with another --run_name)")


def check_masters(folder: str, saved_shapes: list, master) -> None:
    """The saved fp32 master weights must be one per low-precision trainable parameter, of the same shapes."""
    shapes = [list(m.shape) for _, m in master.pairs]
    if [list(s) for s in saved_shapes] != shapes:
        raise ConfigError(
            f"the state in {folder} holds {len(saved_shapes)} fp32 master weights, but this run's policy needs {len(shapes)}"
            f"{' of other shapes' if len(saved_shapes) == len(shapes) else ''} (it was saved at another precision or for another model); "
            "resume with the flags it was trained with, or start a new run with another --run_name"
        )


def saved_step(folder: str) -> int:
    return int(read_meta(folder)["step"])


def restore(run, folder: str) -> int:
    """Load a state into a freshly set-up run; returns the step it was saved after. Everything is checked
    (check_resumable, the masters' count and shapes) before the first tensor is copied."""
    meta = read_meta(folder)
    check_resumable(folder, run.runtime, run.master)
    tensors = torch.load(os.path.join(folder, STATE_TENSORS), map_location="cpu", weights_only=False)
    check_masters(folder, [list(t.shape) for t in tensors["masters"]], run.master)
    load_weights(run.policy, folder, meta["train_mode"] == "lora")
    for (param, master), saved in zip(run.master.pairs, tensors["masters"]):
        master.data.copy_(saved)
    run.master.master_to_model()  # the low-precision weights are the masters rounded, as after a step
    run.optimizer.load_state_dict(tensors["optimizer"])
    run.scheduler.load_state_dict(tensors["scheduler"])
    run.sampler.load_state_dict(meta["sampler"])
    run.rubric_buffer = meta.get("rubric_buffer")
    run.evals = [(int(s), m) for s, m in meta.get("evals", [])]
    streaks = meta.get("streaks", {})
    run.nonfinite_streak, run.judge_streak = int(streaks.get("nonfinite", 0)), int(streaks.get("judge", 0))
    run.reward_streak = int(streaks.get("reward", 0))
    run.episodes = int(meta.get("episodes", int(meta["step"]) * run.derived.rollout_batch_size))  # a state saved before it was kept
    rng = tensors["rng"]
    random.setstate(rng["python"])
    np.random.set_state(rng["numpy"])
    torch.set_rng_state(rng["torch"])
    if rng["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])
    return int(meta["step"])


def load_weights(policy, folder: str, lora: bool) -> None:
    """The trainable weights of a state folder into the policy, exactly (safetensors keep the bytes)."""
    from safetensors.torch import load_file

    if lora:
        from peft import set_peft_model_state_dict

        result = set_peft_model_state_dict(policy, load_file(os.path.join(folder, "adapter_model.safetensors")))
        unexpected = getattr(result, "unexpected_keys", [])
        if unexpected:
            raise ConfigError(f"the adapter in {folder} does not fit this model ({unexpected[:3]}...); resume with the same LoRA flags")
        return
    weights = {}
    for name in sorted(os.listdir(folder)):
        if name.endswith(".safetensors"):
            weights.update(load_file(os.path.join(folder, name)))
    missing, unexpected = policy.load_state_dict(weights, strict=False)
    tied = {k for k in missing if k.endswith("lm_head.weight")}  # saved once, as the input embeddings
    if unexpected or set(missing) - tied:
        raise ConfigError(f"the weights in {folder} do not fit this model (missing {sorted(set(missing) - tied)[:3]}, "
                          f"unexpected {sorted(unexpected)[:3]}); resume with the same --model_name_or_path")


def check_same_flags(run_dir: str, flags: dict) -> None:
    """Refuse a rerun whose flags would change the math of the run it continues."""
    path = os.path.join(run_dir, CONFIG_FILE)
    if not os.path.isfile(path):
        return
    with open(path) as f:
        before = json.load(f).get("flags", {})
    for name, value in flags.items():
        if name in HARMLESS or name in RESOLVED or name not in before:
            continue
        if json.loads(json.dumps(value, default=str)) != before[name]:
            raise ConfigError(
                f"--{name} is {value!r} but the run in {run_dir} was trained with {before[name]!r}; resuming needs the same value "
                f"(or start a new run with another --run_name)"
            )


def truncate_logs(run_dir: str, step: int, run_name: str | None = None) -> None:
    """Drop the lines after `step` (logged by a run that crashed before its next state) from metrics.jsonl and
    adaptive_rubrics_<run_name>.jsonl. A line that is not JSON (the torn last line of a crash mid-write) is
    dropped too, with a warning."""
    names = ["metrics.jsonl"] + ([f"adaptive_rubrics_{run_name}.jsonl"] if run_name else [])
    for name in names:
        path = os.path.join(run_dir, name)
        if not os.path.isfile(path):
            continue
        kept, torn = [], 0
        with open(path) as f:
            for line in f:
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except ValueError:
                    torn += 1
                    continue
                if record.get("step", 0) <= step:
                    kept.append(line if line.endswith("\n") else line + "\n")
        if torn:
            log.warning("resume: dropped %d unreadable line(s) of %s (a write cut short by the crash)", torn, path)
        tmp = path + ".tmp"
        with open(tmp, "w") as f:
            f.writelines(kept)
        os.replace(tmp, path)
