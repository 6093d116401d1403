"""Peak memory of ONE GRPO update (forward + backward of the policy loss): ours, the logits path, TRL (issue 22).

    python benchmarks/bench_update_memory.py                       # Qwen3-0.6B shape, bf16 and fp32, all variants
    python benchmarks/bench_update_memory.py --dtype bf16 --variants ours,logits
    python benchmarks/bench_update_memory.py --quick               # tiny model, ~10 s a row (imports): a smoke run

What is measured. A random-weight model of Qwen3-0.6B's shape and vocabulary (transformers' Qwen3Config: hidden 1024,
intermediate 3072, 28 layers, 16 heads, 8 KV heads, head_dim 128, vocabulary 151,936, tied embeddings, rope_theta 1e6;
built offline from the config, no hub), weights in --dtype, sdpa attention, no gradient checkpointing,
LoRA r 16 (peft) on q/k/v/o/gate/up/down, one micro-batch of 8 sequences of 64 prompt + 512 response tokens (no
padding), temperature 0.7. The update is: per-token log-probs of the 512 response tokens, the loss
-(logprobs * advantages).mean() with random per-sequence advantages, `.backward()`. The variants differ only in how
the log-probs are taken:

  ours    open_instruct2.policy.response_logprobs_at as of HEAD: the decoder's last hidden states, then
          logprobs.hidden_token_logprobs applies the output layer to chunks of at most CHUNK_ELEMENTS logits, each chunk
          checkpointed (recomputed in the backward): the (B, T, V) logits never exist.
  logits  the path before issue 22 (policy.py before commit b456d5f): the model's full forward with
          logits_to_keep=T+1, logits[:, :-1], then logprobs.token_logprobs(logits, targets, temperature) (HEAD's
          chunked log-softmax, which keeps the logits and recomputes each chunk's softmax in the backward). The
          (B, T+1, V) logits exist in the forward, and a (B, T, V) gradient plus the (B, T+1, V) one of the slice in
          the backward.
  trl     TRL's own per-token log-prob code, called standalone: trl.trainer.utils.add_fused_lm_head(policy's base
          model, temperature, outputs=("log_probs", "entropy")) as GRPOTrainer.__init__ does (its fused chunked LM
          head, TRL's default and only path), then the undecorated GRPOTrainer._get_per_token_logps_and_entropies
          (`.__wrapped__`, past the profiling decorator) with compute_entropy=True as GRPOTrainer._compute_loss calls
          it. Its `self` is a stand-in whose only attribute is `accelerator.autocast` = a null context: the weights are
          already in --dtype, as for the other variants (TRL's bf16 is autocast over fp32 weights; not compared here).
          Off CUDA/XPU TRL's kernel scores every position (prompt ones too, then masks them); on CUDA with Triton only
          the labelled (response) ones.

How. Each (variant, dtype) runs in a fresh subprocess (`--child`), so peaks do not mix. In it: build the model and
the batch; run one warm-up update of the same variant and batch and drop its gradients (unless --cold: a process's
first update also pages in libtorch's code and starts its thread pools, ~200 MiB of RSS that is not the update's
data and would swamp the --quick numbers); take the current RSS (VmRSS, after gc and malloc_trim) as the base;
reset the kernel's high-water mark (/proc/self/clear_refs, best effort) so that neither the build's transients nor
the warm-up's peak can hide the update's; run the update; the peak is resource.getrusage(RUSAGE_SELF).ru_maxrss.
Printed: the absolute peak, the increase over the base, and on CUDA torch.cuda.max_memory_allocated (absolute, and
over memory_allocated at the base), the update's seconds, and the size one (B, T, V) logits tensor would take in the
dtype, for reference.

Prediction, written before the first full run: the decoder's saved activations are the same in all three, so the
differences are the logits. ours keeps no (B, T, V) tensor: over the activations it needs a few fp32 temporaries of
one chunk (z, exp, the chunk's gradient: 220 rows x V x 4 B = 128 MiB each), ~0.5 GiB. logits adds about 3 logits
tensors in the dtype over ours (1.2 GiB each in bf16, 2.3 GiB in fp32 at 8 x 512 x 151,936): the kept (B, T+1, V)
logits, the (B, T, V) gradient of token_logprobs and the (B, T+1, V) gradient of the slice. trl keeps no (B, T, V)
tensor either, but off CUDA its tiles are 4096 tokens x 32,768 vocabulary (512 MiB in fp32, with a few fp32 copies
live in its torch fold), and it scores all L-1 positions: between ours and logits, nearer ours. At --quick size a
single chunk holds every row, so ours keeps that chunk's logits too (nothing is checkpointed) and the gap to logits
is about one logits tensor (the slice's gradient), but it is there.

Prints only; nothing here is a test.
"""

import argparse
import contextlib
import ctypes
import gc
import json
import os
import resource
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)

VARIANTS = ("ours", "logits", "trl")
DTYPES = {"bf16": "bfloat16", "fp32": "float32"}
TEMPERATURE = 0.7
MIB = 1 << 20

