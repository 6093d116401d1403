"""The multi-turn rollout: generate until a tool call closes (or eos, a stop string, the length limit), run the
round's calls, append their outputs as tokens, continue the rows that called a tool; repeat.

- An engine is anything with `first(batch, num_samples, stop_strings)` (round 1: the prompts, num_samples rows
  each, so an engine can share a group's prompt) and `more(sequences, prompt_index, budgets, stop_strings)` (the rows
  that called a tool, each its full token ids so far and the new tokens it may still take), both returning a
  rollout.Rollouts, and `eos_ids` (the token ids it stops at: a segment ending in one calls no tool). HF generate
  (rollout.HFEngine) and the vLLM server (rollout_vllm.VLLMEngine) are the two.
- --response_length bounds the whole response, tool output included (as open-instruct counts it): a row's later
  rounds get what is left, and an output that does not fit is cut and ends the response ('length').
- A response that asks for call --max_tool_calls + 1 ends there, finish reason 'tool_limit'.
- The result is one Rollouts: the tokens as they were sampled and appended (never re-tokenized), `response_mask` on
  the policy's tokens only (--mask_tool_use; tool output otherwise), `tool_mask` on the tool output, sampler
  log-probs on the policy's tokens, `turns` for the dumps, and `answer_texts` (what the model wrote after the last
  tool output: what verifiers score, so a tool's output is never taken for the model's answer).
"""

from dataclasses import dataclass, field

import torch

from ..data import PromptBatch
from ..rollout import Rollouts
from .parsers import Call
from .runner import ToolRunner


@dataclass
class Piece:
    """A stretch of one response: text the policy wrote (with its sampler log-probs) or a tool's output."""

    ids: list[int]
    text: str
    logprobs: list[float] | None = None
    """None for tool output."""
    call: Call | None = None
    """The call this policy piece ends with."""


@dataclass
class Row:
    prompt: list[int]
    prompt_index: int
    pieces: list[Piece] = field(default_factory=list)
    calls: int = 0
    finish: str | None = None

    @property
    def response_ids(self) -> list[int]:
        return [t for p in self.pieces for t in p.ids]


@dataclass
class ToolUse:
    """What the loop needs besides an engine: built once per run by tools.build_tools."""

    parser: object
    runner: ToolRunner
    tokenizer: object
    max_tool_calls: int
    mask_tool_use: bool

    @property
    def stop_strings(self) -> list[str]:
        return list(self.parser.stop_strings)


def rollouts_with_tools(engine, tools: ToolUse, batch: PromptBatch, *, num_samples: int, response_length: int,
                        stop_strings: list[str] | None) -> Rollouts:
    stops = [*(stop_strings or []), *tools.stop_strings]
    first = engine.first(batch, num_samples, stops)
    rows = [Row(p.prompt_ids, i) for i, p in enumerate(batch.prompts) for _ in range(num_samples)]
    active, segments = list(range(len(rows))), first
    tools.runner.reset_stats()
    while True:
        wanting = []
        for at, i in enumerate(active):  # row i's new segment is row `at` of `segments`
            if _take_segment(rows[i], segments, at, tools, response_length, engine.eos_ids):
                wanting.append(i)
        outcomes = tools.runner.run([rows[i].pieces[-1].call for i in wanting])
        active = [i for i, outcome in zip(wanting, outcomes) if _append_output(rows[i], outcome.text, tools, response_length)]
        if not active:
            break
        budgets = [response_length - len(rows[i].response_ids) for i in active]
        segments = engine.more([rows[i].prompt + rows[i].response_ids for i in active], [rows[i].prompt_index for i in active],
                               budgets, stops)
        segments = _cut_to(segments, budgets, tools.tokenizer)  # an engine that ran every row to the largest budget
    out = assemble(rows, tools, device=first.input_ids.device, pad_id=tools.tokenizer.pad_token_id)
    out.stats = {**(first.stats or {}), **tools.runner.stats(len(rows)),
                 "tools/used_fraction": sum(r.calls > 0 for r in rows) / max(len(rows), 1)}
    return out


def _segment(segments: Rollouts, at: int) -> tuple[list[int], list[float], str]:
    n = int(segments.response_mask[at].sum())
    ids = segments.input_ids[at, segments.prompt_width : segments.prompt_width + n].tolist()
    logprobs = [] if segments.sampler_logprobs is None else segments.sampler_logprobs[at, :n].tolist()
    return ids, logprobs, segments.response_texts[at]


