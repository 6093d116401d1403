"""Evaluation during training: greedy answers to held-out prompts, scored by the training verifiers.

- Set: `dataset_mixer_eval_list` / `_splits` (same form as the training mixer); when it is empty and the run
  trains on the builtin arithmetic data, its `test` split (disjoint from `train`). At most
  `eval_max_samples` prompts (default 256 on a GPU, 64 on a CPU or Mac; `shuffle_eval_dataset` shuffles with the
  run's seed before taking them).
- When: once before the first step (step 0) and `num_evals` times evenly spaced over the run, the last one
  after the final step (`eval_schedule`); `--num_evals 0` turns it off. Without `--num_evals`: 10, at most one per
  10 training steps, so a short try-out does not spend its time evaluating. The plan (prompts, steps) is logged at
  start-up, and after the first evaluation how long the rest will take.
- How: greedy decoding (no sampling), `response_length` tokens, the same stop strings, in batches; with
  `--eval_num_samples k` k sampled answers per prompt (`generate_answers`) and `eval/pass@j`, `eval/mean@k` (`pass_metrics`).
- What: `eval/accuracy` (verifier score 1), `eval/<verifier>/accuracy` per verifier name, `eval/reward_mean`
  (the training reward, format and penalties included), response length and truncation; every completion
  to <run>/evals/step_<N>.jsonl.
- Rubric rows are judged by the run's judge on their own items (`eval/<rubric>/score_mean` too); a row the judge
  could not score (a call still failing after a retry) is counted in `eval/unscored` and left out of the means.
"""

import json
import logging
import math
import os
import random
from collections import defaultdict
from contextlib import contextmanager

import torch

from .config import STEPS_PER_DEFAULT_EVAL, Config, derive, eval_max_samples
from .data import Prompt, PromptBatch, build_prompts, read_few_shot, row_settings
from .rewards import compute_scores
from .rollout import HFEngine
from .rubrics import RUBRIC_VERIFIERS, rubric_inputs
from .verifiers import final_answer
from .tools import rollouts_with_tools

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
    mixer, _ = eval_mixer(cfg)
    if not mixer:
        return []
    derived = derive(cfg)
    if derived.num_evals <= 0:
        if cfg.tracking.num_evals is None:
            log.info("evaluation: off for a %d-step run (by default at most one evaluation per %d steps); --num_evals N evaluates anyway",
                     derived.num_training_steps, STEPS_PER_DEFAULT_EVAL)
        return []
    prompts = held_out_prompts(cfg, tokenizer, system_prompt, template_kwargs, device_type)
    steps = sorted(eval_schedule(derived.num_training_steps, derived.num_evals))
    log.info("evaluation: %d held-out prompts, %s, up to %d tokens each, at steps %s (%d evaluations; --num_evals 0 turns it off, "
             "--eval_max_samples sets the size)", len(prompts), describe_sampling(cfg), cfg.rollout.response_length,
             ", ".join(map(str, steps)), len(steps))
    return prompts


def held_out_prompts(cfg: Config, tokenizer, system_prompt: str | None, template_kwargs: dict, device_type: str) -> list[Prompt]:
    """The evaluation set (eval_mixer), shuffled with the run's seed when asked, cut to eval_max_samples."""
    mixer, splits = eval_mixer(cfg)
    prompts = build_prompts(mixer, splits, tokenizer, cfg.data.max_prompt_token_length, system_prompt=system_prompt,
                            add_bos=cfg.model.add_bos, flag="dataset_mixer_eval_list", template_kwargs=template_kwargs,
                            settings=row_settings(cfg), few_shot=read_few_shot(cfg.data.few_shot_file))
    if cfg.data.shuffle_eval_dataset:
        random.Random(cfg.experiment.seed).shuffle(prompts)
    return prompts[: eval_max_samples(cfg, device_type)]


def eval_batch_size(cfg: Config) -> int:
    """Answers per generate call in an evaluation: --inference_batch_size, at least the rollout batch."""
    return max(cfg.optim.inference_batch_size, cfg.rollout.num_unique_prompts_rollout * cfg.rollout.num_samples_per_prompt_rollout)


def describe_sampling(cfg: Config) -> str:
    k = cfg.tracking.eval_num_samples
    return "greedy" if k == 1 else f"{k} answers each at temperature {cfg.tracking.eval_temperature or cfg.rollout.temperature:g}"


def pass_at_k(n: int, c: int, k: int) -> float:
    """The unbiased pass@k of n samples with c successes: 1 - C(n-c, k) / C(n, k) (Chen et al. 2021)."""
    return 1.0 if n - c < k else 1.0 - math.comb(n - c, k) / math.comb(n, k)