# Qwen3-0.6B's published sizes; --quick keeps the vocabulary (the logits effect) and shrinks the rest.
FULL = dict(hidden_size=1024, intermediate_size=3072, num_hidden_layers=28, num_attention_heads=16,
            num_key_value_heads=8, head_dim=128, vocab_size=151936, max_position_embeddings=40960,
            tie_word_embeddings=True, rope_theta=1e6, rms_norm_eps=1e-6)
QUICK = dict(FULL, hidden_size=64, intermediate_size=192, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, head_dim=16, max_position_embeddings=1024)
FULL_BATCH = dict(batch=8, prompt=64, response=512)
QUICK_BATCH = dict(batch=2, prompt=16, response=48)  # 2 x 64 tokens


# ---------------------------------------------------------------- the child: one variant, one dtype


def rss_now_kib() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError("no VmRSS in /proc/self/status")


def settle() -> None:
    """Free what is garbage and hand glibc's free pages back, so the base RSS is what is really held."""
    gc.collect()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def reset_peak() -> bool:
    """Reset the kernel's peak-RSS mark to the current RSS (Linux >= 4.0); False where that is not allowed."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def build_model(quick: bool, dtype, device):
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, Qwen3Config

    from open_instruct2.policy import DEFAULT_LORA_TARGETS, disable_dropout

    torch.manual_seed(0)
    config = Qwen3Config(**(QUICK if quick else FULL))
    model = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation="sdpa").to(device)
    model.config.use_cache = False
    lora = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules=list(DEFAULT_LORA_TARGETS), task_type="CAUSAL_LM")
    model = get_peft_model(model, lora, autocast_adapter_dtype=True)  # fp32 adapters, as open_instruct2.policy does
    disable_dropout(model)
    model.train()
    return model


def make_batch(quick: bool, vocab: int, device) -> dict:
    import torch

    sizes = QUICK_BATCH if quick else FULL_BATCH
    g = torch.Generator().manual_seed(1)
    width = sizes["prompt"] + sizes["response"]
    ids = torch.randint(0, vocab, (sizes["batch"], width), generator=g)
    return {"input_ids": ids.to(device), "attention_mask": torch.ones_like(ids).to(device),
            "advantages": torch.randn(sizes["batch"], 1, generator=g).to(device), **sizes}


def logprobs_ours(model, batch):
    from open_instruct2.policy import response_logprobs_at

    (logp,), _ = response_logprobs_at(model, batch["input_ids"], batch["attention_mask"], batch["prompt"], (TEMPERATURE,))
    return logp


def logprobs_logits(model, batch):
    from open_instruct2.logprobs import token_logprobs
    from open_instruct2.rollout import position_ids_from_mask

    ids, mask, prompt = batch["input_ids"], batch["attention_mask"], batch["prompt"]
    out = model(input_ids=ids, attention_mask=mask, position_ids=position_ids_from_mask(mask),
                logits_to_keep=batch["response"] + 1, use_cache=False)
    return token_logprobs(out.logits[:, :-1, :], ids[:, prompt:], TEMPERATURE)


def prepare_trl(model):
    """What GRPOTrainer.__init__ does to the policy: its fused chunked LM head on the PEFT model's base model."""
    import trl.trainer.grpo_trainer  # noqa: F401  (imports vLLM glue and more: ~250 MiB of RSS, before the base)
    from trl.trainer.utils import add_fused_lm_head

    add_fused_lm_head(model.get_base_model(), temperature=TEMPERATURE, cast_lm_head_to_fp32=False, outputs=("log_probs", "entropy"))


def logprobs_trl(model, batch):
    from types import SimpleNamespace

    from trl.trainer.grpo_trainer import GRPOTrainer

    method = GRPOTrainer._get_per_token_logps_and_entropies.__wrapped__  # past @profiling_decorator (needs a Trainer)
    trainer = SimpleNamespace(accelerator=SimpleNamespace(autocast=contextlib.nullcontext))
    logp, _entropy, _aux = method(trainer, model, batch["input_ids"], batch["attention_mask"], batch["response"], compute_entropy=True)
    return logp


LOGPROBS = {"ours": logprobs_ours, "logits": logprobs_logits, "trl": logprobs_trl}


def update(model, batch, variant: str) -> None:
    logp = LOGPROBS[variant](model, batch)  # (B, T) fp32
    loss = -(logp * batch["advantages"]).mean()
    loss.backward()


