"""A real model that calls tools, for the end-to-end tool tests: the builtin SmolLM2-135M-Instruct taught by a short
supervised fine-tune (seconds on a CPU) to answer "What is a plus b?" by calling the calculator, in the tags format
under TAGS_SYSTEM and in the json format under JSON_SYSTEM, then writing #### and the output it read. The builtin
model alone calls a tool in ~3% of samples, too rarely for a test to see the loop at work."""

import json
import random

import torch

TAGS_SYSTEM = "Use the calculator: <calculator>expression</calculator>. Then write #### and the result."
JSON_SYSTEM = 'Call the calculator as <tool_call>{"name": "calculator", "arguments": {"expression": ...}}</tool_call>. Then write #### and the result.'


def question(a: int, b: int) -> str:
    return f"What is {a} plus {b}?"


def tags_turns(a: int, b: int) -> list[tuple[str, bool]]:
    """(text, trained on) pieces of the ideal response; the tool output as the loop appends it."""
    return [(f"<calculator>{a} + {b}</calculator>", True), (f"<output>\n{a + b}\n</output>\n", False), (f"#### {a + b}", True)]


def json_turns(a: int, b: int, continuation) -> list[tuple[str, bool]]:
    call = json.dumps({"name": "calculator", "arguments": {"expression": f"{a} + {b}"}})
    return [(f"<tool_call>\n{call}\n</tool_call>", True), (continuation(str(a + b)), False), (f"#### {a + b}", True)]


def rows(n: int, seed: int) -> list[dict]:
    """RLVR rows of the two formats' questions (their ground truth: the sum)."""
    rng = random.Random(seed)
    pairs = [(rng.randint(10, 99), rng.randint(10, 99)) for _ in range(n)]
    return [{"messages": [{"role": "user", "content": question(a, b)}], "ground_truth": str(a + b), "dataset": "gsm8k"} for a, b in pairs]


def train_tool_caller(builtin_dir: str, out_dir: str, steps: int = 8) -> str:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from open_instruct2.tools.parsers import tool_message_continuation

    torch.manual_seed(0)
    tok = AutoTokenizer.from_pretrained(builtin_dir)
    model = AutoModelForCausalLM.from_pretrained(builtin_dir, torch_dtype=torch.float32)
    continuation = tool_message_continuation(tok)
    rng = random.Random(0)
    examples = []
    for k in range(64):
        a, b = rng.randint(10, 99), rng.randint(10, 99)
        system, turns = (TAGS_SYSTEM, tags_turns(a, b)) if k % 2 == 0 else (JSON_SYSTEM, json_turns(a, b, continuation))
        prompt = tok.apply_chat_template([{"role": "system", "content": system}, {"role": "user", "content": question(a, b)}],
                                         add_generation_prompt=True, tokenize=False)
        ids, labels = tok.encode(prompt, add_special_tokens=False), None
        labels = [-100] * len(ids)
        for text, trained in turns + [("<|im_end|>", True)]:
            piece = tok.encode(text, add_special_tokens=False)
            ids += piece
            labels += piece if trained else [-100] * len(piece)
        examples.append((ids, labels))
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-4)
    model.train()
    for step in range(steps):
        batch = [examples[(step * 8 + i) % len(examples)] for i in range(8)]
        width = max(len(i) for i, _ in batch)
        input_ids = torch.tensor([i + [tok.pad_token_id] * (width - len(i)) for i, _ in batch])
        labels = torch.tensor([l + [-100] * (width - len(l)) for _, l in batch])
        attention = torch.tensor([[1] * len(i) + [0] * (width - len(i)) for i, _ in batch])
        loss = model(input_ids=input_ids, attention_mask=attention, labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.save_pretrained(out_dir)
    tok.save_pretrained(out_dir)
    return out_dir
