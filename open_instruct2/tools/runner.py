"""Runs a round's tool calls (concurrently across the batch) and counts what happened.

Faults never stop a run and never become a fake result: an unknown tool, arguments that do not fit the tool's
schema, a tool that raises and a call past --tool_timeout_s each give the model an error text as the output and are
counted (tools/errors, tools/timeouts). Outputs longer than --tool_max_output_chars are cut, with a note."""

import statistics
import threading
import time
from collections import Counter
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
    """Each call runs on a daemon thread of its own, at most max_concurrency at once (in waves). A call past the timeout
    is given up on: its thread (a Python function cannot be interrupted) runs on without holding a slot or keeping the
    process from exiting."""

    def __init__(self, tools: dict[str, Tool], timeout_s: float, max_concurrency: int, max_output_chars: int):
        self.tools, self.timeout_s, self.max_concurrency, self.max_output_chars = tools, timeout_s, max_concurrency, max_output_chars
        self.reset_stats()

    def reset_stats(self) -> None:
        self.calls, self.errors, self.timeouts, self.seconds = Counter(), 0, 0, []

    def run(self, calls: list[Call]) -> list[Outcome]:
        """Every call of a round (at most --tool_max_concurrency running at once); outcomes in the calls' order."""
        outcomes = []
        for start in range(0, len(calls), self.max_concurrency):
            outcomes += self._wave(calls[start : start + self.max_concurrency])
        for call, outcome in zip(calls, outcomes):
            self.calls[call.name if call.name in self.tools else "unknown"] += 1
            self.errors += outcome.error
            self.timeouts += outcome.timeout
            self.seconds.append(outcome.seconds)
        return outcomes

    def _wave(self, calls: list[Call]) -> list[Outcome]:
        boxes = [[] for _ in calls]
        threads = [threading.Thread(target=lambda c=c, b=b: b.append(self._one(c)), daemon=True, name=f"tool-{c.name}")
                   for c, b in zip(calls, boxes)]
        started = time.monotonic()
        for thread in threads:
            thread.start()
        outcomes = []
        for call, thread, box in zip(calls, threads, boxes):
            grace = 5.0 if self._own_timeout(call) else 0.0  # a tool that times itself out gets to say so
            thread.join(max(0.0, started + self.timeout_s + grace - time.monotonic()))
            outcomes.append(box[0] if box else Outcome(f"error: {call.name} did not answer within {self.timeout_s:g} s", error=True,
                                                       timeout=True, seconds=self.timeout_s))
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
        except jsonschema.SchemaError as e:  # checked at start-up (tools.check_schemas); never let it end the run
            return self._error(f"{call.name} has an invalid argument schema: {e.message}")
        start = time.perf_counter()
        try:
            text = tool.run(call.arguments)
        except ToolTimeout as e:
            return self._error(str(e), timeout=True, seconds=time.perf_counter() - start)
        except KeyboardInterrupt:
            raise
        except BaseException as e:  # noqa: BLE001 - a tool's own failure (sys.exit included) is the model's to read, and counted
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
        closed = set()
        for tool in self.tools.values():
            if id(tool.close) not in closed:
                closed.add(id(tool.close))
                tool.close()
