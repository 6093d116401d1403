"""One step of rubric scoring (rubrics.py has the items, the scores and the buffer; judge.py the calls;
judge_prompts.py what the judge is asked): every (response, item) call at once, failed calls asked once more, group
scores on the items every response answered, the buffer kept, metrics and records; evaluation's per-row scores."""

import logging
import math
from dataclasses import asdict, dataclass

from .judge import Judge, JudgeResult, latency_percentiles
from .judge_prompts import likert_request, proposal_request, score_request
from .rubrics import (GENERAL_RUBRIC, Rubric, group_scores, known_keys, new_entry, readd_static, rubric_inputs, scoring_items, update_entry,
                      variance, weighted_score)

log = logging.getLogger(__name__)

FAILURE_RATE_WARNING = 0.25
"""A step where more than this share of the judge calls failed (after the retry) says so in its warning."""


@dataclass
class RubricScores:
    scores: list[float | None]
    """Per sample: the rubric score, or None (not a rubric row, or no item answered)."""
    metrics: dict[str, float]
    records: list[dict]
    """One per prompt, for adaptive_rubrics_<run>.jsonl."""


class RubricScorer:
    """Scores a step's rubric rows; owns the judge(s), keeps the buffer in the dict it is given.

    A response with no final answer ("": cut off inside <think>, verifiers.final_answer) scores 0 on every item
    without a judge call. Every failed call is asked once more at the end of the step; what still fails is counted
    and left out as group_scores says."""

    def __init__(self, cfg, judge: Judge, proposer: Judge | None = None):
        self.cfg, self.judge, self.proposer = cfg, judge, proposer or judge

    def score(self, step: int, keys: list[str], queries: list[str], statics: list[list[Rubric]], responses: list[str],
              group: int, buffer: dict) -> RubricScores:
        """keys/queries/statics: one per prompt (None query: not a rubric row); responses: the N = prompts x group
        samples, those of one prompt contiguous (final answers, already extracted)."""
        rc = self.cfg
        prompts = [p for p, q in enumerate(queries) if q is not None]
        entries, readded = self._entries(step, prompts, keys, statics, buffer)
        proposals, proposal_results, proposals_retried = self._proposals(prompts, queries, responses, group, entries)
        items = {p: ([] if rc.use_likert_rubric else scoring_items(entries[p]) + proposals.get(p, [])) for p in prompts}
        judged, calls = self._judge_items(prompts, queries, responses, group, items)
        scores: list[float | None] = [None] * len(responses)
        added_total = retired_total = dropped_total = 0
        records = []
        for p in prompts:
            table = [[0.0 if responses[p * group + k] == "" else v for v in judged[p][k]] for k in range(group)]  # no answer: 0
            weights = [1.0] if rc.use_likert_rubric else [r.weight for r in items[p]]
            group_values, dropped = group_scores(table, weights, rc.normalize_rubric_scores and not rc.use_likert_rubric)
            scores[p * group : (p + 1) * group] = group_values
            dropped_total += dropped
            measured = any(v is not None for row in judged[p] for v in row)  # an outage measures nothing: the buffer waits
            added, retired = [], []
            if rc.use_rubric_buffer and measured:
                variances = {r.key: variance([judged[p][k][j] for k in range(group)]) for j, r in enumerate(items[p])}
                added, retired = update_entry(entries[p], proposals.get(p, []), variances, rc.max_active_rubrics)
            elif not rc.use_rubric_buffer:
                added = [asdict(r) for r in proposals.get(p, [])]
            added_total += len(added)
            retired_total += len(retired)
            records.append({
                "step": step, "prompt_id": keys[p], "query": queries[p], "added": added, "retired": retired,
                "active": entries[p]["persistent"] + entries[p]["active"] if rc.use_rubric_buffer else [asdict(r) for r in items[p]],
                "skipped": p not in proposals and rc.apply_adaptive_rubric_reward, "buffer_skipped": rc.use_rubric_buffer and not measured,
                "scores": {r.description: _mean_std([judged[p][k][j] for k in range(group)]) for j, r in enumerate(items[p])},
            })
        results = calls["results"] + proposal_results  # score calls and proposals alike
        failures, skipped = sum(r.value is None for r in results), sum(r.value is None for r in proposal_results)
        asked = len(results)
        metrics = {
            "rubric/judge_calls": float(asked),
            "rubric/judge_failures": float(failures),
            "rubric/judge_retries": float(calls["retried"] + proposals_retried),
            "rubric/judge_truncated_replies": float(sum(r.truncated for r in results)),
            "rubric/judge_failure_rate": failures / asked if asked else 0.0,
            "rubric/unscored_responses": float(sum(1 for p in prompts for k in range(group) if scores[p * group + k] is None)),
            "rubric/dropped_items": float(dropped_total),
            "rubric/no_final_answer": float(sum(1 for p in prompts for k in range(group) if responses[p * group + k] == "")),
            "rubric/added": float(added_total),
            "rubric/retired": float(retired_total),
            "rubric/readded_static": float(readded),
            "rubric/active": float(sum(len(items[p]) for p in prompts)),
            "rubric/skipped_prompts": float(skipped),
            **latency_percentiles(results),
        }
        answered = [s for s in scores if s is not None]
        if answered:
            metrics["rubric/reward_mean"] = sum(answered) / len(answered)
        warn_failures(results, metrics, calls["retried"] + proposals_retried)
        return RubricScores(scores, metrics, records)

    def _entries(self, step: int, prompts: list[int], keys: list[str], statics: list[list[Rubric]], buffer: dict) -> tuple[dict, int]:
        """Each rubric prompt's buffer entry (a throwaway one without the buffer), static items re-added when due."""
        rc = self.cfg
        entries, readded = {}, 0
        for p in prompts:
            static = GENERAL_RUBRIC if rc.use_general_rubric else statics[p]
            entry = buffer.setdefault(keys[p], new_entry(static, rc.use_static_rubrics_as_persistent_rubrics)) if rc.use_rubric_buffer \
                else new_entry(static, persistent=True)
            if rc.use_rubric_buffer and not rc.use_static_rubrics_as_persistent_rubrics and step % rc.add_static_rubrics_to_active_rubrics_every_n_steps == 0:
                readded += len(readd_static(entry))
            entries[p] = entry
        return entries, readded

    def _proposals(self, prompts: list[int], queries: list[str], responses: list[str], group: int, entries: dict) -> tuple[dict, list, int]:
        """Adaptive items proposed from this step's rollouts: ({prompt: new items}, the proposal calls' final results,
        how many were asked again); a prompt whose proposal failed has no entry."""
        rc = self.cfg
        proposals: dict[int, list[Rubric]] = {}
        if not (rc.apply_adaptive_rubric_reward and not rc.use_likert_rubric and prompts):
            return proposals, [], 0
        requests = [proposal_request(queries[p], responses[p * group : (p + 1) * group], scoring_items(entries[p]),
                                     self.judge.settings.max_context_length, rc.answer_length_limit_in_words) for p in prompts]
        results, retried = ask_with_retry(self.proposer, requests)
        for p, result in zip(prompts, results):
            if result.value is None:
                continue
            seen, new = known_keys(entries[p]), []
            for side, weight in (("positive", 1.0), ("negative", -1.0)):
                for item in result.value[side]:
                    rubric = Rubric(item["title"] or item["description"][:40], item["description"], weight)
                    if rubric.key and rubric.key not in seen and len(new) < 5:
                        seen.add(rubric.key)
                        new.append(rubric)
            proposals[p] = new
        return proposals, results, retried

    def _judge_items(self, prompts: list[int], queries: list[str], responses: list[str], group: int, items: dict) -> tuple[dict, dict]:
        """Every (response, item) call of the step, concurrently, the failed ones asked once more. Returns
        ({prompt: table[k][j] of scores in [0, 1] or None}, {"results": final results, "retried": count}). Responses
        with no final answer get no call (None in the table; the caller scores them 0)."""
        rc = self.cfg
        scale = 10.0 if rc.use_likert_rubric else 2.0
        context = self.judge.settings.max_context_length
        requests, where = [], []
        for p in prompts:
            for i in range(p * group, (p + 1) * group):
                if responses[i] == "":
                    continue
                if rc.use_likert_rubric:
                    requests.append(likert_request(queries[p], responses[i], context))
                    where.append((p, i, 0))
                for j, item in enumerate(items[p]):
                    requests.append(score_request(queries[p], responses[i], item, context))
                    where.append((p, i, j))
        results, retried = ask_with_retry(self.judge, requests)
        table = {p: [[None] * max(1, len(items[p])) for _ in range(group)] for p in prompts}
        for (p, i, j), result in zip(where, results):
            if result.value is not None:
                table[p][i - p * group][j] = result.value["score"] / scale
        return table, {"results": results, "retried": retried}

    def score_each(self, queries: list[str | None], statics: list[list[Rubric] | None], responses: list[str]) -> tuple[list[float | None], dict]:
        """Evaluation: each response on its row's own items (or the general rubric; likert with use_likert_rubric),
        no adaptive items, no buffer, no normalisation. A response is scored only when every one of its items was
        answered (after the retry); else None. Returns (scores, rubric/ metrics of the calls)."""
        rc = self.cfg
        rows = [i for i, q in enumerate(queries) if q is not None]
        items = {i: ([] if rc.use_likert_rubric else GENERAL_RUBRIC if rc.use_general_rubric else statics[i]) for i in rows}
        table, calls = self._judge_items(rows, queries, responses, 1, items)
        scores: list[float | None] = [None] * len(responses)
        for i in rows:
            values = [0.0 if responses[i] == "" else v for v in table[i][0]]
            weights = [1.0] if rc.use_likert_rubric else [r.weight for r in items[i]]
            scores[i] = None if None in values else weighted_score(values, weights)
        failures = sum(r.value is None for r in calls["results"])
        warn_failures(calls["results"], {"rubric/judge_calls": float(len(calls["results"])), "rubric/judge_failures": float(failures)},
                      calls["retried"])
        return scores, {"calls": float(len(calls["results"])), "failures": float(failures)}


