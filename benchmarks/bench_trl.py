"""Ours against TRL's GRPOTrainer at equal settings, in one invocation (`make bench`).

    python benchmarks/bench_trl.py [--steps 5] [--prompts 2] [--samples 4] [--length 64] [--skip-vllm] [--dtype auto]
                                   [--ours-variant '--generation_linear plain'] [--prompt-tokens 256]

Both train a random-initialised model of the builtin shape (SmolLM2-135M) with its real tokenizer: random
weights never say eos, so every completion runs to the length limit and both trainers do exactly the same
work. Same prompts (builtin arithmetic), samples per prompt, response length, temperature 0.7, top_p 1, no
top-k, no penalties, beta 0, one precision (--dtype; auto: what our runtime picks on this CPU), full fine-tuning, learning rate, one optimizer step per rollout batch, one
micro-batch per step. A third row runs ours with a launched vLLM reference (beta 0.05) to show its cost, a
fourth ours with rollouts on a launched vLLM server (--rollout_backend vllm, weights synced every step).

--prompt-tokens N: long prompts, the case the shared prefix is for (README "Shared prefix and memory"): both
trainers get the same system message of filler sentences in front of every problem, sized so that the prompts
average about N tokens (ours through --system_prompt_file, TRL as the first turn of each prompt); ours keeps its
default --shared_prefix auto, TRL computes every sample's prompt.

For each: completions/s, seconds per step split into generation / reference+scoring / update (the first step,
warm-up, left out; medians), peak RSS of the whole process tree. Then the ratio, and the step's floor on this
machine from numbers measured in the same run: training ~ 6 x params x tokens and generation prefill
~ 2 x params x tokens at the matmul rate measured at the run's precision, and the decode floor = one read of the weights per
generated token step at the measured memory bandwidth. Prints only; the history is in BENCHMARKS.md.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)


def settings(args) -> dict:
    """The one source of every number both trainers get."""
    return {"prompts": args.prompts, "samples": args.samples, "length": args.length, "steps": args.steps, "learning_rate": 1e-6,
            "temperature": 0.7, "top_p": 1.0, "beta": 0.0, "seed": 1, "dtype": getattr(args, "dtype", "float32"), "system": None}


def system_turns(s: dict) -> list[dict]:
    """The long-prompt row's system message as the first turn of a prompt ([] without --prompt-tokens)."""
    return [] if s["system"] is None else [{"role": "system", "content": s["system"]}]


FILLER = ("Read the problem with care, work the arithmetic step by step, check each partial result against the numbers "
          "given, and write the final number after four hash marks. ")


def long_system_prompt(tokenizer, rows: list[dict], prompt_tokens: int) -> str:
    """Filler sentences as a system message, as many as bring the mean prompt of `rows` to about prompt_tokens tokens."""
    from open_instruct2.data import tokenize_prompt

    def mean_tokens(system: str) -> float:
        return statistics.mean(len(tokenize_prompt(tokenizer, [{"role": "system", "content": system}, *r["messages"]])) for r in rows)

    system = FILLER
    while mean_tokens(system + FILLER) <= prompt_tokens:
        system += FILLER
    return system.strip()


def ours_args(s: dict, model_dir: str, out: str, name: str, reference: str = "none", rollout: str = "hf") -> list[str]:
    batch = s["prompts"] * s["samples"]
    args = ["--model_name_or_path", model_dir, "--train_mode", "full", "--policy_dtype", s["dtype"],
            "--num_unique_prompts_rollout", str(s["prompts"]), "--num_samples_per_prompt_rollout", str(s["samples"]),
            "--response_length", str(s["length"]), "--num_training_steps", str(s["steps"]), "--learning_rate", str(s["learning_rate"]),
            "--temperature", str(s["temperature"]), "--top_p", str(s["top_p"]), "--seed", str(s["seed"]),
            "--per_device_train_batch_size", str(batch), "--num_mini_batches", "1", "--num_epochs", "1",
            "--gradient_checkpointing", "false", "--num_evals", "0", "--log_samples_freq", "-1",
            "--filter_zero_std_groups", "false",  # TRL computes every sample; so do we
            "--output_dir", out, "--run_name", name, "--lr_scheduler_type", "constant"]
    if s["system"] is not None:
        path = os.path.join(out, "system_prompt.txt")
        os.makedirs(out, exist_ok=True)
        with open(path, "w") as f:
            f.write(s["system"])
        limit = s["longest_prompt"] + 64  # (256 by default: no long prompt is dropped, as TRL drops none)
        args += ["--system_prompt_file", path, "--max_prompt_token_length", str(limit), "--max_token_length", str(limit + s["length"])]
    if reference == "none":
        args += ["--beta", str(s["beta"]), "--reference_mode", "none"]
    else:
        args += ["--beta", "0.05", "--reference_mode", reference, "--reference_launch_port", "8541"]
    if rollout == "vllm":
        args += ["--rollout_backend", "vllm", "--rollout_vllm_port", "8542"]
    return args


