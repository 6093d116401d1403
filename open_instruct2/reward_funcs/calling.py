"""Calling the reward functions on one batch and adding up their rewards.

    reward_i = sum over functions f of  weight_f * r_f,i   (functions that returned None for sample i left out)
    valid_i  = some function returned a number for sample i (else: no reward this step, out of the loss)

Every function gets TRL's keyword arguments (`prompts`, `completions`, `completion_ids`, every other column of
the dataset row, `trainer_state`) and ours (`finish_reasons`, `group_index`, `verifier_rewards`,
`rubric_scores`), each a list aligned with the samples; a function is passed only the ones it names, or all of
them when it takes **kwargs. `async def` functions of a batch run concurrently.
"""

import asyncio
import logging
import math
import numbers
import threading
from dataclasses import dataclass

from ..errors import UserError
from .loading import RewardFunction

log = logging.getLogger(__name__)

PASSED = ("prompts", "completions", "completion_ids", "trainer_state", "finish_reasons", "group_index", "verifier_rewards", "rubric_scores")
"""The keyword arguments every call has besides the dataset's columns (a column may not take one of these names)."""


@dataclass
class TrainerState:
    """What TRL's reward functions read of `trainer_state`."""

    global_step: int
    """Training steps done so far, TRL's meaning: 0 while the first batch is scored, N in the evaluation after step N."""
    max_steps: int


class RewardFunctionError(Exception):
    """One function's call failed or returned something unusable: message names the function and the problem."""


def _check(name: str, values, n: int) -> list[float | None]:
    if isinstance(values, (str, bytes)) or not hasattr(values, "__len__"):
        raise RewardFunctionError(f"reward function {name!r} returned a {type(values).__name__}; return a list of {n} floats (or None)")
    if len(values) != n:
        raise RewardFunctionError(f"reward function {name!r} returned {len(values)} values for {n} completions; return one per completion")
    out = []
    for i, v in enumerate(values):
        if v is None:
            out.append(None)
            continue
        if hasattr(v, "item") and getattr(v, "ndim", 0) == 0:  # a numpy or torch scalar
            v = v.item()
        if isinstance(v, bool) or not isinstance(v, numbers.Real):
            raise RewardFunctionError(f"reward function {name!r} returned {v!r} ({type(v).__name__}) for completion {i}; return a float or None")
        v = float(v)
        if math.isnan(v):  # TRL's convention: nan = not applicable
            out.append(None)
        elif math.isinf(v):
            raise RewardFunctionError(f"reward function {name!r} returned {v} for completion {i}; return a finite float or None")
        else:
            out.append(v)
    return out


def _kwargs(f: RewardFunction, inputs: dict) -> dict:
    return dict(inputs) if f.accepts is None else {k: v for k, v in inputs.items() if k in f.accepts}


def _describe(e: BaseException) -> str:
    return f"{type(e).__name__}: {e}"[:300]


_loop: asyncio.AbstractEventLoop | None = None


def event_loop() -> asyncio.AbstractEventLoop:
    """One event loop for the process, run in a daemon thread: an async function's client (e.g. AsyncOpenAI made at
    import) stays bound to a live loop across batches, and a caller that is itself in an event loop (a notebook) works."""
    global _loop
    if _loop is None:
        _loop = asyncio.new_event_loop()
        threading.Thread(target=_loop.run_forever, daemon=True, name="reward-functions").start()
    return _loop


def _outcome(f: RewardFunction, returned, n: int) -> list[float | None] | RewardFunctionError:
    """What a call returned, checked, or the exception it raised, as the error naming the function."""
    if isinstance(returned, BaseException):
        return RewardFunctionError(f"reward function {f.name!r} raised {_describe(returned)}")
    try:
        return _check(f.name, returned, n)
    except RewardFunctionError as e:
        return e


def call_all(funcs: list[RewardFunction], inputs: dict, n: int) -> dict[str, list[float | None] | RewardFunctionError]:
    """name -> values, or the error that function's call ended in (sync ones in order, async ones together)."""
    out: dict[str, list[float | None] | RewardFunctionError] = {}
    for f in funcs:
        if f.is_async:
            continue
        try:
            returned = f.fn(**_kwargs(f, inputs))
        except Exception as e:  # noqa: BLE001 - a user's function may raise anything: counted, named
            returned = e
        out[f.name] = _outcome(f, returned, n)
    asynchronous = [f for f in funcs if f.is_async]
    if asynchronous:
        async def one(f: RewardFunction):
            return await f.fn(**_kwargs(f, inputs))  # a call that raises before its first await is caught too

        async def gather():
            return await asyncio.gather(*(one(f) for f in asynchronous), return_exceptions=True)

        for f, returned in zip(asynchronous, asyncio.run_coroutine_threadsafe(gather(), event_loop()).result()):
            out[f.name] = _outcome(f, returned, n)
    return {f.name: out[f.name] for f in funcs}


def check_columns(funcs: list[RewardFunction], columns: set[str], where: str) -> None:
    """At start-up: no column shadows a passed argument, and every function's required argument is there."""
    clash = sorted(columns & set(PASSED))
    if clash:
        raise UserError(f"{where}: column {clash[0]!r} has the name of an argument every reward function is passed; rename the column")
    available = columns | set(PASSED)
    for f in funcs:
        missing = sorted(f.required - available)
        if missing:
            raise UserError(f"reward function {f.name!r} needs {', '.join(repr(m) for m in missing)}, which {where} does not have "
                            f"(columns: {', '.join(sorted(columns)) or 'none'}); add the column or give the parameter a default")


def combine(funcs: list[RewardFunction], results: dict[str, list[float | None] | RewardFunctionError], n: int):
    """(rewards (n,), valid (n,), metrics, errors): the weighted sum over the numbers each sample got."""
    rewards, counted = [0.0] * n, [False] * n
    metrics, errors = {}, []
    for f in funcs:
        values = results[f.name]
        if isinstance(values, RewardFunctionError):
            errors.append(str(values))
            metrics[f"reward/{f.name}/errors"] = 1.0
            continue
        numbers_ = [v for v in values if v is not None]
        for i, v in enumerate(values):
            if v is not None:
                rewards[i] += f.weight * v
                counted[i] = True
        if numbers_:
            mean = sum(numbers_) / len(numbers_)
            metrics[f"reward/{f.name}/mean"] = mean
            metrics[f"reward/{f.name}/std"] = math.sqrt(sum((v - mean) ** 2 for v in numbers_) / len(numbers_))
        metrics[f"reward/{f.name}/none_fraction"] = 1.0 - len(numbers_) / n if n else 0.0
        metrics[f"reward/{f.name}/errors"] = 0.0
    return rewards, counted, metrics, errors