def child(variant: str, dtype_name: str, quick: bool, threads: int, cold: bool) -> dict:
    import torch

    if threads:
        torch.set_num_threads(threads)
    dtype = getattr(torch, DTYPES[dtype_name])
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = build_model(quick, dtype, device)
    if variant == "trl":
        prepare_trl(model)
    batch = make_batch(quick, model.config.vocab_size, device)
    if not cold:  # the first update touches libtorch's code pages and thread pools (~200 MiB of RSS): not the update's data
        update(model, batch, variant)
        model.zero_grad(set_to_none=True)
    settle()
    base_kib, build_peak_kib = rss_now_kib(), resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    cuda_base = 0
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        cuda_base = torch.cuda.memory_allocated()
    was_reset = reset_peak()
    start = time.perf_counter()
    update(model, batch, variant)
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    logits_bytes = batch["batch"] * batch["response"] * model.config.vocab_size * torch.finfo(dtype).bits // 8
    return {"variant": variant, "dtype": dtype_name, "device": device.type, "threads": torch.get_num_threads(),
            "base_mib": base_kib / 1024, "build_peak_mib": build_peak_kib / 1024, "peak_mib": peak_kib / 1024,
            "increase_mib": (peak_kib - base_kib) / 1024, "peak_reset": was_reset, "seconds": seconds,
            "logits_mib": logits_bytes / MIB,
            "cuda_peak_mib": torch.cuda.max_memory_allocated() / MIB if device.type == "cuda" else None,
            "cuda_increase_mib": (torch.cuda.max_memory_allocated() - cuda_base) / MIB if device.type == "cuda" else None}


# ---------------------------------------------------------------- the parent: one subprocess per row


def machine_note() -> str:
    try:
        text = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return "machine: lscpu not available"
    fields = dict(line.split(":", 1) for line in text.splitlines() if ":" in line)
    name = fields.get("Model name", "?").strip()
    flags = fields.get("Flags", "").split()
    simd = sorted(f for f in flags if f.startswith(("avx512", "amx")))
    return f"machine: {name}, {os.cpu_count()} CPUs; flags: {' '.join(simd) or 'no avx512/amx'}"


def run_child(variant: str, dtype_name: str, args) -> dict:
    command = [sys.executable, os.path.abspath(__file__), "--child", variant, "--dtype", dtype_name,
               "--threads", str(args.threads)] + (["--quick"] if args.quick else []) + (["--cold"] if args.cold else [])
    proc = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
    results = [line[len("RESULT "):] for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode != 0 or not results:
        raise SystemExit(f"{variant} {dtype_name} failed (rc {proc.returncode}):\n{proc.stderr[-3000:]}")
    return json.loads(results[-1])


def mib(x) -> str:
    return "-" if x is None else f"{x:,.0f}"


def row(r: dict) -> str:
    note = "" if r["peak_reset"] else " (peak not reset: the build's peak may hide the update's)"
    return (f"| {r['dtype']} | {r['variant']} | {mib(r['logits_mib'])} | {mib(r['base_mib'])} | {mib(r['peak_mib'])} | "
            f"{mib(r['increase_mib'])}{note} | {mib(r['cuda_peak_mib'])} | {mib(r['cuda_increase_mib'])} | {r['seconds']:.2f} |")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true",
                   help="tiny model (2 layers, hidden 64, Qwen3's 151,936-token vocabulary kept), 2 x 64 tokens, 1 thread: seconds")
    p.add_argument("--variants", default=",".join(VARIANTS),
                   help=f"comma-separated subset of {','.join(VARIANTS)} (default: all)")
    p.add_argument("--dtype", choices=["bf16", "fp32", "both"], default="both", help="weights' dtype (default: both)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch threads in each child (default: 1 with --quick, else torch's default; 0 = torch's default)")
    p.add_argument("--cold", action="store_true",
                   help="skip the warm-up update, so the increase includes the first touch of libtorch's code and thread pools")
    p.add_argument("--child", choices=VARIANTS, help=argparse.SUPPRESS)  # internal: run one variant, print RESULT json
    args = p.parse_args(argv)
    if args.threads is None:
        args.threads = 1 if args.quick else 0
    args.variant_list = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = [v for v in args.variant_list if v not in VARIANTS]
    if unknown or not args.variant_list:
        p.error(f"--variants: unknown {unknown or args.variants!r}; choose from {','.join(VARIANTS)}")
    if args.child and args.dtype == "both":
        p.error("--child needs one --dtype")
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.child:
        print("RESULT " + json.dumps(child(args.child, args.dtype, args.quick, args.threads, args.cold)), flush=True)
        return
    sizes, shape = (QUICK_BATCH, QUICK) if args.quick else (FULL_BATCH, FULL)
    print(machine_note())
    print(f"model: Qwen3 {'quick' if args.quick else '0.6B'} shape ({shape['num_hidden_layers']} layers, hidden {shape['hidden_size']}, "
          f"vocab {shape['vocab_size']}), random weights, LoRA r16, sdpa; micro-batch {sizes['batch']} x ({sizes['prompt']} prompt + "
          f"{sizes['response']} response) tokens, T={TEMPERATURE}; one fresh process per row; MiB")
    print("| dtype | variant | (B,T,V) logits | RSS after build | peak RSS | increase | CUDA peak | CUDA increase | update s |")
    print("|---|---|---|---|---|---|---|---|---|")
    for dtype_name in (["bf16", "fp32"] if args.dtype == "both" else [args.dtype]):
        for variant in args.variant_list:
            print(row(run_child(variant, dtype_name, args)), flush=True)


if __name__ == "__main__":
    main()
