"""Reward functions (--reward_funcs, --reward_weights): Python callables over the whole batch, TRL's convention.

    fn(prompts=..., completions=..., completion_ids=..., <every dataset column>=..., trainer_state=..., **kwargs)
        -> list[float | None]        one per completion; None = not applicable to this sample

The run's reward is their weighted sum (calling.py); the builtins are in builtin.py, today's verifiers and rubric
judge among them (`verifiable`, `rubric`). Without --reward_funcs the reward is `verifiable`'s, computed exactly
as before (rewards.compute_scores). A function that fails on the first batch this process scores ends the run with
one line (a broken function is found at once); later, its values are left out of that batch and counted
(reward/<name>/errors), as a verifier's error is.
"""

import logging

import torch

from ..data import Prompt
from ..errors import UserError
from ..rewards import Scores
from .builtin import builtins
from .calling import PASSED, RewardFunctionError, TrainerState, call_all, check_columns, combine
from .loading import RewardFunction, load

log = logging.getLogger(__name__)

__all__ = ["PASSED", "RewardFunction", "RewardFunctions", "TrainerState", "load_reward_funcs"]

BASE_NEEDED = ("verifiable", "rubric")
"""Builtins whose values come from today's scoring (verifiers and the judge): it runs only when one is listed."""


def completion_format(prompt: Prompt):
    """TRL's shapes: a standard (text) prompt's completion is the text; a conversational one's, one assistant message."""
    return (lambda text: text) if prompt.text_prompt is not None else (lambda text: [{"role": "assistant", "content": text}])


class RewardFunctions:
    """The run's reward functions; `score` turns one batch of completions into Scores."""

    def __init__(self, funcs: list[RewardFunction], max_steps: int):
        self.funcs, self.max_steps = funcs, max_steps
        self.batches = 0
        self.needs_base = any(f.name in BASE_NEEDED for f in funcs)

    def names(self) -> list[str]:
        return [f.name for f in self.funcs]

    def check_prompts(self, prompts: list[Prompt]) -> None:
        """At start-up: every row's columns fit every function's required arguments (the first misfit is named)."""
        fits = set()
        for p in prompts:
            columns = frozenset(p.columns)
            if columns not in fits:
                check_columns(self.funcs, set(columns), f"{p.source} row {p.row}")
                fits.add(columns)

    def inputs(self, steps_done: int, samples: list[Prompt], texts: list[str], completion_ids: list[list[int]], finish_reasons: list[str],
               group_index: list[int], base: Scores | None) -> dict:
        columns = {}
        for name in {k for p in samples for k in p.columns}:
            columns[name] = [p.columns.get(name) for p in samples]
        verifier_rewards = rubric_scores = None
        if base is not None:
            valid = [True] * len(samples) if base.valid is None else base.valid.tolist()
            verifier_rewards = [float(r) if ok else None for r, ok in zip(base.rewards.tolist(), valid)]
            rubric_scores = base.rubric_scores or [None] * len(samples)
        return {
            **columns,
            "prompts": [p.text_prompt if p.text_prompt is not None else p.messages for p in samples],
            "completions": [completion_format(p)(t) for p, t in zip(samples, texts)],
            "completion_ids": completion_ids,
            "trainer_state": TrainerState(global_step=steps_done, max_steps=self.max_steps),
            "finish_reasons": finish_reasons,
            "group_index": group_index,
            "verifier_rewards": verifier_rewards,
            "rubric_scores": rubric_scores,
        }

    def score(self, inputs: dict, base: Scores | None) -> Scores:
        n = len(inputs["completions"])
        results = call_all(self.funcs, inputs, n)
        first = self.batches == 0
        self.batches += 1
        failed = [v for v in results.values() if isinstance(v, RewardFunctionError)]
        if failed and first:  # a broken function: say so at once, before it trains on nothing
            raise UserError(f"{failed[0]}; fix the function (it was called on the first batch of {n} completions)")
        rewards, counted, metrics, errors = combine(self.funcs, results, n)
        metrics["reward/functions_failed"] = float(len(errors))
        if errors:
            log.warning("reward: %d reward function(s) failed on this batch and were left out; first: %s", len(errors), errors[0])
        valid = torch.tensor(counted, dtype=torch.bool)
        return Scores(
            rewards=torch.tensor(rewards, dtype=torch.float32),
            breakdown={} if base is None else base.breakdown,
            verifier_scores=None if base is None else base.verifier_scores,
            verifier_errors=0 if base is None else base.verifier_errors,
            valid=None if bool(valid.all()) else valid,
            metrics={**((base.metrics or {}) if base is not None else {}), **metrics},
            rubric_scores=None if base is None else base.rubric_scores,
            function_values={name: ([None] * n if isinstance(v, RewardFunctionError) else v) for name, v in results.items()},
        )


def load_reward_funcs(reward_cfg, response_length: int, max_steps: int) -> RewardFunctions | None:
    """None without --reward_funcs (today's reward, unchanged)."""
    if not reward_cfg.reward_funcs:
        return None
    funcs = load(reward_cfg.reward_funcs, reward_cfg.reward_weights, builtins(reward_cfg, response_length))
    log.info("rewards: %s", " + ".join(f"{f.weight:g} x {f.name}" + (" (async)" if f.is_async else "") for f in funcs))
    run = RewardFunctions(funcs, max_steps)
    if not run.needs_base and (reward_cfg.verifier or reward_cfg.apply_r1_style_format_reward or reward_cfg.non_stop_penalty):
        log.warning("rewards: --verifier, the format reward and the non-stop penalty reach the reward only through the verifiable "
                    "builtin, which --reward_funcs does not list; add verifiable to use them")
    return run
