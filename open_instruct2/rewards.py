"""Reward composition: one reward per sample plus a named breakdown for logging.

    verifiable = verification_reward x verifier score            (apply_verifiable_reward)
               = verification_reward x [score == 1]         (only_reward_good_outputs: no partial credit)
    format     = r1_style_format_reward if <think>..</think><answer>..</answer>, else 0
    reward     = verifiable + format          (additive_format_reward true)
               = verifiable if formatted else 0   (additive_format_reward false: the format gates)
               = format                        (apply_verifiable_reward false: nothing to gate, so the
                                                format reward is the reward whatever additive says)
    non_stop_penalty: a 'length'-finished sample's reward is REPLACED by non_stop_penalty_value.

A verifier that raises (or returns nan / inf) is not a wrong answer: it scores 0 for that sample, but is counted in
`reward/verifier_errors` and its first message is logged, so a broken verifier is visible.
"""

import logging
import math
import re
from dataclasses import dataclass

import torch

from .config import RewardConfig
from .rubrics import RUBRIC_VERIFIERS
from .verifiers import VERIFIERS, final_answer

log = logging.getLogger(__name__)

R1_FORMAT = re.compile(r"^\s*<think>.*?</think>\s*<answer>.*?</answer>\s*$", re.DOTALL)


@dataclass
class Scores:
    """Per-sample rewards (N,) and their parts."""

    rewards: torch.Tensor
    """(N,) the reward GRPO optimises."""
    breakdown: dict[str, torch.Tensor]
    """name -> (N,) each component, logged as reward/<name>."""
    verifier_scores: torch.Tensor | None
    """(N,) raw verifier score in [0, 1] (1 = correct); None when no verifier scored the batch (only reward functions)."""
    verifier_errors: int
    """Samples whose verifier raised."""
    valid: torch.Tensor | None = None
    """(N,) bool, False for a sample with no reward this step (a rubric row the judge answered nothing for):
    it is left out of its group's advantages and of the loss. None: all valid."""
    metrics: dict[str, float] | None = None
    """Extra metrics of the step's scoring (rubric/..., reward/<function>/...)."""
    rubric_scores: list[float | None] | None = None
    """(N,) the judge's rubric score per sample (None: not a rubric row, or unanswered); None without a judge."""
    function_values: dict[str, list[float | None]] | None = None
    """--reward_funcs: name -> (N,) what each function returned (None: not applicable, or its call failed)."""


def soft_overlong_penalty(length: int, max_length: int, buffer: int, factor: float) -> float:
    """DAPO eq. 13, scaled by factor: 0, then linear to -factor at max_length (and past it)."""
    start = max_length - buffer
    if length <= start:
        return 0.0
    return -factor * min(length - start, buffer) / buffer


def format_score(text: str) -> float:
    return 1.0 if R1_FORMAT.match(text) else 0.0


def verify(text: str, verifiers: list[str], ground_truths: list[str], rubric_score: float | None = None,
           thinking_open: bool = False) -> float | None:
    """Score of one response's final answer (verifiers.final_answer) in [0, 1] (a rubric score may be below 0).

    One verifier, one ground truth: its score. One verifier, several ground truths: the best of them
    (any listed answer is accepted). Several verifiers (each with its own ground truth): their MEAN, so the
    reward stays within [0, verification_reward]; open-instruct sums them instead. A rubric verifier's score
    is the judge's (rubric_score); None when the judge answered nothing for this response.
    """
    answer = final_answer(text, thinking_open)

    def one(name: str, truth: str) -> float | None:
        return rubric_score if name in RUBRIC_VERIFIERS else float(VERIFIERS[name](answer, truth))

    if len(verifiers) == 1:
        values = [one(verifiers[0], t) for t in ground_truths]
        return None if None in values else max(values)
    values = [one(v, t) for v, t in zip(verifiers, ground_truths)]
    return None if None in values else sum(values) / len(values)


def compute_scores(
    texts: list[str],
    finish_reasons: list[str],
    verifiers: list[list[str]],
    ground_truths: list[list[str]],
    cfg: RewardConfig,
    rubric_scores: list[float | None] | None = None,
    thinking_open: list[bool] | None = None,
    response_lengths: list[int] | None = None,
    response_length: int = 0,
) -> Scores:
    """thinking_open: per sample, whether its prompt opened a <think> block (verifiers.final_answer); None: none did.
    response_lengths (tokens) and the configured response_length: DAPO's soft overlong punishment, added to the reward
    when --overlong_buffer_len is set without --reward_funcs (with them, the soft_overlong function adds it)."""
    n = len(texts)
    verifier_scores, errors, first_error = torch.zeros(n), 0, None
    valid = torch.ones(n, dtype=torch.bool)
    if cfg.apply_verifiable_reward:
        for i in range(n):
            if not verifiers[i]:  # a TRL-format row without --verifier: nothing to verify (the reward functions score it)
                valid[i] = False
                continue
            try:
                value = verify(texts[i], verifiers[i], ground_truths[i], None if rubric_scores is None else rubric_scores[i],
                               bool(thinking_open and thinking_open[i]))
                if value is None:  # a rubric row the judge answered nothing for: no reward this step
                    valid[i] = False
                    continue
                if not math.isfinite(value):
                    raise ValueError(f"returned {value} (a score must be a finite number in [0, 1])")
                verifier_scores[i] = value
            except Exception as e:  # noqa: BLE001 - any verifier failure is counted, not fatal
                errors += 1
                first_error = first_error or f"{verifiers[i]}: {type(e).__name__}: {e}"
    if errors:
        log.warning("reward: %d verifier error(s) this step; first: %s", errors, first_error)
    # only_reward_good_outputs: all or nothing, no partial credit
    paid = (verifier_scores >= 1.0).float() if cfg.only_reward_good_outputs else verifier_scores
    verifiable = cfg.verification_reward * paid
    formatted = torch.tensor([format_score(t) for t in texts]) if cfg.apply_r1_style_format_reward else torch.ones(n)
    breakdown = {"verifiable": verifiable}
    if cfg.apply_r1_style_format_reward:
        fmt = cfg.r1_style_format_reward * formatted
        breakdown["format"] = fmt
        gate = cfg.apply_verifiable_reward and not cfg.additive_format_reward
        rewards = verifiable * formatted if gate else verifiable + fmt
    else:
        rewards = verifiable.clone()
    if cfg.non_stop_penalty:
        truncated = torch.tensor([r == "length" for r in finish_reasons])
        rewards = torch.where(truncated, torch.full_like(rewards, cfg.non_stop_penalty_value), rewards)
        breakdown["non_stop_penalized"] = truncated.float()
    if cfg.overlong_buffer_len > 0 and not cfg.reward_funcs and response_lengths is not None:
        overlong = torch.tensor([soft_overlong_penalty(n, response_length, cfg.overlong_buffer_len, cfg.overlong_penalty_factor)
                                 for n in response_lengths])
        rewards = rewards + overlong
        breakdown["soft_overlong"] = overlong
    return Scores(rewards=rewards, breakdown=breakdown, verifier_scores=verifier_scores, verifier_errors=errors,
                  valid=None if bool(valid.all()) else valid)
