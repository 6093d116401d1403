"""Rubric rewards: an LLM judge scores each response against weighted rubric items (judge.py does the calls).

Rows: `dataset` "general_rubric" (or "rubric"); `ground_truth` is JSON {"query": ..., "rubrics": [{"title",
"description", "weight"}]} (weights may be negative; the older spellings "Question" and "rubric_item" are
read too). A malformed one is a start-up error naming file and row.

Score of a response (each item judged on its own call, 0-2, scaled to [0, 1]):

    rubric score = sum_j w_j s_j / sum_{j: w_j > 0} w_j          (over the items the judge answered)

The denominator is the positive weight, not all weight: a response that fully meets every positive item and
shows none of the negative ones scores exactly 1, and each flaw it shows (a negative item) takes off its share,
so scores run from -(negative weight / positive weight) to 1 (with no positive item scored: sum |w|). A failed
judge call leaves that item out of both sums (counted); a response with no answered item gets no rubric
reward that step: it is left out of the group's advantages and of the loss, not scored 0.
- `--use_general_rubric`: rubric rows are judged on one fixed general rubric (comprehensive, factual,
  coherent) instead of their own items. `--use_likert_rubric`: one holistic 1-10 call per response, / 10.
- `--normalize_rubric_scores`: before weighting, each item's scores become z-scores across the prompt's group
  ((s - mean) / std; 0 where the group agrees), so items that everyone meets or misses do not dominate.
- `--apply_adaptive_rubric_reward`: each step, per prompt, the judge (or `--llm_judge_rubric_model`) reads
  the prompt's rollouts (each cut to `--answer_length_limit_in_words`) and the active items and proposes 1-5
  new ones, positive (weight +1) and negative (weight -1), as JSON; they are validated, de-duplicated against
  every item the prompt has had, and used to score the same rollouts (the rollouts that showed the difference
  are the ones that pay for it). A prompt whose proposal fails is skipped that step and counted.
- `--use_rubric_buffer`: per prompt, `static` (the row's items), `persistent` (never retired), `active` and
  `inactive` lists, plain JSON (saved with the training state). After scoring, active items with zero
  variance across the group are retired; above `--max_active_rubrics` the highest-variance ones stay.
  `--use_static_rubrics_as_persistent_rubrics true` makes the row's items persistent; false puts them in
  `active` and re-adds missing ones every `--add_static_rubrics_to_active_rubrics_every_n_steps` steps.
  Without the buffer, adaptive items live for the step that proposed them.
"""

import json
import math
import os
import re
from dataclasses import asdict, dataclass

from .judge import Judge, JudgeResult, estimate_tokens, fit, latency_percentiles

RUBRIC_VERIFIERS = ("general_rubric", "rubric")


@dataclass(frozen=True)
class Rubric:
    title: str
    description: str
    weight: float

    @property
    def key(self) -> str:
        """What makes two items the same: the description, lower case, letters and digits only."""
        return " ".join(re.findall(r"[a-z0-9]+", self.description.lower()))


GENERAL_RUBRIC = [
    Rubric("Comprehensive", "The response addresses every part of the question fully.", 1.0),
    Rubric("Factual", "Every claim in the response is correct.", 1.0),
    Rubric("Coherent", "The response is clear, well organised and easy to follow.", 1.0),
]


def parse_rubric_ground_truth(ground_truth: str) -> tuple[str, list[Rubric]]:
    """(query, items) of a rubric row, or ValueError naming what is wrong."""
    try:
        data = json.loads(ground_truth)
    except (TypeError, ValueError):
        raise ValueError(f"rubric ground truth is not JSON: {str(ground_truth)[:80]!r}") from None
    if isinstance(data, list) and len(data) == 1:
        data = data[0]
    if not isinstance(data, dict):
        raise ValueError('rubric ground truth must be {"query": ..., "rubrics": [{"title", "description", "weight"}]}')
    query = data.get("query", data.get("Question"))
    items = data.get("rubrics", data.get("rubric"))
    if not isinstance(query, str) or not query.strip():
        raise ValueError('rubric ground truth needs a non-empty "query"')
    if not isinstance(items, list) or not items:
        raise ValueError('rubric ground truth needs a non-empty "rubrics" list')
    rubrics = []
    for i, item in enumerate(items):
        if not isinstance(item, dict):
            raise ValueError(f"rubric item {i + 1} is not an object")
        text = item.get("description", item.get("rubric_item"))
        weight = item.get("weight", 1.0)
        if not isinstance(text, str) or not text.strip():
            raise ValueError(f'rubric item {i + 1} needs a non-empty "description" (or "rubric_item")')
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not math.isfinite(weight) or weight == 0:
            raise ValueError(f"rubric item {i + 1} has weight {weight!r}; use a non-zero number (negative for a flaw)")
        rubrics.append(Rubric(str(item.get("title") or text[:40]), text.strip(), float(weight)))
    return query, rubrics


