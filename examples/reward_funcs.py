"""Reward functions for examples/arithmetic_conversational.jsonl, in TRL's convention (README "Your own task").

    python -m open_instruct2.train_grpo \
        --dataset_mixer_list examples/arithmetic_conversational.jsonl 1.0 \
        --reward_funcs examples/reward_funcs.py:correct_number examples/reward_funcs.py:brevity \
        --reward_weights 1.0 0.2

Each function gets the batch as keyword arguments, one list entry per completion: `prompts` and `completions`
(chat messages here: the dataset is conversational), `completion_ids`, every other column of the row (`solution`,
`kind`, `id`), `trainer_state`; it returns one float per completion, or None where it does not apply.
"""

import asyncio
import re


def _text(completion) -> str:
    return completion[-1]["content"] if isinstance(completion, list) else completion


def _question_answer(prompt) -> int:
    """The answer to one of this dataset's questions, worked out from the question itself."""
    question = prompt[-1]["content"] if isinstance(prompt, list) else prompt
    a, b = (int(x) for x in re.findall(r"\d+", question)[:2])
    return a - b if " - " in question else a + b


def correct_number(prompts, completions, solution, id, **kwargs) -> list[float]:
    """1.0 when the last number of the answer is the row's solution, else 0.0."""
    rewards = []
    for prompt, completion, answer, row_id in zip(prompts, completions, solution, id, strict=True):
        # the columns arrive aligned with the completions: each solution belongs to its own prompt
        if _question_answer(prompt) != int(answer):
            raise ValueError(f"row {row_id}: solution {answer} is not the answer to {prompt[-1]['content']!r}")
        numbers = re.findall(r"-?\d+", _text(completion))
        rewards.append(1.0 if numbers and int(numbers[-1]) == int(answer) else 0.0)
    return rewards


async def brevity(completion_ids, kind, **kwargs) -> list[float | None]:
    """A short answer is better for the plain sums: -(tokens / 100). Word problems may explain: None (not applicable)."""
    await asyncio.sleep(0)  # stands for an awaited call (a judge, a sandbox)
    return [None if k == "word" else -len(ids) / 100 for ids, k in zip(completion_ids, kind)]
