"""DAPO's dynamic sampling (--dynamic_sampling): the pure parts. The trainer draws rounds of prompts, generates and
scores each (trainer.sample_batch); this module merges the rounds into one batch and keeps the groups with a signal.

A group is num_samples_per_prompt_rollout contiguous samples of one prompt; it has a reward signal when its valid
rewards are not all equal (losses.zero_std_groups, with Scores.valid). `kept_groups` keeps the first
num_unique_prompts_rollout groups with a signal in draw order (round 1's first, then round 2's, ...), so the batch
a step trains on depends only on what was drawn, never on timing; with no signal at all it keeps round 1's groups,
so the step still logs and makes its KL update as it would without dynamic sampling.

Merging (`merge_batches`, `merge_rollouts`, `merge_scores`) concatenates the rounds in draw order and re-pads the
tensors to the widest prompt (on the left) and the widest response (on the right); prompt_index is renumbered so
that it indexes the merged PromptBatch. Selecting (`select_batch`, `select_rollouts`, `select_scores`) takes whole
groups by index; the per-sample fields follow the kept groups, while the batch-level numbers (Scores.verifier_errors,
Scores.metrics, Rollouts.stats) are left as they were: they describe everything that was sampled and scored, every
judge call and reward-function call included, whether or not its group was kept.

How the batch-level metrics of several rounds are merged (`merge_metrics`, one dict per round; a round without a
key does not count for it):
- counts add up: names whose last part ends in one of COUNT_SUFFIXES (reward/verifier_errors, reward/<fn>/errors,
  reward/functions_failed, rubric/judge_calls, rubric/judge_failures, rubric/judge_retries,
  rubric/judge_truncated_replies, rubric/unscored_responses, rubric/dropped_items, rubric/no_final_answer,
  rubric/added, rubric/retired, rubric/readded_static, rubric/active, rubric/skipped_prompts), and so do seconds
  (time/..., e.g. the vLLM weight sync);
- running totals of the run (RUNNING_TOTALS: rollout/server_relaunches) take the last round's value;
- rates with a known numerator and denominator (RATES: rubric/judge_failure_rate) are recomputed from the summed counts;
- everything else (means, stds, fractions, latency percentiles) is averaged, weighted by the round's sample count.
  A std or a percentile averaged this way is an approximation of the pooled one (the exact value would need the
  samples), which is close enough for a dashboard and exact when there is one round.
"""

import torch
import torch.nn.functional as F

from .data import PromptBatch
from .losses import zero_std_groups
from .rewards import Scores
from .rollout import Rollouts

COUNT_SUFFIXES = ("errors", "timeouts", "failed", "failures", "calls", "retries", "replies", "responses", "items", "no_final_answer",
                  "added", "retired", "readded_static", "active", "skipped_prompts")
"""A metric whose last name part ends in one of these is a count over the batch: the rounds' values add up."""
RUNNING_TOTALS = ("rollout/server_relaunches",)
"""Counts since the start of the run: the last round's value is the step's."""
RATES = {"rubric/judge_failure_rate": ("rubric/judge_failures", "rubric/judge_calls")}
"""rate -> (numerator, denominator), both counts: recomputed from the summed counts (0 when nothing was counted)."""


def signal_groups(scores: Scores, group: int) -> list[bool]:
    """Per group of `group` contiguous samples: True when its valid rewards differ (it carries a learning signal)."""
    same = zero_std_groups(scores.rewards, group, scores.valid)  # (N,)
    return [not s for s in same[::group].tolist()]  # (N/G,)


def kept_groups(signal: list[bool], wanted: int, first_round: int) -> list[int]:
    """The groups a step trains on, in draw order: the first `wanted` with a signal; if none has one, the first
    `first_round` groups (round 1's batch, as without dynamic sampling)."""
    kept = [g for g, s in enumerate(signal) if s][:wanted]
    return kept or list(range(min(first_round, len(signal))))


# ---------------------------------------------------------------- merging rounds