# ---------------------------------------------------------------- the pure part: scores


def weighted_score(scores: list[float | None], weights: list[float]) -> float | None:
    """sum w s / sum of the positive w, over the answered items (s in [0, 1], None = not answered)."""
    answered = [(s, w) for s, w in zip(scores, weights) if s is not None]
    if not answered:
        return None
    positive = sum(w for _, w in answered if w > 0)
    denominator = positive if positive > 0 else sum(abs(w) for _, w in answered)
    return sum(w * s for s, w in answered) / denominator


def normalize_across_group(table: list[list[float | None]]) -> list[list[float | None]]:
    """table[i][j] = score of response i on item j -> per-item z-scores over the responses answered (0 when
    they all agree)."""
    out = [row[:] for row in table]
    for j in range(len(table[0]) if table else 0):
        column = [row[j] for row in table if row[j] is not None]
        if not column:
            continue
        mean = sum(column) / len(column)
        std = math.sqrt(sum((v - mean) ** 2 for v in column) / len(column))
        for i, row in enumerate(table):
            if row[j] is not None:
                out[i][j] = 0.0 if std < 1e-9 else (row[j] - mean) / std
    return out


def variance(values: list[float | None]) -> float:
    column = [v for v in values if v is not None]
    if len(column) < 2:
        return 0.0
    mean = sum(column) / len(column)
    return sum((v - mean) ** 2 for v in column) / len(column)


# ---------------------------------------------------------------- the buffer (plain data)


def new_entry(static: list[Rubric], persistent: bool) -> dict:
    items = [asdict(r) for r in static]
    return {"static": items, "persistent": items if persistent else [], "active": [] if persistent else list(items), "inactive": []}


def scoring_items(entry: dict) -> list[Rubric]:
    return [Rubric(**r) for r in entry["persistent"] + entry["active"]]


def known_keys(entry: dict) -> set[str]:
    return {Rubric(**r).key for lst in ("persistent", "active", "inactive") for r in entry[lst]}


def update_entry(entry: dict, added: list[Rubric], variances: dict[str, float], max_active: int) -> tuple[list[dict], list[dict]]:
    """After scoring: add new items, retire active ones the group did not tell apart, cap by variance.
    Returns (added, retired) as dicts. Persistent items are never retired."""
    added_dicts = [asdict(r) for r in added]
    active = entry["active"] + added_dicts
    keep = [r for r in active if variances.get(Rubric(**r).key, 0.0) > 0]
    retired = [r for r in active if variances.get(Rubric(**r).key, 0.0) <= 0]
    if len(keep) > max_active:
        keep.sort(key=lambda r: -variances.get(Rubric(**r).key, 0.0))
        retired += keep[max_active:]
        keep = keep[:max_active]
    entry["active"] = keep
    entry["inactive"] = entry["inactive"] + retired
    return added_dicts, retired


def readd_static(entry: dict) -> list[dict]:
    """Static items missing from active (and not persistent) come back; returns those re-added."""
    present = {Rubric(**r).key for r in entry["active"] + entry["persistent"]}
    back = [r for r in entry["static"] if Rubric(**r).key not in present]
    entry["active"] = entry["active"] + back
    keys = {Rubric(**r).key for r in back}
    entry["inactive"] = [r for r in entry["inactive"] if Rubric(**r).key not in keys]
    return back


# ---------------------------------------------------------------- judge requests

SCORE_SCHEMA = {"type": "object", "properties": {"score": {"type": "integer", "minimum": 0, "maximum": 2}}, "required": ["score"]}
LIKERT_SCHEMA = {"type": "object", "properties": {"score": {"type": "integer", "minimum": 1, "maximum": 10}}, "required": ["score"]}
_ITEMS = {"type": "array", "items": {"type": "object", "properties": {"title": {"type": "string"}, "description": {"type": "string"}},
                                     "required": ["title", "description"]}, "maxItems": 5}
