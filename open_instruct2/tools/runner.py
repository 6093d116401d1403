"""Runs a round's tool calls (concurrently across the batch) and counts what happened.

Faults never stop a run and never become a fake result: an unknown tool, arguments that do not fit the tool's
schema, a tool that raises and a call past --tool_timeout_s each give the model an error text as the output and are
counted (tools/errors, tools/timeouts). Outputs longer than --tool_max_output_chars are cut, with a note."""

import statistics
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor, TimeoutError as FutureTimeout
from dataclasses import dataclass

import jsonschema

from .base import Tool, ToolError, ToolTimeout
from .parsers import Call


@dataclass
class Outcome:
    text: str
    """What the model reads."""
    error: bool = False
    timeout: bool = False
    seconds: float = 0.0


class ToolRunner:
    def __init__(self, tools: dict[str, Tool], timeout_s: float, max_concurrency: int, max_output_chars: int):
        self.tools, self.timeout_s, self.max_output_chars = tools, timeout_s, max_output_chars
        self.pool = ThreadPoolExecutor(max_workers=max_concurrency, thread_name_prefix="tool")
        self.reset_stats()

    def reset_stats(self) -> None:
        self.calls, self.errors, self.timeouts, self.seconds = Counter(), 0, 0, []

    def run(self, calls: list[Call]) -> list[Outcome]:
        """Every call of a round at once (at most --tool_max_concurrency running); outcomes in the calls' order."""
        futures = [self.pool.submit(self._one, call) for call in calls]
        outcomes = []
        for call, future in zip(calls, futures):
            try:
                outcome = future.result(timeout=self.timeout_s + 5 if self._own_timeout(call) else self.timeout_s)
            except FutureTimeout:  # the function runs on in its thread; the model is told and the call is counted
                outcome = Outcome(f"error: {call.name} did not answer within {self.timeout_s:g} s", error=True, timeout=True,
                                  seconds=self.timeout_s)
            self.calls[call.name if call.name in self.tools else "unknown"] += 1
            self.errors += outcome.error
            self.timeouts += outcome.timeout
            self.seconds.append(outcome.seconds)
            outcomes.append(outcome)
        return outcomes

    def _own_timeout(self, call: Call) -> bool:
        return call.name in self.tools and self.tools[call.name].own_timeout

    def _one(self, call: Call) -> Outcome:
        if call.arguments is None:
            return self._error(call.problem)
        tool = self.tools.get(call.name)
        if tool is None:
            return self._error(f"there is no tool {call.name!r}; the tools are {', '.join(self.tools)}")
        try:
            jsonschema.validate(call.arguments, tool.parameters)
        except jsonschema.ValidationError as e:
            return self._error(f"wrong arguments for {call.name}: {e.message}")
        start = time.perf_counter()
        try:
            text = tool.run(call.arguments)
        except ToolTimeout as e:
            return self._error(str(e), timeout=True, seconds=time.perf_counter() - start)
        except Exception as e:  # noqa: BLE001 - a tool's own failure is the model's to read, and counted
            return self._error(str(e) if isinstance(e, ToolError) else f"{type(e).__name__}: {e}", seconds=time.perf_counter() - start)
        return Outcome(self._cut(str(text)), seconds=time.perf_counter() - start)

    def _error(self, message: str, timeout: bool = False, seconds: float = 0.0) -> Outcome:
        return Outcome("error: " + self._cut(message), error=True, timeout=timeout, seconds=seconds)

    def _cut(self, text: str) -> str:
        if len(text) <= self.max_output_chars:
            return text
        return text[: self.max_output_chars] + f"\n... [output cut to {self.max_output_chars} characters]"

    def stats(self, responses: int) -> dict[str, float]:
        """The step's tools/ metrics (since the last reset_stats)."""
        total = sum(self.calls.values())
        metrics = {"tools/calls_per_response": total / max(responses, 1), "tools/errors": float(self.errors),
                   "tools/timeouts": float(self.timeouts), "tools/latency_p50_s": statistics.median(self.seconds) if self.seconds else 0.0}
        metrics.update({f"tools/{name}/calls": float(self.calls[name]) for name in [*self.tools, "unknown"] if name in self.calls or name in self.tools})
        return metrics

    def close(self) -> None:
        self.pool.shutdown(wait=False, cancel_futures=True)
        closed = set()
        for tool in self.tools.values():
            if id(tool.close) not in closed:
                closed.add(id(tool.close))
                tool.close()