def ask_with_retry(judge: Judge, requests: list) -> tuple[list[JudgeResult], int]:
    """judge.ask_all, then every failed request once more (a hiccup of one call or one unusable reply should not
    cost its item), unless the server answered none of them (an outage: another round of timeouts changes nothing; a
    reply that did not validate is an answer). Returns (results in order, how many were asked again)."""
    results = judge.ask_all(requests)
    failed = [k for k, r in enumerate(results) if r.value is None]
    if not (failed and any(r.answered for r in results)):
        return results, 0
    for k, again in zip(failed, judge.ask_all([requests[k] for k in failed])):
        if again.value is not None:
            results[k] = again
    return results, len(failed)


def warn_failures(results: list[JudgeResult], metrics: dict[str, float], retried: int) -> None:
    """One warning line for a step with failed judge calls: how many, the rate, the first error."""
    first_error = next((r.error for r in results if r.error), None)
    if not first_error:
        return
    calls, failures = metrics["rubric/judge_calls"], metrics["rubric/judge_failures"]
    rate = failures / calls if calls else 1.0
    high = (f"; over {FAILURE_RATE_WARNING:.0%} of the calls failed, so rubric rewards rest on fewer items and responses: "
            "check the judge server (--llm_judge_base_url, --llm_judge_timeout, --llm_judge_max_concurrency)") if rate > FAILURE_RATE_WARNING else ""
    again = f", {retried} of them asked again" if retried else ", none asked again (no call was answered)"
    log.warning("rubric: %d of %d judge calls failed (%.0f%%%s); first: %s%s", failures, calls, 100 * rate, again, first_error, high)


def _mean_std(values: list[float | None]) -> dict:
    column = [v for v in values if v is not None]
    if not column:
        return {"mean": None, "std": None, "answered": 0}
    mean = sum(column) / len(column)
    return {"mean": round(mean, 4), "std": round(math.sqrt(variance(column) or 0.0), 4), "answered": len(column)}


def score_batch(scorer: RubricScorer, step: int, prompts: list, responses: list[str], group: int, buffer: dict) -> RubricScores:
    """A rollout batch: prompts (one per group), responses (prompts x group, final answers)."""
    parsed = [rubric_inputs(p) for p in prompts]
    keys = [f"{p.source}#{p.row}" for p in prompts]
    return scorer.score(step, keys, [q for q, _ in parsed], [items for _, items in parsed], responses, group, buffer)
