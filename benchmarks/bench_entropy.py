"""What train/entropy costs: the update's forward + backward with the entropy taken in the same chunked pass as the
log-probs (logprobs.token_logprobs_entropy) against the log-probs alone, side by side in one run.

    python benchmarks/bench_entropy.py        # builtin SmolLM2-135M, fp32, this machine's threads

Prediction, written before the first measurement: the entropy is one more exp and multiply-add over each chunk of
logits in the forward (the softmax), and nothing in the backward while it is only a metric. So (1) the log-prob
kernel alone, forward + backward, gets ~1.3-1.5x slower, and (2) a whole micro-batch forward + backward of the
135M model (the update's unit of work: the transformer and the 49k-vocabulary head dominate) ~2-5% slower.
(3) An entropy bonus (--entropy_coef) adds a backward share for it too.
Runs alternate (A, B, A, B, ...) and medians are printed; nothing here is a test.
"""

import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from transformers import AutoModelForCausalLM  # noqa: E402

from open_instruct2.bootstrap import ensure_builtin_model  # noqa: E402
from open_instruct2.logprobs import token_logprobs, token_logprobs_entropy  # noqa: E402
from open_instruct2.policy import response_logprobs_at  # noqa: E402

REPEATS = 5


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def compare(name: str, runs: dict) -> None:
    times = {label: [] for label in runs}
    for _ in range(REPEATS):
        for label, fn in runs.items():
            times[label].append(timed(fn))
    medians = {label: statistics.median(t) for label, t in times.items()}
    first = next(iter(medians.values()))
    print(f"{name}: " + ", ".join(f"{label} {m:.3f} s ({m / first:.3f}x)" for label, m in medians.items())
          + f" (median of {REPEATS}, alternating)")


def main() -> None:
    torch.set_num_threads(len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count())
    path = str(ensure_builtin_model("builtin:smollm2-135m-instruct"))
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    model.train()
    B, P, T, V = 4, 48, 128, model.config.vocab_size
    print(f"SmolLM2-135M fp32, {torch.get_num_threads()} threads; micro-batch {B} x ({P} prompt + {T} response) tokens")
    torch.manual_seed(0)
    targets = torch.randint(0, V, (B, T))
    logits = torch.randn(B, T, V, requires_grad=True)

    def kernel(entropy: bool, bonus: bool = False):
        def run():
            if not entropy:
                token_logprobs(logits, targets, 0.7).sum().backward()
                return
            logp, h = token_logprobs_entropy(logits, targets, 0.7)
            (logp.sum() - 0.01 * (h if bonus else h.detach()).sum()).backward()
        return run

    compare(f"1. log-prob kernel, forward + backward, fp32 logits {B} x {T} x {V}",
            {"log-probs": kernel(False), "+ entropy metric": kernel(True), "+ entropy bonus": kernel(True, True)})

    ids = torch.randint(0, V, (B, P + T))
    mask = torch.ones_like(ids)

    def step(entropy: bool, bonus: bool = False):
        def run():
            (logp,), h = response_logprobs_at(model, ids, mask, P, (0.7,), entropy=entropy)
            loss = logp.sum() - (0.01 * h.sum() if bonus else 0.0)
            loss.backward()
            model.zero_grad(set_to_none=True)
        return run

    compare("2. the update's micro-batch, model forward + backward",
            {"log-probs": step(False), "+ entropy metric": step(True), "+ entropy bonus": step(True, True)})


if __name__ == "__main__":
    main()
