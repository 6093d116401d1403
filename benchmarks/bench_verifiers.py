"""Time to score a batch of 64 responses with the gsm8k and math verifiers (first call and warm).

    python benchmarks/bench_verifiers.py
"""

import random
import time

from open_instruct2.verifiers import VERIFIERS


def batch(name: str, n: int = 64) -> list[tuple[str, str]]:
    rng = random.Random(0)
    rows = []
    for i in range(n):
        a, b = rng.randint(1, 99), rng.randint(1, 99)
        if name == "gsm8k":
            rows.append((f"First, {a} + {b} = {a + b + i % 2}. So the total is {a + b + i % 2}.\n#### {a + b + i % 2}", str(a + b)))
        else:
            rows.append((f"We compute $\\frac{{{a}}}{{{b}}} + 1 = \\boxed{{\\frac{{{a + b}}}{{{b}}}}}$.", f"{(a + b) / b:.6f}" if i % 2 else f"\\frac{{{a + b}}}{{{b}}}"))
    return rows


def main() -> None:
    for name in ("gsm8k", "math"):
        rows = batch(name)
        for label in ("first", "warm"):
            start = time.perf_counter()
            correct = sum(VERIFIERS[name](r, t) for r, t in rows)
            print(f"{name:6s} {label}: 64 responses in {time.perf_counter() - start:.3f} s ({correct:.0f} correct)")


if __name__ == "__main__":
    main()
