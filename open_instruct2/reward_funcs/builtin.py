"""The builtin reward functions, in the same keyword-argument convention as a user's.

- `verifiable`: today's reward (verifiers by the row's `dataset` name, the rubric judge for rubric rows, the
  format reward and the non-stop penalty, as set by their flags); None where the judge answered nothing.
- `rubric`: the LLM judge's rubric score of rubric rows; None for every other row.
- `think_answer_format`: 1 for `<think>...</think><answer>...</answer>`, else 0 (the R1 format).
- `soft_overlong`: DAPO's soft overlong punishment: 0 up to `response_length - L`, then falling linearly to
  `-overlong_penalty_factor` at `response_length` (L = --overlong_buffer_len).
- `repetition_penalty`: `repetition_max_penalty` x the share of repeated word n-grams (n = --repetition_ngram_size),
  0 for a text without repeats (the n-gram penalty of "Demystifying Long Chain-of-Thought Reasoning").
"""

from collections.abc import Callable

from ..rewards import format_score, soft_overlong_penalty


def _text(completion) -> str:
    return completion if isinstance(completion, str) else completion[-1]["content"]


def verifiable(verifier_rewards: list[float | None], **kwargs) -> list[float | None]:
    return verifier_rewards


def rubric(rubric_scores: list[float | None], **kwargs) -> list[float | None]:
    return rubric_scores


def think_answer_format(completions: list, **kwargs) -> list[float]:
    return [format_score(_text(c)) for c in completions]


def ngram_repetition(text: str, n: int) -> float:
    """The share of the text's word n-grams that repeat an earlier one (0 when it has fewer than n words)."""
    words = text.lower().split()
    grams = [tuple(words[i : i + n]) for i in range(len(words) - n + 1)]
    return 1.0 - len(set(grams)) / len(grams) if grams else 0.0


def builtins(reward_cfg, response_length: int) -> dict[str, Callable]:
    """name -> function; the parametrised ones read their flags (--overlong_buffer_len, --repetition_*)."""
    buffer, factor = reward_cfg.overlong_buffer_len, reward_cfg.overlong_penalty_factor
    n, max_penalty = reward_cfg.repetition_ngram_size, reward_cfg.repetition_max_penalty

    def soft_overlong(completion_ids: list[list[int]], **kwargs) -> list[float]:
        return [soft_overlong_penalty(len(ids), response_length, buffer, factor) for ids in completion_ids]

    def repetition_penalty(completions: list, **kwargs) -> list[float]:
        return [max_penalty * ngram_repetition(_text(c), n) for c in completions]

    return {"verifiable": verifiable, "rubric": rubric, "think_answer_format": think_answer_format,
            "soft_overlong": soft_overlong, "repetition_penalty": repetition_penalty}
