"""Evaluation during training: greedy answers to held-out prompts, scored by the training verifiers.

- Set: `dataset_mixer_eval_list` / `_splits` (same form as the training mixer); when it is empty and the run
  trains on the builtin arithmetic data, its `test` split (disjoint from `train`). At most
  `eval_max_samples` prompts (default 256 on a GPU, 64 on a CPU or Mac; `shuffle_eval_dataset` shuffles with the
  run's seed before taking them).
- When: once before the first step (step 0) and `num_evals` times evenly spaced over the run, the last one
  after the final step (`eval_schedule`); `--num_evals 0` turns it off. Without `--num_evals`: 10, at most one per
  10 training steps, so a short try-out does not spend its time evaluating. The plan (prompts, steps) is logged at
  start-up, and after the first evaluation how long the rest will take.
- How: greedy decoding (no sampling), `response_length` tokens, the same stop strings, in batches.
- What: `eval/accuracy` (verifier score 1), `eval/<verifier>/accuracy` per verifier name, `eval/reward_mean`
  (the training reward, format and penalties included), response length and truncation; every completion
  to <run>/evals/step_<N>.jsonl.
- Rubric rows are judged by the run's judge on their own items (`eval/<rubric>/score_mean` too); a row the judge
  could not score (a call still failing after a retry) is counted in `eval/unscored` and left out of the means.
"""

import json
import logging
import os
import random
from collections import defaultdict

import torch

from .config import STEPS_PER_DEFAULT_EVAL, Config, derive, eval_max_samples
from .data import Prompt, PromptBatch, build_prompts
from .rewards import compute_scores
from .rollout import generate_rollouts
from .rubrics import RUBRIC_VERIFIERS, rubric_inputs
from .verifiers import final_answer

log = logging.getLogger(__name__)


def eval_schedule(num_training_steps: int, num_evals: int) -> set[int]:
    """{0} and num_evals steps evenly spaced up to the last step (fewer when steps are fewer)."""
    if num_evals <= 0:
        return set()
    return {0} | {round(k * num_training_steps / num_evals) for k in range(1, num_evals + 1)}


def eval_mixer(cfg: Config) -> tuple[list[str], list[str]]:
    """The evaluation sources: the flag's, or builtin:arithmetic's test split when training on it."""
    data = cfg.data
    if data.dataset_mixer_eval_list:
        return data.dataset_mixer_eval_list, data.dataset_mixer_eval_list_splits
    sources = set(data.dataset_mixer_list[0::2])
    if sources == {"builtin:arithmetic"}:
        return ["builtin:arithmetic", "1.0"], ["test"]
    return [], []


def load_eval_prompts(cfg: Config, tokenizer, system_prompt: str | None, template_kwargs: dict, device_type: str = "cpu") -> list[Prompt]:
    """The held-out prompts (at most eval_max_samples: the flag, or its default for this device), or [] when
    there is no eval set or no evaluation is due (num_evals resolved to 0: logged, with how to turn it on)."""
    mixer, splits = eval_mixer(cfg)
    if not mixer:
        return []
    derived = derive(cfg)
    if derived.num_evals <= 0:
        if cfg.tracking.num_evals is None:
            log.info("evaluation: off for a %d-step run (by default at most one evaluation per %d steps); --num_evals N evaluates anyway",
                     derived.num_training_steps, STEPS_PER_DEFAULT_EVAL)
        return []
    prompts = build_prompts(mixer, splits, tokenizer, cfg.data.max_prompt_token_length, system_prompt=system_prompt,
                            add_bos=cfg.model.add_bos, flag="dataset_mixer_eval_list", template_kwargs=template_kwargs)
    if cfg.data.shuffle_eval_dataset:
        random.Random(cfg.experiment.seed).shuffle(prompts)
    prompts = prompts[: eval_max_samples(cfg, device_type)]
    steps = sorted(eval_schedule(derived.num_training_steps, derived.num_evals))
    log.info("evaluation: %d held-out prompts, greedy, up to %d tokens each, at steps %s (%d evaluations; --num_evals 0 turns it off, "
             "--eval_max_samples sets the size)", len(prompts), cfg.rollout.response_length, ", ".join(map(str, steps)), len(steps))
    return prompts


