"""The step's hot path, each change measured against what it replaced, side by side in one run.

    python benchmarks/bench_hot_path.py            # builtin SmolLM2-135M, fp32, this machine's threads

1. Stop strings during generation: the previous check (decode every row's tail at every generated token)
   vs transformers' vectorised StopStringCriteria with the prompt blanked (rollout.py).
2. Token log-probs at a temperature: plain `(logits.float() / T)` + logsumexp vs the chunked custom autograd
   function (logprobs.py), forward + backward.
3. No-grad passes (old log-probs, in-process reference): one sequence per forward vs `inference_batch_size`.
4. Micro-batches: padded tokens with rows in random order vs sorted by length.
Runs alternate (A, B, A, B, ...) and medians are printed; nothing here is a test.
"""

import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from transformers import AutoModelForCausalLM, AutoTokenizer, StoppingCriteria  # noqa: E402

from open_instruct2 import rollout  # noqa: E402
from open_instruct2.bootstrap import ensure_builtin_model  # noqa: E402
from open_instruct2.data import Prompt, PromptBatch, tokenize_prompt  # noqa: E402
from open_instruct2.logprobs import token_logprobs  # noqa: E402
from open_instruct2.policy import by_length  # noqa: E402
from open_instruct2.reference import batched_logprobs  # noqa: E402

REPEATS = 3


class DecodeEveryRow(StoppingCriteria):
    """The previous stop-string check: decode each row's last tokens at every step, one row at a time."""

    def __init__(self, tokenizer, stop_strings, prompt_width, batch_size, device):
        self.tokenizer, self.stop_strings, self.prompt_width = tokenizer, stop_strings, prompt_width
        self.tail = max(len(s) for s in stop_strings) + 2
        self.stopped = [None] * batch_size

    def __call__(self, input_ids, scores, **kwargs):
        new = input_ids[:, self.prompt_width :]
        done = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
        for b in range(input_ids.shape[0]):
            if self.stopped[b] is not None:
                done[b] = True
                continue
            if any(s in self.tokenizer.decode(new[b, -self.tail :], skip_special_tokens=False) for s in self.stop_strings):
                self.stopped[b] = new.shape[1]
                done[b] = True
        return done

    @property
    def stopped_at(self):
        return torch.tensor([-1 if s is None else s for s in self.stopped])


def timed(fn):
    start = time.perf_counter()
    out = fn()
    return time.perf_counter() - start, out


def compare(name, a_name, a, b_name, b, unit=None):
    times = {a_name: [], b_name: []}
    for _ in range(REPEATS):
        for label, fn in ((a_name, a), (b_name, b)):
            times[label].append(fn())
    ma, mb = statistics.median(times[a_name]), statistics.median(times[b_name])
    print(f"{name}: {a_name} {ma:.3f} s, {b_name} {mb:.3f} s (median of {REPEATS}, alternating) -> {ma / mb:.2f}x"
          + (f"; {unit(ma, mb)}" if unit else ""))


def main():
    torch.set_num_threads(len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count())
    path = str(ensure_builtin_model("builtin:smollm2-135m-instruct"))
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    print(f"SmolLM2-135M fp32, {torch.get_num_threads()} threads")
    questions = [f"What is {a} + {b}? Put the final answer after ####." for a, b in ((12, 30), (7, 8), (45, 17), (3, 99))]
    prompts = [Prompt(tokenize_prompt(tokenizer, [{"role": "user", "content": q}]), [], ["1"], ["gsm8k"], "b") for q in questions]
    batch = PromptBatch(prompts, list(range(4)))
    stops = ["<never>", "@@@@"]  # checked at every token, never found: the cost of the check alone

    def generate(criterion):
        def run():
            saved = rollout.StopOnStrings
            rollout.StopOnStrings = criterion
            try:
                torch.manual_seed(0)
                seconds, r = timed(lambda: rollout.generate_rollouts(
                    model, tokenizer, batch, num_samples=4, response_length=96, temperature=0.7, top_p=1.0,
                    stop_strings=stops, device=torch.device("cpu")))
            finally:
                rollout.StopOnStrings = saved
            run.tokens = int(r.response_mask.sum())
            return seconds
        return run

    old_gen, new_gen = generate(DecodeEveryRow), generate(rollout.StopOnStrings)
    compare("1. generation, 16 x <=96 tokens, 2 stop strings", "decode every row", old_gen, "vectorised", new_gen,
            lambda a, b: f"{new_gen.tokens / a:.0f} vs {new_gen.tokens / b:.0f} tok/s")

    torch.manual_seed(0)
    r = rollout.generate_rollouts(model, tokenizer, batch, num_samples=4, response_length=96, temperature=0.7, top_p=1.0,
                                  stop_strings=None, device=torch.device("cpu"))
    B, T, V = 4, 96, model.config.vocab_size
    targets = torch.randint(0, V, (B, T))

    def plain():
        logits = torch.randn(B, T, V, requires_grad=True)
        seconds, _ = timed(lambda: ((lambda z: z.gather(-1, targets.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(z, -1))(logits / 0.7)).sum().backward())
        return seconds

    def chunked():
        logits = torch.randn(B, T, V, requires_grad=True)
        seconds, _ = timed(lambda: token_logprobs(logits, targets, 0.7).sum().backward())
        return seconds

    compare(f"2. log-probs at T=0.7, forward + backward, fp32 logits {B} x {T} x {V}", "plain", plain, "chunked", chunked)

    rows = list(range(16))
    times = {size: [] for size in (1, 4, 8, 16)}
    for _ in range(REPEATS):
        for size in times:
            times[size].append(timed(lambda: batched_logprobs(model, r, rows, size, 0.7))[0])
    base = statistics.median(times[1])
    print("3. no-grad log-probs of 16 rollouts, sorted by length, by batch size: " + ", ".join(
        f"{size}: {statistics.median(t):.3f} s ({base / statistics.median(t):.2f}x)" for size, t in times.items()))

    lengths = r.response_lengths.tolist()
    size = 4
    g = torch.Generator().manual_seed(0)
    shuffled = torch.randperm(16, generator=g).tolist()

    def padded(order):
        return sum(len(order[i : i + size]) * max(lengths[j] for j in order[i : i + size]) for i in range(0, 16, size))

    print(f"4. micro-batches of {size} over 16 responses (lengths {sorted(lengths)}): padded response tokens "
          f"random order {padded(shuffled)}, sorted {padded(by_length(r, rows))}, real {sum(lengths)}")


if __name__ == "__main__":
    main()