def trl_config(s: dict, out: str) -> dict:
    """GRPOConfig keyword arguments equal to ours_args."""
    batch = s["prompts"] * s["samples"]
    # TRL's bf16 on a CPU is autocast over fp32 weights (its documented mode); ours keeps bf16 weights + fp32 masters
    return dict(output_dir=out, use_cpu=True, bf16=s["dtype"] == "bfloat16", num_generations=s["samples"], per_device_train_batch_size=batch,
                gradient_accumulation_steps=1, steps_per_generation=1, num_iterations=1, max_completion_length=s["length"],
                max_steps=s["steps"], learning_rate=s["learning_rate"], lr_scheduler_type="constant", beta=s["beta"],
                temperature=s["temperature"], top_p=s["top_p"], top_k=0, min_p=None, repetition_penalty=1.0, seed=s["seed"],
                logging_steps=1, report_to="none", save_strategy="no", gradient_checkpointing=False, dataloader_num_workers=0)


def make_random_model(out: str) -> str:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from open_instruct2.bootstrap import ensure_builtin_model

    src = str(ensure_builtin_model("builtin:smollm2-135m-instruct"))
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(src), dtype=torch.float32).save_pretrained(out)
    AutoTokenizer.from_pretrained(src).save_pretrained(out)
    return out


def watch(command: list[str], cwd: str, env: dict | None = None) -> tuple[subprocess.CompletedProcess, float]:
    """Run a command; returns it and the peak summed RSS (MB) of its process tree, sampled every 0.2 s."""
    import psutil

    proc = subprocess.Popen(command, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env={**os.environ, **(env or {})})
    peak, root = 0.0, psutil.Process(proc.pid)
    while proc.poll() is None:
        try:
            tree = [root, *root.children(recursive=True)]
            peak = max(peak, sum(p.memory_info().rss for p in tree if p.is_running()) / 2**20)
        except psutil.Error:
            pass
        time.sleep(0.2)
    stdout, stderr = proc.communicate()
    return subprocess.CompletedProcess(command, proc.returncode, stdout, stderr), peak


def run_ours(s: dict, model_dir: str, out: str, name: str, reference: str = "none", rollout: str = "hf", extra: list[str] = ()) -> dict:
    done, peak = watch([sys.executable, "-m", "open_instruct2.train_grpo", *ours_args(s, model_dir, out, name, reference, rollout), *extra], ROOT)
    if done.returncode != 0:
        raise SystemExit(f"ours ({name}) failed: {done.stderr[-2000:]}")
    lines = [json.loads(line) for line in open(os.path.join(out, name, "metrics.jsonl")) if '"reward/mean"' in line][1:]
    median = lambda key: statistics.median(m.get(key, 0.0) for m in lines)  # noqa: E731
    return {"step": median("time/step"), "generation": median("time/rollout"), "reference": median("time/reference") + median("time/reward"),
            "update": median("time/update"), "peak_mb": peak, "tokens": median("rollout/response_length_mean"),
            "sync": median("time/weight_sync")}