def merge_metrics(dicts: list[dict | None], weights: list[int]) -> dict | None:
    """Several rounds' metrics as one (the rule is in the module docstring); weights: each round's sample count.
    None when every round's is None."""
    present = [(d, w) for d, w in zip(dicts, weights) if d is not None]
    if not present:
        return None
    merged = {}
    for name in dict.fromkeys(k for d, _ in present for k in d):  # first-seen order
        values = [(d[name], w) for d, w in present if name in d]
        if name in RUNNING_TOTALS:
            merged[name] = float(values[-1][0])
        elif name.startswith("time/") or name.rsplit("/", 1)[-1].endswith(COUNT_SUFFIXES):
            merged[name] = float(sum(v for v, _ in values))
        else:
            total = sum(w for _, w in values)
            merged[name] = float(sum(v * w for v, w in values) / total) if total else float(values[-1][0])
    for rate, (numerator, denominator) in RATES.items():
        if rate in merged and numerator in merged and denominator in merged:
            merged[rate] = merged[numerator] / merged[denominator] if merged[denominator] else 0.0
    return merged


def merge_batches(batches: list[PromptBatch]) -> PromptBatch:
    """The rounds' prompts one after the other (a prompt drawn twice appears twice)."""
    return PromptBatch([p for b in batches for p in b.prompts], [i for b in batches for i in b.indices])


def _prompt_count(rollouts: Rollouts) -> int:
    """How many prompts a part's prompt_index numbers; it must number them 0..k-1, as generate leaves it."""
    k = max(rollouts.prompt_index) + 1 if rollouts.prompt_index else 0
    if set(rollouts.prompt_index) != set(range(k)):
        raise ValueError(f"prompt_index {rollouts.prompt_index} does not number the prompts 0..{k - 1}")
    return k


def merge_rollouts(parts: list[Rollouts], pad_id: int) -> Rollouts:
    """The rounds' samples one after the other, re-padded: prompts on the left to the widest prompt P, responses on the
    right to the widest response T (input_ids with pad_id, the masks and sampler log-probs with 0). Each part's
    prompt_index numbers its own batch (0..k-1); in the result it indexes merge_batches of those batches."""
    if any((p.sampler_logprobs is None) != (parts[0].sampler_logprobs is None) for p in parts):
        raise ValueError("cannot merge rollouts with sampler log-probs and rollouts without them")
    width = max(p.prompt_width for p in parts)  # P
    span = max(p.input_ids.shape[1] - p.prompt_width for p in parts)  # T
    ids, attention, response, sampler, index, offset = [], [], [], [], [], 0
    for p in parts:
        left, right = width - p.prompt_width, span - (p.input_ids.shape[1] - p.prompt_width)
        ids.append(F.pad(p.input_ids, (left, right), value=pad_id))  # (n, P + T)
        attention.append(F.pad(p.attention_mask, (left, right), value=0))  # (n, P + T)
        response.append(F.pad(p.response_mask, (0, right), value=0))  # (n, T)
        if p.sampler_logprobs is not None:
            sampler.append(F.pad(p.sampler_logprobs, (0, right), value=0.0))  # (n, T)
        index += [i + offset for i in p.prompt_index]
        offset += _prompt_count(p)
    return Rollouts(
        input_ids=torch.cat(ids),  # (N, P + T)
        attention_mask=torch.cat(attention),  # (N, P + T)
        response_mask=torch.cat(response),  # (N, T)
        prompt_width=width,
        finish_reasons=[r for p in parts for r in p.finish_reasons],
        response_texts=[t for p in parts for t in p.response_texts],
        prompt_index=index,
        sampler_logprobs=torch.cat(sampler) if sampler else None,  # (N, T)
        stats=merge_metrics([p.stats for p in parts], [len(p.finish_reasons) for p in parts]),
        tool_mask=None if parts[0].tool_mask is None else torch.cat([F.pad(p.tool_mask, (0, span - p.tool_mask.shape[1]), value=0) for p in parts]),
        turns=None if parts[0].turns is None else [t for p in parts for t in p.turns],
        answer_texts=None if parts[0].answer_texts is None else [t for p in parts for t in p.answer_texts],
    )


