"""How often the builtin model calls the calculator before any training, by how the tool is shown to it.

    python benchmarks/tool_call_rate.py [--prompts 12] [--samples 8] [--length 40] [--temperature 1.0]

Samples `--samples` answers (HF generate, fp32) to each of `--prompts` held-out arithmetic problems
(builtin:arithmetic test_rephrased, shuffled with seed 0) under four framings: the demo's system prompt alone
(examples/calculator_system_prompt.txt), the system prompt with one or two worked example turns
(examples/calculator_few_shot.json), and the two example turns without the system prompt. Prints, per framing,
the share of answers that write a `<calculator>...</calculator>` call, how many of those calls hold the question's
two numbers, the prompt's length in tokens, and a few answers. No tool runs here: this measures the call rate RL
starts from (GRPO can only reinforce calls the model makes).
"""

import argparse
import json
import random
import re
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from open_instruct2.bootstrap import ensure_builtin_model
from open_instruct2.data import load_rows

REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prompts", type=int, default=12)
    ap.add_argument("--samples", type=int, default=8)
    ap.add_argument("--length", type=int, default=40)
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--model", default="builtin:smollm2-135m-instruct")
    args = ap.parse_args()
    torch.manual_seed(0)
    path = str(ensure_builtin_model(args.model)) if args.model.startswith("builtin:") else args.model
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    system = (REPO / "examples" / "calculator_system_prompt.txt").read_text().strip()
    shots = json.loads((REPO / "examples" / "calculator_few_shot.json").read_text())
    rows = load_rows("builtin:arithmetic", "test_rephrased")
    random.Random(0).shuffle(rows)
    rows = rows[: args.prompts]
    framings = {"system prompt": [{"role": "system", "content": system}], "system + 1 example": [{"role": "system", "content": system}] + shots[:2],
                "system + 2 examples": [{"role": "system", "content": system}] + shots, "2 examples": shots}
    for name, frame in framings.items():
        calls = right_numbers = 0
        start, shown = time.time(), []
        for row in rows:
            enc = tok.apply_chat_template(frame + row["messages"], add_generation_prompt=True, return_tensors="pt", return_dict=True)
            out = model.generate(**enc, do_sample=True, temperature=args.temperature, top_p=1.0, max_new_tokens=args.length,
                                 num_return_sequences=args.samples, pad_token_id=tok.eos_token_id)
            for ids in out[:, enc["input_ids"].shape[1]:]:
                text = tok.decode(ids, skip_special_tokens=True)
                call = re.search(r"<calculator>(.*?)</calculator>", text, re.S)
                if call:
                    calls += 1
                    asked, written = re.findall(r"\d+", row["messages"][0]["content"]), re.findall(r"\d+", call.group(1))
                    right_numbers += sorted(asked[:2]) == sorted(written[:2])
                if len(shown) < 3:
                    shown.append(text[:90])
        n = len(rows) * args.samples
        print(f"{name}: calls {calls}/{n} = {calls / n:.2f}, calls with the question's numbers {right_numbers}, "
              f"prompt tokens {enc['input_ids'].shape[1]}, {time.time() - start:.0f} s; e.g. {shown}", flush=True)


if __name__ == "__main__":
    main()