def trl_child(s: dict, model_dir: str, out: str) -> None:
    """In a child process: TRL's GRPOTrainer with generation and the step timed; prints one JSON line."""
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from open_instruct2.bootstrap import arithmetic_rows

    torch.set_num_threads(len(os.sched_getaffinity(0)))
    data = Dataset.from_list([{"prompt": system_turns(s) + r["messages"]} for r in arithmetic_rows("train")[:256]])
    steps = []

    class Timer(TrainerCallback):
        def on_step_begin(self, *a, **k):
            self.t = time.perf_counter()

        def on_step_end(self, *a, **k):
            steps.append(time.perf_counter() - self.t)

    trainer = GRPOTrainer(model=AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32), reward_funcs=[lambda completions, **k: [
        float(len(str(c)) % 2 == 0) for c in completions]], args=GRPOConfig(**trl_config(s, out)), train_dataset=data,
        processing_class=AutoTokenizer.from_pretrained(model_dir), callbacks=[Timer()])
    gen, scored = wrap_timed(trainer, "_generate"), wrap_timed(trainer, "_generate_and_score_completions")
    trainer.train()
    lengths = [r["completions/mean_length"] for r in trainer.state.log_history if "completions/mean_length" in r]
    print("TRL_RESULT " + json.dumps({"steps": steps, "generate": gen, "generate_and_score": scored, "lengths": lengths}), flush=True)


def wrap_timed(obj, name: str) -> list[float]:
    """Replace obj.<name> by a timed version; returns the list its durations are appended to."""
    original, times = getattr(obj, name), []

    def timed(*a, **k):
        start = time.perf_counter()
        result = original(*a, **k)
        times.append(time.perf_counter() - start)
        return result

    setattr(obj, name, timed)
    return times


def run_trl(s: dict, model_dir: str, out: str) -> dict:
    done, peak = watch([sys.executable, os.path.abspath(__file__), "--trl-child", json.dumps(s), model_dir, out], ROOT)
    line = next((line for line in done.stdout.splitlines() if line.startswith("TRL_RESULT ")), None)
    if done.returncode != 0 or line is None:
        raise SystemExit(f"TRL failed: {done.stderr[-2000:]}")
    r = json.loads(line[len("TRL_RESULT "):])
    steps, gen, scored = r["steps"][1:], r["generate"][1:], r["generate_and_score"][1:]
    step = statistics.median(steps)
    return {"step": step, "generation": statistics.median(gen), "reference": statistics.median(scored) - statistics.median(gen),
            "update": step - statistics.median(scored), "peak_mb": peak, "tokens": statistics.median(r["lengths"][1:] or r["lengths"])}