@torch.no_grad()
def evaluate(policy, tokenizer, prompts: list[Prompt], cfg: Config, device, batch_size: int,
             static_width: int | None = None, rubrics=None) -> tuple[dict[str, float], list[dict]]:
    """Greedy answers to every prompt; returns (eval/ metrics, one record per prompt). With a static cache the
    last chunk is filled up to batch_size with repeats of its first prompt (answers dropped): one batch shape,
    one compile. Rubric rows are scored by `rubrics` (the run's RubricScorer: its judge, on each row's own items;
    rubric_scorer.RubricScorer.score_each); a row it could not score is left out of every mean and counted in
    eval/unscored, never averaged in as 0."""
    texts, reasons, lengths = [], [], []
    for start in range(0, len(prompts), batch_size):
        chunk = prompts[start : start + batch_size]
        n = len(chunk)
        if static_width is not None and start > 0:
            chunk = chunk + [chunk[0]] * (batch_size - n)
        r = generate_rollouts(policy, tokenizer, PromptBatch(chunk, list(range(len(chunk)))), num_samples=1,
                              response_length=cfg.rollout.response_length, temperature=1.0, top_p=1.0,
                              stop_strings=cfg.rollout.stop_strings, device=device, greedy=True, static_width=static_width)
        texts += r.response_texts[:n]
        reasons += r.finish_reasons[:n]
        lengths += r.response_lengths[:n].tolist()
    thinking = [p.thinking_open for p in prompts]
    rubric_scores, rubric_metrics = None, {}
    if rubrics is not None and any(set(p.verifiers) & set(RUBRIC_VERIFIERS) for p in prompts):
        parsed = [rubric_inputs(p) for p in prompts]
        answers = [final_answer(t, o) for t, o in zip(texts, thinking)]
        rubric_scores, calls = rubrics.score_each([q for q, _ in parsed], [items for _, items in parsed], answers)
        rubric_metrics = {"eval/judge_calls": calls["calls"], "eval/judge_failures": calls["failures"]}
    scores = compute_scores(texts, reasons, [p.verifiers for p in prompts], [p.ground_truth for p in prompts], cfg.reward,
                            rubric_scores, thinking)
    scored = [True] * len(prompts) if scores.valid is None else scores.valid.tolist()
    correct = (scores.verifier_scores >= 1.0).float().tolist()
    rewards, values = scores.rewards.tolist(), scores.verifier_scores.tolist()
    kept = [i for i in range(len(prompts)) if scored[i]]
    metrics = {
        **({"eval/accuracy": _mean([correct[i] for i in kept]), "eval/reward_mean": _mean([rewards[i] for i in kept])} if kept else {}),
        "eval/response_length_mean": sum(lengths) / len(lengths),
        "eval/truncated_fraction": sum(r == "length" for r in reasons) / len(reasons),
        "eval/prompts": float(len(prompts)),
        **rubric_metrics,
    }
    if len(kept) < len(prompts):
        metrics["eval/unscored"] = float(len(prompts) - len(kept))
    by_verifier = defaultdict(list)
    for i, p in enumerate(prompts):
        by_verifier["+".join(p.verifiers)].append(i)
    if len(by_verifier) > 1 or cfg.reward.apply_verifiable_reward:
        for name, rows in sorted(by_verifier.items()):
            rows = [i for i in rows if scored[i]]
            if not rows:  # nothing scored: no number at all, never an accuracy of 0 (eval/unscored says how many)
                continue
            metrics[f"eval/{name}/accuracy"] = _mean([correct[i] for i in rows])
            if set(name.split("+")) & set(RUBRIC_VERIFIERS):  # a rubric score is rarely a perfect 1: its mean says more
                metrics[f"eval/{name}/score_mean"] = _mean([values[i] for i in rows])
    records = [
        {"prompt": _question(p), "response": t, "ground_truth": p.ground_truth, "verifiers": p.verifiers,
         "reward": rewards[i], "verifier_score": values[i], "scored": scored[i], "finish_reason": reasons[i],
         "length": lengths[i], "source": f"{p.source} row {p.row}"}
        for i, (p, t) in enumerate(zip(prompts, texts))
    ]
    return metrics, records


def _mean(values: list[float]) -> float:
    return sum(values) / len(values)


def _question(prompt: Prompt) -> str:
    return next((m["content"] for m in reversed(prompt.messages) if m["role"] == "user"), "")


def write_eval_records(run_dir: str, step: int, records: list[dict]) -> str:
    folder = os.path.join(run_dir, "evals")
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, f"step_{step}.jsonl")
    with open(path, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in records)
    return path