def pass_ks(n: int) -> list[int]:
    """1, 2, 4, ... up to n, and n itself."""
    ks = [2**i for i in range(n.bit_length()) if 2**i <= n]
    return ks + ([n] if ks[-1] != n else [])


def generate_answers(policy, tokenizer, prompts: list[Prompt], cfg: Config, device, batch_size: int, static_width: int | None,
                     step: int, tools=None) -> tuple[list[str], list[str], list[list[int]], list[str], list | None]:
    """k = --eval_num_samples answers per prompt (prompt-major), batch_size answers per generate call: greedy for k = 1
    (no RNG touched), else sampled at --eval_temperature (or the training temperature) from an RNG of its own (seed +
    step), so an evaluation never moves the training's. With `tools` (the run's ToolUse) the answers are multi-turn and the
    tools are there as in training. Returns (what is scored: the text after the last tool output, finish reasons, response
    token ids, the whole responses, each response's turns or None)."""
    k = cfg.tracking.eval_num_samples
    temperature = cfg.tracking.eval_temperature or cfg.rollout.temperature
    per_call = max(1, batch_size // k)  # prompts per generate call
    texts, reasons, ids, whole, turns = [], [], [], [], []
    with own_rng(device, cfg.experiment.seed * 1_000_003 + step, enabled=k > 1):
        for start in range(0, len(prompts), per_call):
            chunk = prompts[start : start + per_call]
            n = len(chunk) * k
            if static_width is not None and start > 0:
                chunk = chunk + [chunk[0]] * (per_call - len(chunk))
            engine = HFEngine(policy, tokenizer, response_length=cfg.rollout.response_length, shared_prefix=cfg.model.shared_prefix,
                              temperature=1.0 if k == 1 else temperature, top_p=1.0 if k == 1 else cfg.rollout.top_p, device=device,
                              greedy=k == 1, static_width=static_width)
            batch = PromptBatch(chunk, list(range(len(chunk))))
            if tools is None:
                r = engine.first(batch, k, cfg.rollout.stop_strings)
            else:
                r = rollouts_with_tools(engine, tools, batch, num_samples=k, response_length=cfg.rollout.response_length,
                                        stop_strings=cfg.rollout.stop_strings)
                turns += r.turns[:n]
            texts += r.scored_texts[:n]
            whole += r.response_texts[:n]
            reasons += r.finish_reasons[:n]
            ids += r.response_token_ids()[:n]
    return texts, reasons, ids, whole, turns if tools is not None else None


@contextmanager
def own_rng(device, seed: int, enabled: bool):
    """Sample from torch's RNG seeded with `seed`, and leave the run's RNG (CPU and the device's) as it was."""
    if not enabled:
        yield
        return
    on_device = device.type in ("cuda", "mps")
    with torch.random.fork_rng(devices=[device.index or 0] if on_device else [], device_type=device.type if on_device else "cuda"):
        torch.manual_seed(seed)
        yield


@torch.no_grad()
def evaluate(policy, tokenizer, prompts: list[Prompt], cfg: Config, device, batch_size: int,
             static_width: int | None = None, rubrics=None, reward_funcs=None, step: int = 0, tools=None) -> tuple[dict[str, float], list[dict]]:
    """k answers to every prompt (generate_answers); returns (eval/ metrics, one record per answer). With a static cache the
    last chunk is filled up to batch_size with repeats of its first prompt (answers dropped): one batch shape,
    one compile. Rubric rows are scored by `rubrics` (the run's RubricScorer: its judge, on each row's own items;
    rubric_scorer.RubricScorer.score_each); an answer it could not score is left out of every mean and counted in
    eval/unscored, never averaged in as 0. Success: verifier score 1 on a row with a verifier, else a reward of at
    least --eval_success_threshold (reward functions)."""
    k = cfg.tracking.eval_num_samples
    texts, reasons, ids, whole, turns = generate_answers(policy, tokenizer, prompts, cfg, device, batch_size, static_width, step, tools)
    lengths = [len(x) for x in ids]
    samples = [p for p in prompts for _ in range(k)]
    thinking = [p.thinking_open for p in samples]
    rubric_scores, rubric_metrics = None, {}
    if rubrics is not None and any(set(p.verifiers) & set(RUBRIC_VERIFIERS) for p in prompts):
        parsed = [rubric_inputs(p) for p in samples]
        answers = [final_answer(t, o) for t, o in zip(texts, thinking)]
        rubric_scores, calls = rubrics.score_each([q for q, _ in parsed], [items for _, items in parsed], answers)
        rubric_metrics = {"eval/judge_calls": calls["calls"], "eval/judge_failures": calls["failures"]}
    scores = compute_scores(texts, reasons, [p.verifiers for p in samples], [p.ground_truth for p in samples], cfg.reward,
                            rubric_scores, thinking, lengths, cfg.rollout.response_length)
    scores.rubric_scores = rubric_scores
    if reward_funcs is not None:
        group_index = [i // k for i in range(len(samples))]
        scores = reward_funcs.score(reward_funcs.inputs(step, samples, texts, ids, reasons, group_index, scores), scores)
    scored = [True] * len(samples) if scores.valid is None else scores.valid.tolist()
    rewards = scores.rewards.tolist()
    values = scores.verifier_scores.tolist() if scores.verifier_scores is not None else [None] * len(samples)
    threshold = cfg.tracking.eval_success_threshold
    correct = [float(values[i] >= 1.0 if p.verifiers and values[i] is not None else rewards[i] >= threshold) for i, p in enumerate(samples)]
    kept = [i for i in range(len(samples)) if scored[i]]
    metrics = {
        **({"eval/accuracy": _mean([correct[i] for i in kept]), "eval/reward_mean": _mean([rewards[i] for i in kept])} if kept else {}),
        "eval/response_length_mean": sum(lengths) / len(lengths),
        "eval/truncated_fraction": sum(r == "length" for r in reasons) / len(reasons),
        "eval/prompts": float(len(prompts)),
        **rubric_metrics,
        **{f"eval/{name[len('reward/'):]}": v for name, v in (scores.metrics or {}).items() if name.endswith("/mean") and name.startswith("reward/")},
    }
    if k > 1:
        metrics["eval/samples_per_prompt"] = float(k)
        metrics.update(pass_metrics(correct, scored, k))
    if turns is not None:
        calls = [sum(t["call"] is not None and t["output"] is not None for t in ts) for ts in turns]
        metrics["eval/tools/calls_per_response"] = sum(calls) / len(calls)
        metrics["eval/tools/used_fraction"] = sum(c > 0 for c in calls) / len(calls)
    if len(kept) < len(samples):
        metrics["eval/unscored"] = float(len(samples) - len(kept))
    by_verifier = defaultdict(list)
    for i, p in enumerate(samples):
        by_verifier["+".join(p.verifiers)].append(i)
    if len(by_verifier) > 1 or (cfg.reward.apply_verifiable_reward and "" not in by_verifier):
        for name, rows in sorted(by_verifier.items()):
            rows = [i for i in rows if scored[i]]
            if not rows or not name:  # nothing scored: no number at all, never an accuracy of 0 (eval/unscored says how many)
                continue
            metrics[f"eval/{name}/accuracy"] = _mean([correct[i] for i in rows])
            if set(name.split("+")) & set(RUBRIC_VERIFIERS):  # a rubric score is rarely a perfect 1: its mean says more
                metrics[f"eval/{name}/score_mean"] = _mean([values[i] for i in rows])
    records = [
        {"prompt": _question(p), **({"sample": i % k} if k > 1 else {}), "response": whole[i], "ground_truth": p.ground_truth,
         "verifiers": p.verifiers, "reward": rewards[i], "verifier_score": values[i], "success": bool(correct[i]), "scored": scored[i],
         "finish_reason": reasons[i], "length": lengths[i], "source": f"{p.source} row {p.row}",
         **({} if turns is None else {"answer": t, "turns": turns[i]})}
        for i, (p, t) in enumerate(zip(samples, texts))
    ]
    return metrics, records


def pass_metrics(correct: list[float], scored: list[bool], k: int) -> dict[str, float]:
    """eval/pass@j for j in pass_ks(k) (over the prompts with at least j scored answers) and eval/mean@k (mean success)."""
    out, per_prompt = {}, []
    for start in range(0, len(correct), k):
        rows = [i for i in range(start, start + k) if scored[i]]
        per_prompt.append((len(rows), int(sum(correct[i] for i in rows))))
    for j in pass_ks(k):
        values = [pass_at_k(n, c, j) for n, c in per_prompt if n >= j]
        if values:
            out[f"eval/pass@{j}"] = _mean(values)
    answered = [correct[i] for i in range(len(correct)) if scored[i]]
    if answered:
        out[f"eval/mean@{k}"] = _mean(answered)
    return out


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