def machine_rates(dtype: str = "float32") -> dict:
    """Matmul GFLOP/s at `dtype` and memory copy GB/s, measured now (best of 5 / 3)."""
    import torch

    n = 1024
    a, b = torch.randn(n, n, dtype=getattr(torch, dtype)), torch.randn(n, n, dtype=getattr(torch, dtype))
    best = min(_timed(lambda: a @ b) for _ in range(5))
    big = torch.empty(64 * 2**20)  # 256 MB
    copy = torch.empty_like(big)
    bw = min(_timed(lambda: copy.copy_(big)) for _ in range(3))
    return {"gflops": 2 * n**3 / best / 1e9, "gbps": 2 * big.numel() * 4 / bw / 1e9}


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def floors(s: dict, rates: dict, params: float, prompt_tokens: float) -> dict:
    batch = s["prompts"] * s["samples"]
    flops = rates["gflops"] * 1e9
    train = 6 * params * batch * (prompt_tokens + s["length"]) / flops
    prefill = 2 * params * batch * prompt_tokens / flops
    weight_bytes = params * (2 if s["dtype"] == "bfloat16" else 4)
    decode = s["length"] * max(weight_bytes / (rates["gbps"] * 1e9), 2 * params * batch / flops)  # per token step: read or compute
    return {"train": train, "generation": prefill + decode, "step": train + prefill + decode}


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--trl-child":
        return trl_child(json.loads(sys.argv[2]), sys.argv[3], sys.argv[4])
    parser = argparse.ArgumentParser(description="ours vs TRL GRPOTrainer at equal settings")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--prompts", type=int, default=2)
    parser.add_argument("--samples", type=int, default=4)
    parser.add_argument("--length", type=int, default=64)
    parser.add_argument("--skip-vllm", action="store_true", help="leave out the rows with a launched vLLM server")
    parser.add_argument("--dtype", choices=["auto", "float32", "bfloat16"], default="auto",
                        help="precision of both trainers; auto = what our runtime picks on this CPU (bfloat16 where it has native "
                             "bf16, AMX / AVX512-BF16; float32 elsewhere, see bench_dtype.py)")
    parser.add_argument("--ours-variant", action="append", default=[], metavar="FLAGS",
                        help="another row of ours with these extra flags (e.g. '--generation_linear plain'), run right after ours")
    parser.add_argument("--prompt-tokens", type=int, default=None, metavar="N",
                        help="long prompts: a system message of filler in front of every problem, ~N prompt tokens on average")
    args = parser.parse_args()
    if args.dtype == "auto":
        from open_instruct2.runtime import cpu_has_native_bf16

        args.dtype = "bfloat16" if cpu_has_native_bf16() else "float32"
    s = settings(args)
    work = tempfile.mkdtemp(prefix="bench_trl_")
    model_dir = make_random_model(os.path.join(work, "model"))
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from open_instruct2.bootstrap import arithmetic_rows
    from open_instruct2.data import tokenize_prompt

    params = sum(p.numel() for p in AutoModelForCausalLM.from_pretrained(model_dir).parameters())
    tok = AutoTokenizer.from_pretrained(model_dir)
    sample_rows = arithmetic_rows("train")[:64]
    if args.prompt_tokens:
        s["system"] = long_system_prompt(tok, sample_rows, args.prompt_tokens)
    lengths = [len(tokenize_prompt(tok, system_turns(s) + r["messages"])) for r in sample_rows]
    prompt_tokens, s["longest_prompt"] = statistics.mean(lengths), max(lengths)  # (the floor's prompt; ours' prompt limit)
    shown = {k: v for k, v in s.items() if k != "system"}
    print(f"settings: {json.dumps(shown)}; prompts {prompt_tokens:.0f} tokens on average; model: random {params / 1e6:.1f}M (SmolLM2-135M shape), {torch.get_num_threads()} threads", flush=True)
    rows = {}
    rows["TRL GRPOTrainer"] = run_trl(s, model_dir, os.path.join(work, "trl"))
    rows["ours (no reference)"] = run_ours(s, model_dir, os.path.join(work, "ours"), "ours")
    for i, flags in enumerate(args.ours_variant):
        rows[f"ours {flags}"] = run_ours(s, model_dir, os.path.join(work, "ours"), f"ours_variant{i}", extra=flags.split())
    if not args.skip_vllm:
        rows["ours + launched vLLM reference (beta 0.05)"] = run_ours(s, model_dir, os.path.join(work, "ours"), "ours_vllm", "launch_local_vllm")
        rows["ours, rollouts on a launched vLLM server"] = run_ours(s, model_dir, os.path.join(work, "ours"), "ours_vllm_rollouts", rollout="vllm")
    rates = machine_rates(s["dtype"])
    floor = floors(s, rates, params, prompt_tokens)
    batch = s["prompts"] * s["samples"]
    print(f"\nmachine now: {s['dtype']} matmul {rates['gflops']:.0f} GFLOP/s, memory copy {rates['gbps']:.1f} GB/s; "
          f"floor per step: train {floor['train']:.2f} s + generation {floor['generation']:.2f} s = {floor['step']:.2f} s")
    print("\n| trainer | completions/s | s/step | generation | reference+scoring | update | peak RSS MB | x floor |")
    print("|---|---|---|---|---|---|---|---|")
    for name, r in rows.items():
        print(f"| {name} | {batch / r['step']:.3f} | {r['step']:.2f} | {r['generation']:.2f} | {r['reference']:.2f} | {r['update']:.2f} | "
              f"{r['peak_mb']:.0f} | {r['step'] / floor['step']:.1f} |")
    ours, trl = rows["ours (no reference)"], rows["TRL GRPOTrainer"]
    print(f"\nratio (ours / TRL, completions/s): {trl['step'] / ours['step']:.2f}x; peak RSS {ours['peak_mb']:.0f} vs {trl['peak_mb']:.0f} MB; "
          f"mean completion length ours {ours['tokens']:.0f}, TRL {trl['tokens']:.0f} tokens (equal work when both are {s['length']})")
    vllm = rows.get("ours, rollouts on a launched vLLM server")
    if vllm:
        print(f"rollouts on vLLM vs HF generate (ours, same settings): generation {vllm['generation']:.2f} vs {ours['generation']:.2f} s/step "
              f"({ours['generation'] / vllm['generation']:.2f}x, weight sync {vllm['sync']:.2f} s of it), completions/s "
              f"{batch / vllm['step']:.3f} vs {batch / ours['step']:.3f} ({ours['step'] / vllm['step']:.2f}x), peak RSS {vllm['peak_mb']:.0f} vs {ours['peak_mb']:.0f} MB")


if __name__ == "__main__":
    main()
