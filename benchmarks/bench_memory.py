"""What each memory knob saves, and what the profiler costs, measured with the profiler itself.

    python benchmarks/bench_memory.py              # ~15 minutes on a 2-core CPU

Every row is a real run of the entry point on the builtin SmolLM2-135M and arithmetic data (2 steps of
2 prompts x 4 samples x 64 tokens, fp32, beta 0.05) with --enable_memory_profile; the table gives the
peak RSS of the trainer and of its children (the launched vLLM server and its workers) from
memory_summary.json. Then the profiler's overhead: the same LoRA run with and without it, alternating.
Prints only.
"""

import json
import os
import statistics
import subprocess
import sys
import tempfile

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
BASE = ["--num_unique_prompts_rollout", "2", "--num_samples_per_prompt_rollout", "4", "--response_length", "64",
        "--policy_dtype", "float32", "--num_evals", "0", "--log_samples_freq", "-1"]
CONFIGS = [
    ("full, in-process reference (a frozen copy), gradient checkpointing, micro-batch 1",
     ["--train_mode", "full", "--reference_mode", "in_process"], {}),
    ("LoRA r16, in-process reference (adapters off: no copy)",
     ["--train_mode", "lora", "--reference_mode", "in_process"], {}),
    ("full, no gradient checkpointing", ["--train_mode", "full", "--reference_mode", "in_process", "--gradient_checkpointing", "false"], {}),
    ("full, micro-batch 8", ["--train_mode", "full", "--reference_mode", "in_process", "--per_device_train_batch_size", "8"], {}),
    ("full, launched vLLM reference, KV cache 2 GiB (default), max len 513",
     ["--train_mode", "full", "--reference_mode", "launch_local_vllm", "--reference_launch_port", "8517"], {}),
    ("full, launched vLLM reference, KV cache 1 GiB, max len 513",
     ["--train_mode", "full", "--reference_mode", "launch_local_vllm", "--reference_launch_port", "8518"], {"VLLM_CPU_KVCACHE_SPACE": "1"}),
    ("full, launched vLLM reference, KV cache 2 GiB, max len 4096",
     ["--train_mode", "full", "--reference_mode", "launch_local_vllm", "--reference_launch_port", "8519",
      "--reference_launch_max_model_len", "4096"], {}),
]


def run(args: list[str], env: dict, out: str, name: str) -> dict:
    command = [sys.executable, "-m", "open_instruct2.train_grpo", *BASE, *args, "--output_dir", out, "--run_name", name]
    proc = subprocess.run(command, cwd=ROOT, env={**os.environ, **env}, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{name} failed: {proc.stderr[-2000:]}")
    run_dir = os.path.join(out, name)
    summary_path = os.path.join(run_dir, "memory_profile", "memory_summary.json")
    summary = json.load(open(summary_path)) if os.path.exists(summary_path) else None
    steps = [json.loads(line) for line in open(os.path.join(run_dir, "metrics.jsonl")) if '"reward/mean"' in line]
    return {"summary": summary, "step_s": [m["time/step"] for m in steps]}


def main():
    out = tempfile.mkdtemp(prefix="bench_memory_")
    print("| configuration | trainer peak MB | children peak MB | total peak MB |")
    print("|---|---|---|---|")
    for i, (label, args, env) in enumerate(CONFIGS):
        s = run([*args, "--num_training_steps", "2", "--enable_memory_profile", "true"], env, out, f"c{i}")["summary"]
        print(f"| {label} | {s['peak_trainer']['mb']:.0f} ({s['peak_trainer']['phase']}) | {s['peak_children']['mb']:.0f} | {s['peak_total']['mb']:.0f} |", flush=True)
    lora = ["--train_mode", "lora", "--reference_mode", "in_process", "--num_training_steps", "4"]
    with_p, without = [], []
    for i in range(2):
        without += run(lora, {}, out, f"off{i}")["step_s"][1:]
        with_p += run([*lora, "--enable_memory_profile", "true", "--memory_profile_interval_s", "1"], {}, out, f"on{i}")["step_s"][1:]
    a, b = statistics.median(without), statistics.median(with_p)
    print(f"profiler overhead (LoRA, 4 steps x 2 runs each, first step left out, alternating): median step {a:.2f} s without, "
          f"{b:.2f} s with a 1 s interval ({100 * (b / a - 1):+.1f}%)")


if __name__ == "__main__":
    main()
