"""Rubric rewards: an LLM judge scores each response against weighted rubric items (judge.py does the calls).

Rows: `dataset` "general_rubric" (or "rubric"); `ground_truth` is JSON {"query": ..., "rubrics": [{"title",
"description", "weight"}]} (weights may be negative; the older spellings "Question" and "rubric_item" are
read too). A malformed one is a start-up error naming file and row.

Score of a response (each item judged on its own call, 0-2, scaled to [0, 1]):

    rubric score = sum_j w_j s_j / sum_{j: w_j > 0} w_j          (over the items the judge answered)

The denominator is the positive weight, not all weight: a response that fully meets every positive item and
shows none of the negative ones scores exactly 1, and each flaw it shows (a negative item) takes off its share,
so scores run from -(negative weight / positive weight) to 1 (with no positive item scored: sum |w|).

Judge failures never become scores. A failed call is asked once more at the end of the step; what still fails is
counted, and the group is scored only on the items every one of its responses got an answer for (group_scores):
otherwise one 429 on one answer's positive item scores two identical answers 1.0 and 0.0. A response with no
answered item gets no rubric reward that step: it is left out of the group's advantages and of the loss, not
scored 0. A response with no final answer (cut off inside <think>: verifiers.final_answer) scores 0 on every item,
without a call. The judge sees each response inside a fence with a random id (judge_prompts.py): text in it is
graded, never obeyed. One step's scoring (the calls, the retry, the buffer upkeep) is rubric_scorer.py.
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
  `inactive` lists, plain JSON (saved with the training state). After scoring, active items measured with zero
  variance across the group (two or more answered scores, all equal) are retired; an item with fewer answers is
  kept, and a prompt whose calls all failed leaves its entry untouched that step (an outage measures nothing);
  above `--max_active_rubrics` the highest-variance ones stay.
  `--use_static_rubrics_as_persistent_rubrics true` makes the row's items persistent; false puts them in
  `active` and re-adds missing ones every `--add_static_rubrics_to_active_rubrics_every_n_steps` steps.
  Without the buffer, adaptive items live for the step that proposed them.
"""

import json
import math
import os
import re
from dataclasses import asdict, dataclass

from .judge import Judge, JudgeResult
from .judge_prompts import (likert_request, proposal_request, score_request, validate_likert, validate_proposal,  # noqa: F401
                            validate_score)

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


def group_scores(table: list[list[float | None]], weights: list[float], normalize: bool = False) -> tuple[list[float | None], int]:
    """Rubric scores of one prompt's group. table[k][j]: response k's score on item j (None: the judge gave no
    answer). A response with no answer at all is unscored (None); the others are all scored on the items every one
    of them has an answer for, so a failed call cannot make two equal responses differ (scoring each response on its
    own answered items would: 1.0 against 0.0 for two identical answers when one lost its positive item). Returns
    (scores, items left out of the group's score)."""
    scored = [k for k, row in enumerate(table) if any(v is not None for v in row)]
    common = [j for j in range(len(weights)) if all(table[k][j] is not None for k in scored)]
    kept = [[row[j] if k in scored and j in common else None for j in range(len(weights))] for k, row in enumerate(table)]
    rows = normalize_across_group(kept) if normalize else kept
    scores = [weighted_score(row, weights) if k in scored and common else None for k, row in enumerate(rows)]
    return scores, (len(weights) - len(common)) if scored else 0


def variance(values: list[float | None]) -> float | None:
    """Population variance of the answered values; None when fewer than two were answered (nothing measured)."""
    column = [v for v in values if v is not None]
    if len(column) < 2:
        return None
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


def update_entry(entry: dict, added: list[Rubric], variances: dict[str, float | None], max_active: int) -> tuple[list[dict], list[dict]]:
    """After scoring: add new items, retire active ones the group was measured not to tell apart (variance 0 over
    two or more answered scores; an item with fewer answers is kept: nothing was measured), cap by variance.
    Returns (added, retired) as dicts. Persistent items are never retired."""
    added_dicts = [asdict(r) for r in added]

    def measured(r: dict) -> float | None:
        return variances.get(Rubric(**r).key)

    active = entry["active"] + added_dicts
    retired = [r for r in active if measured(r) is not None and measured(r) <= 0]
    keep = [r for r in active if not (measured(r) is not None and measured(r) <= 0)]
    if len(keep) > max_active:
        keep.sort(key=lambda r: -(measured(r) or 0.0))
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


def append_records(run_dir: str, run_name: str, records: list[dict]) -> str:
    path = os.path.join(run_dir, f"adaptive_rubrics_{run_name}.jsonl")
    with open(path, "a") as f:
        f.writelines(json.dumps(r) + "\n" for r in records)
    return path


def judge_failed_entirely(metrics: dict[str, float]) -> bool:
    return metrics.get("rubric/judge_calls", 0.0) > 0 and metrics["rubric/judge_failures"] >= metrics["rubric/judge_calls"]


__all__ = ["Rubric", "JudgeResult", "parse_rubric_ground_truth", "weighted_score", "group_scores"]


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