PROPOSAL_SCHEMA = {"type": "object", "properties": {"positive": {**_ITEMS, "minItems": 1}, "negative": _ITEMS}, "required": ["positive", "negative"]}

JUDGE_SYSTEM = "You are a careful, strict grader. You answer with one JSON object and nothing else."


def _number(value, low: float, high: float) -> float:
    if isinstance(value, str):
        value = value.strip()
        value = float(value) if re.fullmatch(r"-?\d+(\.\d+)?", value) else value
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not low <= value <= high:
        raise ValueError(f"score {value!r} is not a number from {low:g} to {high:g}")
    return float(value)


def validate_score(obj: dict) -> dict:
    return {"score": _number(obj.get("score"), 0, 2)}


def validate_likert(obj: dict) -> dict:
    return {"score": _number(obj.get("score"), 1, 10)}


def validate_proposal(obj: dict) -> dict:
    out = {}
    for side in ("positive", "negative"):
        items = obj.get(side, [])
        if not isinstance(items, list):
            raise ValueError(f'"{side}" is not a list')
        out[side] = [{"title": str(i.get("title") or "").strip(), "description": i["description"].strip()}
                     for i in items if isinstance(i, dict) and isinstance(i.get("description"), str) and i["description"].strip()]
    if not 1 <= len(out["positive"]) + len(out["negative"]) <= 10:
        raise ValueError(f"{len(out['positive']) + len(out['negative'])} usable items; want 1 to 5")
    return out


def words(text: str, limit: int) -> str:
    parts = text.split()
    return text if len(parts) <= limit else " ".join(parts[:limit]) + " [...]"


def score_request(query: str, response: str, item: Rubric, max_context: int):
    head = f"Question:\n{query}\n\nResponse:\n"
    tail = (f"\n\nCriterion: {item.title}. {item.description}\n\nHow well does the response meet the criterion? "
            "0 = not at all, 1 = partly, 2 = fully. (If the criterion describes a flaw, rate how clearly the response shows "
            'that flaw.) Answer with JSON: {"score": 0, 1 or 2}.')
    room = max_context - estimate_tokens(JUDGE_SYSTEM + head + tail)
    messages = [{"role": "system", "content": JUDGE_SYSTEM}, {"role": "user", "content": head + fit(response, room) + tail}]
    return messages, SCORE_SCHEMA, "rubric_score", validate_score


def likert_request(query: str, response: str, max_context: int):
    head = f"Question:\n{query}\n\nResponse:\n"
    tail = '\n\nRate the overall quality of the response from 1 (useless) to 10 (excellent). Answer with JSON: {"score": 1 to 10}.'
    room = max_context - estimate_tokens(JUDGE_SYSTEM + head + tail)
    messages = [{"role": "system", "content": JUDGE_SYSTEM}, {"role": "user", "content": head + fit(response, room) + tail}]
    return messages, LIKERT_SCHEMA, "likert_score", validate_likert