def merge_scores(parts: list[Scores]) -> Scores:
    """The rounds' scores one after the other; verifier_errors add up and metrics merge by merge_metrics."""
    names = list(parts[0].breakdown)
    if any(list(p.breakdown) != names for p in parts):
        raise ValueError(f"cannot merge scores with different reward parts: {[list(p.breakdown) for p in parts]}")
    if any((p.verifier_scores is None) != (parts[0].verifier_scores is None) for p in parts):
        raise ValueError("cannot merge scores with verifier scores and scores without them")
    sizes = [len(p.rewards) for p in parts]
    valid = None
    if any(p.valid is not None for p in parts):
        valid = torch.cat([torch.ones(n, dtype=torch.bool) if p.valid is None else p.valid.bool() for p, n in zip(parts, sizes)])  # (N,)
        valid = None if bool(valid.all()) else valid  # None: all valid, as compute_scores leaves it
    rubric = None
    if any(p.rubric_scores is not None for p in parts):
        rubric = [s for p, n in zip(parts, sizes) for s in (p.rubric_scores if p.rubric_scores is not None else [None] * n)]
    functions = None
    if any(p.function_values is not None for p in parts):
        keys = dict.fromkeys(k for p in parts for k in (p.function_values or {}))
        functions = {k: [v for p, n in zip(parts, sizes) for v in ((p.function_values or {}).get(k) or [None] * n)] for k in keys}
    return Scores(
        rewards=torch.cat([p.rewards for p in parts]),  # (N,)
        breakdown={k: torch.cat([p.breakdown[k] for p in parts]) for k in names},  # name -> (N,)
        verifier_scores=None if parts[0].verifier_scores is None else torch.cat([p.verifier_scores for p in parts]),  # (N,)
        verifier_errors=sum(p.verifier_errors for p in parts),
        valid=valid,
        metrics=merge_metrics([p.metrics for p in parts], sizes),
        rubric_scores=rubric,
        function_values=functions,
    )


# ---------------------------------------------------------------- keeping groups


def _rows(groups: list[int], group: int) -> list[int]:
    return [g * group + k for g in groups for k in range(group)]


def _kept_prompts(rollouts: Rollouts, rows: list[int]) -> list[int]:
    """The prompt_index values of the kept rows, in order of first appearance (their new numbering is this order)."""
    return list(dict.fromkeys(rollouts.prompt_index[r] for r in rows))


def select_batch(batch: PromptBatch, rollouts: Rollouts, groups: list[int], group: int) -> PromptBatch:
    """The prompts of the kept groups, in the order select_rollouts numbers them."""
    old = _kept_prompts(rollouts, _rows(groups, group))
    return PromptBatch([batch.prompts[i] for i in old], [batch.indices[i] for i in old])


def select_rollouts(rollouts: Rollouts, groups: list[int], group: int) -> Rollouts:
    """The samples of the kept groups (widths unchanged), prompt_index renumbered to index select_batch's prompts;
    stats unchanged (they describe all that was sampled)."""
    rows = _rows(groups, group)
    new = {old: i for i, old in enumerate(_kept_prompts(rollouts, rows))}
    index = torch.as_tensor(rows, dtype=torch.long, device=rollouts.input_ids.device)
    return Rollouts(
        input_ids=rollouts.input_ids[index],  # (n, P + T)
        attention_mask=rollouts.attention_mask[index],  # (n, P + T)
        response_mask=rollouts.response_mask[index],  # (n, T)
        prompt_width=rollouts.prompt_width,
        finish_reasons=[rollouts.finish_reasons[r] for r in rows],
        response_texts=[rollouts.response_texts[r] for r in rows],
        prompt_index=[new[rollouts.prompt_index[r]] for r in rows],
        sampler_logprobs=None if rollouts.sampler_logprobs is None else rollouts.sampler_logprobs[index],  # (n, T)
        stats=rollouts.stats,
        tool_mask=None if rollouts.tool_mask is None else rollouts.tool_mask[index],  # (n, T)
        turns=None if rollouts.turns is None else [rollouts.turns[r] for r in rows],
        answer_texts=None if rollouts.answer_texts is None else [rollouts.answer_texts[r] for r in rows],
    )


def select_scores(scores: Scores, groups: list[int], group: int) -> Scores:
    """The scores of the kept groups; verifier_errors and metrics unchanged (they describe all that was scored)."""
    rows = _rows(groups, group)
    index = torch.as_tensor(rows, dtype=torch.long)
    valid = None if scores.valid is None else scores.valid[index]  # (n,)
    return Scores(
        rewards=scores.rewards[index],  # (n,)
        breakdown={k: v[index] for k, v in scores.breakdown.items()},  # name -> (n,)
        verifier_scores=None if scores.verifier_scores is None else scores.verifier_scores[index],  # (n,)
        verifier_errors=scores.verifier_errors,
        valid=None if valid is None or bool(valid.all()) else valid,
        metrics=scores.metrics,
        rubric_scores=None if scores.rubric_scores is None else [scores.rubric_scores[r] for r in rows],
        function_values=None if scores.function_values is None else {k: [v[r] for r in rows] for k, v in scores.function_values.items()},
    )