def _take_segment(row: Row, segments: Rollouts, at: int, tools: ToolUse, response_length: int, eos: set[int]) -> bool:
    """Append row's new segment (row `at` of `segments`); True when it ends with a tool call to run."""
    ids, logprobs, text = _segment(segments, at)
    reason = segments.finish_reasons[at]
    ended_by_eos = bool(ids) and ids[-1] in eos
    call = None if ended_by_eos or reason != "stop" else tools.parser.find_call(text)
    row.pieces.append(Piece(ids, text, logprobs or [0.0] * len(ids), call))
    if call is None:
        row.finish = "length" if reason == "length" else "stop"  # an eos on the last allowed token is a stop, as without tools
        return False
    if row.calls == tools.max_tool_calls:
        row.pieces[-1].call, row.finish = None, "tool_limit"
        return False
    if len(row.response_ids) >= response_length:  # the call's closing tag took the last of the budget
        row.pieces[-1].call, row.finish = None, "length"
        return False
    return True


def _append_output(row: Row, output: str, tools: ToolUse, response_length: int) -> bool:
    """Append a tool's output as tokens; True when the row continues (budget left)."""
    text = tools.parser.output_text(output)
    ids = tools.tokenizer.encode(text, add_special_tokens=False)
    left = response_length - len(row.response_ids)
    row.calls += 1
    row.pieces.append(Piece(ids[:left], text if len(ids) < left else tools.tokenizer.decode(ids[:left])))
    if len(ids) >= left:
        row.finish = "length"
        return False
    return True


def _cut_to(segments: Rollouts, budgets: list[int], tokenizer) -> Rollouts:
    """Rows of a batched continuation cut to their own budgets (the engine ran to the largest): a cut row ends 'length'."""
    lengths = segments.response_mask.sum(dim=1).tolist()
    for i, (n, budget) in enumerate(zip(lengths, budgets)):
        if n > budget:
            segments.response_mask[i, budget:] = 0
            segments.finish_reasons[i] = "length"
            ids = segments.input_ids[i, segments.prompt_width : segments.prompt_width + budget].tolist()
            segments.response_texts[i] = tokenizer.decode(ids, skip_special_tokens=True)
    return segments


def assemble(rows: list[Row], tools: ToolUse, device, pad_id: int) -> Rollouts:
    """The rows as one Rollouts: prompts left-padded to P, responses (policy pieces and tool outputs) from column P."""
    width = max(len(r.prompt) for r in rows)
    span = max(1, max(len(r.response_ids) for r in rows))
    n = len(rows)
    input_ids = torch.full((n, width + span), pad_id, dtype=torch.long)  # (N, P + T)
    attention_mask = torch.zeros((n, width + span), dtype=torch.long)
    policy_mask = torch.zeros((n, span), dtype=torch.long)  # (N, T) tokens the policy wrote
    tool_mask = torch.zeros((n, span), dtype=torch.long)  # (N, T) tool output
    sampler = torch.zeros((n, span), dtype=torch.float32)
    for i, row in enumerate(rows):
        input_ids[i, width - len(row.prompt) : width] = torch.tensor(row.prompt)
        at = 0
        for piece in row.pieces:
            end = at + len(piece.ids)
            if piece.ids:
                input_ids[i, width + at : width + end] = torch.tensor(piece.ids)
            (policy_mask if piece.logprobs is not None else tool_mask)[i, at:end] = 1
            if piece.logprobs is not None and piece.ids:
                sampler[i, at:end] = torch.tensor(piece.logprobs[: len(piece.ids)])
            at = end
        attention_mask[i, width - len(row.prompt) : width + at] = 1
    texts = tools.tokenizer.batch_decode([r.response_ids for r in rows], skip_special_tokens=True)
    return Rollouts(
        input_ids=input_ids.to(device),
        attention_mask=attention_mask.to(device),
        response_mask=(policy_mask if tools.mask_tool_use else policy_mask + tool_mask).to(device),
        prompt_width=width,
        finish_reasons=[r.finish or "stop" for r in rows],
        response_texts=texts,
        prompt_index=[r.prompt_index for r in rows],
        sampler_logprobs=sampler.to(device),
        tool_mask=tool_mask.to(device),
        turns=[turns_of(r) for r in rows],
        answer_texts=[answer_of(r) for r in rows],
    )


def turns_of(row: Row) -> list[dict]:
    """Each policy piece with the call it made and the output it got (the dumps' view of a response)."""
    turns, pieces = [], row.pieces
    for k, piece in enumerate(pieces):
        if piece.logprobs is None:
            continue
        output = pieces[k + 1].text if k + 1 < len(pieces) and pieces[k + 1].logprobs is None else None
        call = None if piece.call is None else {"name": piece.call.name, "arguments": piece.call.arguments, "problem": piece.call.problem}
        turns.append({"text": piece.text, "call": call, "output": output})
    return turns


def answer_of(row: Row) -> str:
    """What the policy wrote after the last tool output (all of it when it called no tool)."""
    last_tool = max((k for k, p in enumerate(row.pieces) if p.logprobs is None), default=-1)
    return "".join(p.text for p in row.pieces[last_tool + 1 :])
