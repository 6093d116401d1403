"""What the demo can reach: the base model's pass@1 and pass@k on the demo's held-out problems, by kind.

    python benchmarks/demo_ceiling.py [--prompts 100] [--k 8] [--temperature 0.7] [--length 128] [--model builtin:...]

GRPO sharpens what sampling already finds: within a short run, pass@1 moves toward pass@k (any of k samples
right), not past it. If pass@k of the right number is far under the target, no reward design reaches the
target in a few dozen steps: the model has to learn the arithmetic itself. Prints, per problem kind
(add1, mul1, add2, sub2, word), the share of samples right (pass@1) and of problems with at least one right
sample (pass@k), for the last number of the text (`gsm8k`) and for the number after '####' (`gsm8k_strict`).
"""

import argparse
import collections
import re
import time

import torch


def kind_of(question: str) -> str:
    numbers = [int(x) for x in re.findall(r"\d+", question)]
    if "multiply" in question:
        return "mul1"
    if question.startswith("Compute"):
        return "add1" if max(numbers[:2]) < 10 else "add2"
    if question.startswith("Calculate"):
        return "sub2"
    return "word"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="builtin:smollm2-135m-instruct")
    parser.add_argument("--prompts", type=int, default=100)
    parser.add_argument("--k", type=int, default=8)
    parser.add_argument("--temperature", type=float, default=0.7)
    parser.add_argument("--length", type=int, default=128)
    parser.add_argument("--system_prompt_file", default=None, help="as the trainer's flag: a system message before every prompt")
    parser.add_argument("--batch", type=int, default=8, help="prompts per generate call (x k sequences)")
    args = parser.parse_args()

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from open_instruct2.bootstrap import resolve_model_path
    from open_instruct2.data import PromptBatch, build_prompts, read_system_prompt
    from open_instruct2.rollout import generate_rollouts
    from open_instruct2.runtime import cpu_has_native_bf16
    from open_instruct2.verifiers import VERIFIERS

    torch.manual_seed(0)
    path = resolve_model_path(args.model)
    tokenizer = AutoTokenizer.from_pretrained(path)
    dtype = torch.bfloat16 if cpu_has_native_bf16() else torch.float32
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).eval()
    prompts = build_prompts(["builtin:arithmetic", str(args.prompts)], ["test_rephrased"], tokenizer, 512,
                            system_prompt=read_system_prompt(args.system_prompt_file))
    checks = {"last number (gsm8k)": VERIFIERS["gsm8k"], "after #### (gsm8k_strict)": VERIFIERS["gsm8k_strict"]}
    right = {name: collections.defaultdict(list) for name in checks}  # name -> kind -> [per-problem list of 0/1]
    start = time.perf_counter()
    for i in range(0, len(prompts), args.batch):
        chunk = prompts[i : i + args.batch]
        r = generate_rollouts(model, tokenizer, PromptBatch(chunk, list(range(len(chunk)))), num_samples=args.k,
                              response_length=args.length, temperature=args.temperature, top_p=1.0, stop_strings=None,
                              device=torch.device("cpu"))
        for j, p in enumerate(chunk):
            question = next(m["content"] for m in p.messages if m["role"] == "user")
            texts = r.response_texts[j * args.k : (j + 1) * args.k]
            for name, check in checks.items():
                right[name][kind_of(question)].append([check(t, p.ground_truth[0]) for t in texts])
        print(f"  {min(i + args.batch, len(prompts))}/{len(prompts)} prompts, {time.perf_counter() - start:.0f} s", flush=True)
    print(f"\n{args.model}, {len(prompts)} test_rephrased problems, {args.k} samples each at T={args.temperature}, "
          f"<= {args.length} tokens, {str(dtype).replace('torch.', '')}, system prompt {args.system_prompt_file}")
    for name, by_kind in right.items():
        print(f"{name}:")
        everything = [s for v in by_kind.values() for s in v]
        for kind, problems in sorted(by_kind.items()) + [("all", everything)]:
            pass1 = sum(sum(s) for s in problems) / (len(problems) * args.k)
            passk = sum(max(s) for s in problems) / len(problems)
            print(f"  {kind:5s} {len(problems):4d} problems  pass@1 {pass1:6.1%}  pass@{args.k} {passk:6.1%}")


if __name__ == "__main__":
    main()