def proposal_request(query: str, responses: list[str], existing: list[Rubric], max_context: int, word_limit: int):
    listed = "\n".join(f"- {r.title}: {r.description} (weight {r.weight:+g})" for r in existing) or "(none yet)"
    head = f"Question:\n{query}\n\nCriteria already used:\n{listed}\n\n"
    tail = ("Write new criteria (at most 5 in all) that tell the better of these responses from the worse: 'positive' ones "
            "describe qualities of the best responses, 'negative' ones describe flaws that some responses show. Do not repeat "
            'the criteria already used. Answer with JSON: {"positive": [{"title": ..., "description": ...}], "negative": [...]}.')
    room = max_context - estimate_tokens(JUDGE_SYSTEM + head + tail)
    per = max(16, room // max(1, len(responses)))
    shown = "".join(f"Response {i + 1}:\n{fit(words(r, word_limit), per)}\n\n" for i, r in enumerate(responses))
    messages = [{"role": "system", "content": JUDGE_SYSTEM}, {"role": "user", "content": head + shown + tail}]
    return messages, PROPOSAL_SCHEMA, "rubric_proposal", validate_proposal


# ---------------------------------------------------------------- one step


@dataclass
class RubricScores:
    scores: list[float | None]
    """Per sample: the rubric score, or None (not a rubric row, or no item answered)."""
    metrics: dict[str, float]
    records: list[dict]
    """One per prompt, for adaptive_rubrics_<run>.jsonl."""


class RubricScorer:
    """Scores a step's rubric rows; owns the judge(s), keeps the buffer in the dict it is given."""

    def __init__(self, cfg, judge: Judge, proposer: Judge | None = None):
        self.cfg, self.judge, self.proposer = cfg, judge, proposer or judge

    def score(self, step: int, keys: list[str], queries: list[str], statics: list[list[Rubric]], responses: list[str],
              group: int, buffer: dict) -> RubricScores:
        """keys/queries/statics: one per prompt (None query: not a rubric row); responses: the N = prompts x group
        samples, those of one prompt contiguous (final answers, already extracted)."""
        rc = self.cfg
        prompts = [p for p, q in enumerate(queries) if q is not None]
        entries = {}
        readded = 0
        for p in prompts:
            static = GENERAL_RUBRIC if rc.use_general_rubric else statics[p]
            entry = buffer.setdefault(keys[p], new_entry(static, rc.use_static_rubrics_as_persistent_rubrics)) if rc.use_rubric_buffer \
                else new_entry(static, persistent=True)
            if rc.use_rubric_buffer and not rc.use_static_rubrics_as_persistent_rubrics and step % rc.add_static_rubrics_to_active_rubrics_every_n_steps == 0:
                readded += len(readd_static(entry))
            entries[p] = entry
        # 1. adaptive items, proposed from this step's rollouts
        proposals: dict[int, list[Rubric]] = {}
        skipped = 0
        if rc.apply_adaptive_rubric_reward and not rc.use_likert_rubric and prompts:
            requests = [proposal_request(queries[p], responses[p * group : (p + 1) * group], scoring_items(entries[p]),
                                         self.judge.settings.max_context_length, rc.answer_length_limit_in_words) for p in prompts]
            for p, result in zip(prompts, self.proposer.ask_all(requests)):
                if result.value is None:
                    skipped += 1
                    continue
                seen, new = known_keys(entries[p]), []
                for side, weight in (("positive", 1.0), ("negative", -1.0)):
                    for item in result.value[side]:
                        rubric = Rubric(item["title"] or item["description"][:40], item["description"], weight)
                        if rubric.key and rubric.key not in seen and len(new) < 5:
                            seen.add(rubric.key)
                            new.append(rubric)
                proposals[p] = new
        # 2. every (response, item) pair, concurrently
        items = {p: ([] if rc.use_likert_rubric else scoring_items(entries[p]) + proposals.get(p, [])) for p in prompts}
        requests, where = [], []
        for p in prompts:
            for i in range(p * group, (p + 1) * group):
                if rc.use_likert_rubric:
                    requests.append(likert_request(queries[p], responses[i], self.judge.settings.max_context_length))
                    where.append((p, i, 0))
                for j, item in enumerate(items[p]):
                    requests.append(score_request(queries[p], responses[i], item, self.judge.settings.max_context_length))
                    where.append((p, i, j))
        results = self.judge.ask_all(requests)
        table = {p: [[None] * max(1, len(items[p])) for _ in range(group)] for p in prompts}
        for (p, i, j), result in zip(where, results):
            if result.value is not None:
                scale = 10.0 if rc.use_likert_rubric else 2.0
                table[p][i - p * group][j] = result.value["score"] / scale
        # 3. scores, buffer upkeep, records
        scores: list[float | None] = [None] * len(responses)
        added_total = retired_total = 0
        records = []
        for p in prompts:
            rows = normalize_across_group(table[p]) if rc.normalize_rubric_scores and not rc.use_likert_rubric else table[p]
            weights = [1.0] if rc.use_likert_rubric else [r.weight for r in items[p]]
            for k in range(group):
                scores[p * group + k] = weighted_score(rows[k], weights)
            variances = {r.key: variance([table[p][k][j] for k in range(group)]) for j, r in enumerate(items[p])}
            added, retired = [], []
            if rc.use_rubric_buffer:
                added, retired = update_entry(entries[p], proposals.get(p, []), variances, rc.max_active_rubrics)
            else:
                added = [asdict(r) for r in proposals.get(p, [])]
            added_total += len(added)
            retired_total += len(retired)
            records.append({
                "step": step, "prompt_id": keys[p], "query": queries[p], "added": added, "retired": retired,
                "active": entries[p]["persistent"] + entries[p]["active"] if rc.use_rubric_buffer else [asdict(r) for r in items[p]],
                "skipped": p not in proposals and rc.apply_adaptive_rubric_reward,
                "scores": {r.description: _mean_std([table[p][k][j] for k in range(group)]) for j, r in enumerate(items[p])},
            })
        answered = [s for s in scores if s is not None]
        failures = sum(r.value is None for r in results)
        metrics = {
            "rubric/judge_calls": float(len(results) + (len(prompts) if rc.apply_adaptive_rubric_reward and not rc.use_likert_rubric else 0)),
            "rubric/judge_failures": float(failures + skipped),
            "rubric/unscored_responses": float(sum(1 for p in prompts for k in range(group) if scores[p * group + k] is None)),
            "rubric/added": float(added_total),
            "rubric/retired": float(retired_total),
            "rubric/readded_static": float(readded),
            "rubric/active": float(sum(len(items[p]) for p in prompts)),
            "rubric/skipped_prompts": float(skipped),
            **latency_percentiles(results),
        }
        if answered:
            metrics["rubric/reward_mean"] = sum(answered) / len(answered)
        first_error = next((r.error for r in results if r.error), None)
        if first_error:
            metrics_error = f"{failures} of {len(results)} judge calls failed; first: {first_error}"
            import logging

            logging.getLogger(__name__).warning("rubric: %s", metrics_error)
        return RubricScores(scores, metrics, records)


def _mean_std(values: list[float | None]) -> dict:
    column = [v for v in values if v is not None]
    if not column:
        return {"mean": None, "std": None, "answered": 0}
    mean = sum(column) / len(column)
    return {"mean": round(mean, 4), "std": round(math.sqrt(variance(column)), 4), "answered": len(column)}


def append_records(run_dir: str, run_name: str, records: list[dict]) -> str:
    path = os.path.join(run_dir, f"adaptive_rubrics_{run_name}.jsonl")
    with open(path, "a") as f:
        f.writelines(json.dumps(r) + "\n" for r in records)
    return path


def judge_failed_entirely(metrics: dict[str, float]) -> bool:
    return metrics.get("rubric/judge_calls", 0.0) > 0 and metrics["rubric/judge_failures"] >= metrics["rubric/judge_calls"]


__all__ = ["Rubric", "RubricScorer", "RubricScores", "JudgeResult", "parse_rubric_ground_truth", "weighted_score"]


# ---------------------------------------------------------------- glue for the trainer


def rubric_inputs(prompt) -> tuple[str, list[Rubric]] | tuple[None, None]:
    """(query, the row's items) of a rubric row, (None, None) for any other row."""
    names = [n for n in prompt.verifiers if n in RUBRIC_VERIFIERS]
    if not names:
        return None, None
    index = prompt.verifiers.index(names[0])
    truth = prompt.ground_truth[index if len(prompt.ground_truth) > index else 0]
    return parse_rubric_ground_truth(truth)


def make_judges(rc) -> tuple[Judge, Judge]:
    """(scoring judge, rubric-writing judge) from the flags; the key comes from the environment."""
    from .judge import JudgeSettings, resolve_base_url

    settings = JudgeSettings(
        base_url=resolve_base_url(rc.llm_judge_base_url), model=rc.llm_judge_model, api_key=os.environ.get(rc.llm_judge_api_key_env),
        temperature=rc.llm_judge_temperature, max_tokens=rc.llm_judge_max_tokens, timeout_s=float(rc.llm_judge_timeout),
        max_context_length=rc.llm_judge_max_context_length, concurrency=rc.llm_judge_max_concurrency,
        max_retries=rc.llm_judge_max_retries, structured=rc.llm_judge_structured_output,
    )
    judge = Judge(settings)
    if rc.llm_judge_rubric_model and rc.llm_judge_rubric_model != rc.llm_judge_model:
        from dataclasses import replace

        return judge, Judge(replace(settings, model=rc.llm_judge_rubric_model))
    return judge, judge


def score_batch(scorer: RubricScorer, step: int, prompts: list, responses: list[str], group: int, buffer: dict) -> RubricScores:
    """A rollout batch: prompts (one per group), responses (prompts x group, final answers)."""
    parsed = [rubric_inputs(p) for p in prompts]
    keys = [f"{p.source}#{p.row}" for p in prompts]
    return scorer.score(step, keys, [q for q, _ in parsed], [items for _, items in parsed], responses, group, buffer)
