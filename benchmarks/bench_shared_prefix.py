"""What --shared_prefix saves: the update's forward + backward and the no-grad log-prob pass, each group's prompt
computed once against once per sample, side by side in one run (alternating A, B, A, B; medians).

    python benchmarks/bench_shared_prefix.py            # builtin SmolLM2-135M, the policy dtype auto picks, all threads
    python benchmarks/bench_shared_prefix.py --quick    # fewer repeats
    python benchmarks/bench_shared_prefix.py --only update --gradient_checkpointing --tools_prompt
                                                        # the update under checkpointing, on `make run-tools`' prompts

1. The update of `make run`'s batch: 4 prompts x 8 samples, the demo's system prompt (~80 prompt tokens), responses
   sampled by the model (up to 64 tokens), LoRA, micro-batches of 1 (the default), no reference.
2. The break-even of the no-grad pass (old log-probs, in-process reference): 8 samples per prompt, 32-token responses,
   prompts of 2 .. 256 tokens, batches of 8 (--inference_batch_size).
3. The break-even of the update (forward + backward) on the same synthetic samples, at micro-batches of 1.

Prediction, written before the first measurement: (1) the demo's samples are ~80 prompt + ~25 response tokens, so
sharing forwards ~35 instead of ~105 tokens per sample: the update ~2.5x faster (less, since a micro-batch of one
keeps its per-call overheads). (2) break-even near a prompt of ~4 tokens (the cost is one more forward call per
batch and the cache copy), 2x at a prompt of ~64 tokens, ~5x at 256. Nothing here is a test.
"""

import argparse
import os
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from open_instruct2 import trainer, update  # noqa: E402
from open_instruct2.config import default_config, validate  # noqa: E402
from open_instruct2.losses import LossNorm  # noqa: E402
from open_instruct2.reference import batched_forward  # noqa: E402
from open_instruct2.rollout import Rollouts  # noqa: E402
from open_instruct2.shared_prefix import group_rows, saved_fraction  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def compare(name: str, runs: dict, repeats: int) -> dict:
    times = {label: [] for label in runs}
    for _ in range(repeats):
        for label, fn in runs.items():
            times[label].append(timed(fn))
    medians = {label: statistics.median(t) for label, t in times.items()}
    first = next(iter(medians.values()))
    print(f"{name}: " + ", ".join(f"{label} {m:.3f} s ({first / m:.2f}x)" for label, m in medians.items())
          + f"  [median of {repeats}, alternating]", flush=True)
    return medians


def demo_run(out: Path, checkpointing: bool = False, tools_prompt: bool = False):
    """`make run`'s setup (or, with tools_prompt, `make run-tools`' framing: the calculator system prompt and its two
    worked examples, ~229 prompt tokens; no tool runs here)."""
    framing = {"system_prompt_file": str(REPO / "examples/arithmetic_system_prompt.txt")}
    if tools_prompt:
        framing = {"system_prompt_file": str(REPO / "examples/calculator_system_prompt.txt"),
                   "few_shot_file": str(REPO / "examples/calculator_few_shot.json")}
    cfg = default_config(
        train_mode="lora", learning_rate=2e-4, reference_mode="none", beta=0.0, num_unique_prompts_rollout=4,
        num_samples_per_prompt_rollout=8, response_length=64, gradient_checkpointing=checkpointing, remap_verifier=["gsm8k=gsm8k_strict"],
        output_dir=str(out), run_name="bench", num_training_steps=1, **framing)
    validate(cfg)
    return trainer.setup(cfg)


def bench_update(run, repeats: int) -> None:
    torch.manual_seed(0)
    batch = trainer.next_batch(run.prompts, run.sampler, 4)
    rollouts = trainer.generate(run, batch)
    rows = list(range(rollouts.input_ids.shape[0]))
    lengths = rollouts.response_lengths.float()
    prompt = (rollouts.attention_mask[:, : rollouts.prompt_width].sum(1)).float()
    print(f"update batch: {len(rows)} samples, prompt {prompt.mean():.0f} tokens, responses {lengths.mean():.1f} tokens "
          f"(saved fraction of the forwarded columns {saved_fraction(rollouts, rows, group_rows(rollouts, rows)):.2f})", flush=True)
    advantages = torch.randn(len(rows))
    norm = LossNorm(num_tokens=int(rollouts.response_mask.sum()), num_sequences=len(rows), max_response_length=64)

    def one(mode):
        def go():
            run.cfg.model.shared_prefix = mode
            update.backward_mini_batch(run.policy, run.master, rollouts, rows, norm, advantages, None, None, run.cfg,
                                       defaultdict(lambda: torch.zeros(())))
            run.optimizer.zero_grad(set_to_none=True)
        return go

    one("off")()  # warm-up
    checkpointed = ", gradient checkpointing" if run.cfg.model.gradient_checkpointing else ""
    compare(f"update forward+backward (demo batch, LoRA, micro-batch 1{checkpointed})", {"per sample": one("off"), "shared prefix": one("on")},
            repeats)


def synthetic(prompt_len: int, group: int, response: int, vocab: int, groups: int = 2) -> Rollouts:
    torch.manual_seed(prompt_len)
    prompts = torch.randint(0, vocab, (groups, prompt_len)).repeat_interleave(group, 0)
    responses = torch.randint(0, vocab, (groups * group, response))
    ids = torch.cat([prompts, responses], 1)
    return Rollouts(input_ids=ids, attention_mask=torch.ones_like(ids), response_mask=torch.ones_like(responses), prompt_width=prompt_len,
                    finish_reasons=["stop"] * len(ids), response_texts=[""] * len(ids), prompt_index=list(range(len(ids))))


PROMPT_LENGTHS = (2, 4, 8, 16, 32, 80, 256)


def vocab_of(run) -> int:
    return run.policy.config.vocab_size if hasattr(run.policy, "config") else 49152


def bench_break_even(run, repeats: int) -> None:
    run.policy.eval()
    vocab = vocab_of(run)
    with torch.no_grad():
        for share in (False, True):  # warm-up: the first calls of a shape pay for the kernels' set-up
            batched_forward(run.policy, synthetic(PROMPT_LENGTHS[0], 8, 32, vocab), list(range(16)), 8, 0.7, share=share)
    for prompt_len in PROMPT_LENGTHS:
        rollouts = synthetic(prompt_len, 8, 32, vocab)
        rows = list(range(rollouts.input_ids.shape[0]))
        frac = saved_fraction(rollouts, rows, group_rows(rollouts, rows))
        with torch.no_grad():
            compare(f"no-grad pass, prompt {prompt_len:3d}, 2 groups x 8, responses 32 (saves {frac:.2f} of the columns)",
                    {"per sample": lambda: batched_forward(run.policy, rollouts, rows, 8, 0.7, share=False),
                     "shared prefix": lambda: batched_forward(run.policy, rollouts, rows, 8, 0.7, share=True)}, repeats)
    run.policy.train()


def bench_update_break_even(run, repeats: int) -> None:
    """The update's break-even: forward + backward of 2 groups x 8 synthetic samples (32-token responses) at the
    configured micro-batch size (1, the default), per sample against shared, over the prompt lengths above."""
    vocab = vocab_of(run)
    norm = LossNorm(num_tokens=16 * 32, num_sequences=16, max_response_length=32)
    advantages = torch.randn(16)

    def one(rollouts, mode):
        def go():
            run.cfg.model.shared_prefix = mode
            update.backward_mini_batch(run.policy, run.master, rollouts, list(range(16)), norm, advantages, None, None, run.cfg,
                                       defaultdict(lambda: torch.zeros(())))
            run.optimizer.zero_grad(set_to_none=True)
        return go

    for mode in ("off", "on"):  # warm-up
        one(synthetic(PROMPT_LENGTHS[0], 8, 32, vocab), mode)()
    for prompt_len in PROMPT_LENGTHS:
        rollouts = synthetic(prompt_len, 8, 32, vocab)
        frac = saved_fraction(rollouts, list(range(16)), group_rows(rollouts, list(range(16))))
        compare(f"update, prompt {prompt_len:3d}, 2 groups x 8, responses 32, micro-batch "
                f"{run.cfg.optim.per_device_train_batch_size} (saves {frac:.2f} of the columns)",
                {"per sample": one(rollouts, "off"), "shared prefix": one(rollouts, "on")}, repeats)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--only", choices=["update", "break_even", "update_break_even"], default=None)
    parser.add_argument("--gradient_checkpointing", action="store_true", help="the policy with gradient checkpointing (the flag's default)")
    parser.add_argument("--tools_prompt", action="store_true", help="make run-tools' prompts (~229 tokens) instead of make run's (~90)")
    args = parser.parse_args()
    repeats = 3 if args.quick else 5
    with tempfile.TemporaryDirectory() as tmp:
        run = demo_run(Path(tmp), args.gradient_checkpointing, args.tools_prompt)
        print(f"SmolLM2-135M {run.runtime.dtype}, {torch.get_num_threads()} threads, LoRA", flush=True)
        if args.only in (None, "update"):
            bench_update(run, repeats)
        if args.only in (None, "break_even"):
            bench_break_even(run, repeats)
        if args.only in (None, "update_break_even"):
            bench_update_break_even(run, repeats)


if __name__ == "__main__":
    main()
