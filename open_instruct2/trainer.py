"""The GRPO loop. `train_step` reads top to bottom: generate -> score -> advantages -> reference ->
update -> log. Setup is in run_setup.py; the update's loops are in update.py, the math in losses.py.

Choices a reader comparing trainers should know (the update's own are in update.py):
- The learning-rate schedule follows training steps: warm-up and decay are counted in steps of this loop,
  and every optimizer step of a training step uses that step's rate. Counting optimizer steps instead
  would let the schedule fall behind whenever a step makes fewer (all groups filtered, fewer rows than
  mini-batches). `train/lr` is the rate the step used.
- Sampling, the ratio, the KL and the reference all use the sampling temperature (policy.py).
- --dynamic_sampling draws whole further rounds of num_unique_prompts_rollout prompts (one generate call of the usual
  shape each, not one replacement prompt per empty group), and keeps the first groups with a signal in draw order: what
  a step trains on depends only on the sampler and the seed, so a resumed run samples what a straight one does.
"""

import logging
import os
import time
import warnings
from contextlib import contextmanager

import torch

from . import checkpoint
from .data import Prompt, PromptBatch, next_batch
from .dynamic_sampling import (kept_groups, merge_batches, merge_rollouts, merge_scores, select_batch, select_rollouts, select_scores,
                               signal_groups)
from .config import Config
from .errors import UserError
from .evaluation import eval_batch_size, evaluate, write_eval_records
from .losses import compute_advantages
from .memory_profile import MemoryProfiler
from .metrics import print_eval_table, sample_rows, step_metrics, update_note, warn_truncation
from .reference import Reference
from .reference_vllm import ReferenceFailure
from .rewards import Scores, compute_scores
from .rollout import HFEngine, Rollouts
from .rollout_vllm import RolloutFailure
from .rubric_scorer import score_batch
from .rubrics import RUBRIC_VERIFIERS, append_records, judge_failed_entirely
from .run_setup import Run, setup, start_memory_profiler
from .signals import StopRequest, Stopped
from .tools import rollouts_with_tools
from .tracking import dump_rollouts
from .update import LossRows, on_rows, select_rows, update_policy
from .verifiers import final_answer
from . import state

log = logging.getLogger(__name__)


class PhaseTimer:
    """Seconds per phase of a step; with a profiler, a memory marker `step_<N>_after_<phase>` at each end."""

    def __init__(self, step: int = 0, profiler: MemoryProfiler | None = None):
        self.seconds: dict[str, float] = {}
        self.step, self.profiler = step, profiler

    @contextmanager
    def __call__(self, phase: str):
        if self.profiler is not None:
            self.profiler.phase = f"step {self.step} {phase}"
        start = time.perf_counter()
        yield
        self.seconds[phase] = self.seconds.get(phase, 0.0) + time.perf_counter() - start
        if self.profiler is not None:
            self.profiler.mark(f"step_{self.step}_after_{phase}", f"step {self.step} after {phase}")


def train_step(run: Run, step: int) -> dict[str, float]:
    cfg, timer = run.cfg, PhaseTimer(step, run.marking(step))
    group = cfg.rollout.num_samples_per_prompt_rollout
    batch, rollouts, scores = sample_batch(run, step, timer)  # generate, then score (--dynamic_sampling: round by round)
    advantages = compute_advantages(scores.rewards, group, cfg.optim.advantage_normalization_type, scores.valid).to(run.runtime.device)
    selected = select_rows(scores.rewards, rollouts.finish_reasons, group, cfg, with_kl=run.reference is not None, valid=scores.valid)
    with timer("reference"):
        ref_logprobs = reference_logprobs(run.reference, rollouts, selected.computed)
    lr = run.scheduler.get_last_lr()[0]  # the rate this step's optimizer steps use
    with timer("update"):
        update = update_policy(run, rollouts, advantages, ref_logprobs, selected)
    advance_schedule(run.scheduler)
    metrics = step_metrics(scores, rollouts, selected, group, update, timer.seconds, lr, cfg.optim.filter_zero_std_groups,
                           with_kl=run.reference is not None)
    record_step(run, step, batch.prompts, rollouts, scores, advantages, selected, metrics)
    return metrics


def train(cfg: Config, stop: StopRequest | None = None) -> str:
    """Run GRPO to the end; returns the run folder. Step-end work (checkpoints and resumable states,
    evaluation, memory markers, a requested stop) happens here, around `train_step`."""
    stop = stop or StopRequest()
    profiler = start_memory_profiler(cfg)
    run = None
    try:
        run = setup(cfg, profiler)
        log.info("training: steps %d..%d of %d prompts x %d samples", run.start_step + 1, run.derived.num_training_steps,
                 cfg.rollout.num_unique_prompts_rollout, cfg.rollout.num_samples_per_prompt_rollout)
        if run.start_step == 0:
            evaluate_if_due(run, 0)
        stop.armed = True
        for step in range(run.start_step + 1, run.derived.num_training_steps + 1):
            if run.marking(step):
                run.profiler.mark(f"step_{step}_start", f"step {step} rollout")
            try:
                metrics = train_step(run, step)
            except ReferenceFailure as e:
                raise UserError(f"the reference failed at step {step} ({e}); {save_progress(run, step - 1)}") from None
            except RolloutFailure as e:
                raise UserError(f"the vLLM rollout server failed at step {step} ({e}); {save_progress(run, step - 1)}") from None
            count_streaks(run, metrics)
            save_due(run, step)  # after the streaks are counted (the state holds them), before the evaluation (which may fail)
            check_streaks(run, step)
            evaluate_if_due(run, step)
            if run.marking(step):
                run.profiler.mark(f"step_{step}_end", "between steps")
            if stop.requested and step < run.derived.num_training_steps:
                raise Stopped(stop.signum, stop_message(run, step, stop.signum))
        stop.armed = False
        checkpoint.save_final(run.policy, run.tokenizer, run.derived.run_dir, cfg.lora.train_mode == "lora", cfg.lora.save_merged_model)
        print_eval_table(run.evals)
    finally:
        stop.armed = False
        if run is not None:
            close_run(run)
        if profiler is not None:
            profiler.stop()
    plot_run(run.derived.run_dir)
    return run.derived.run_dir


def close_run(run: Run) -> None:
    """Tools, servers and the tracker are each closed even when another one's close fails (the first error is raised)."""
    closers = [c.close for c in (run.reference, run.rollout_server) if c is not None]
    closers += [run.tools.runner.close] if run.tools is not None else []
    failure = None
    for close in [run.tracker.close, *closers]:
        try:
            close()
        except Exception as e:  # noqa: BLE001 - the others still close
            failure = failure or e
    if failure is not None:
        raise failure


def save_due(run: Run, step: int, force_state: bool = False) -> str | None:
    """The checkpoint of this step, if one is due: a resumable state every checkpoint_state_freq steps,
    the model alone every save_freq steps. Returns the folder of a state saved now."""
    tr = run.cfg.tracking
    state_due = force_state or (tr.checkpoint_state_freq > 0 and step % tr.checkpoint_state_freq == 0)
    if not state_due and not (tr.save_freq > 0 and step % tr.save_freq == 0):
        return None
    folder = checkpoint.save_checkpoint(run.policy, run.tokenizer, run.derived.run_dir, step, tr.keep_last_n_checkpoints,
                                        state=state.capture(run, step) if state_due else None)
    return folder if state_due else None


def count_streaks(run: Run, metrics: dict[str, float]) -> None:
    """Steps in a row whose update was skipped for a non-finite loss or gradient, and where every judge call failed."""
    run.nonfinite_streak = run.nonfinite_streak + 1 if metrics.get("train/nonfinite_updates", 0.0) > 0 else 0
    run.judge_streak = run.judge_streak + 1 if judge_failed_entirely(metrics) else 0
    rounds = metrics.get("rollout/sampling_rounds", 1.0)  # --dynamic_sampling adds up the rounds' failures (dynamic_sampling.py)
    every = run.reward_funcs is not None and metrics.get("reward/functions_failed", 0.0) == len(run.reward_funcs.funcs) * rounds
    run.reward_streak = run.reward_streak + 1 if every else 0


def check_streaks(run: Run, step: int) -> None:
    """Stop (after saving) on max_nonfinite_updates steps in a row whose update was skipped for a non-finite
    loss or gradient, or llm_judge_max_failed_steps steps in a row where every judge call failed."""
    if run.nonfinite_streak >= run.cfg.optim.max_nonfinite_updates:
        problem = (f"{run.nonfinite_streak} steps in a row (up to step {step}) had a non-finite loss or gradient and made no update",
                   "check the rewards (rollouts with --save_rollouts true) and rerun to resume, raise --max_nonfinite_updates (it may change "
                   "on resume), or start a new --run_name with a lower --learning_rate")
    elif run.judge_streak >= run.cfg.rubric.llm_judge_max_failed_steps:
        problem = (f"every LLM-judge call failed for {run.judge_streak} steps in a row (up to step {step})",
                   "check the judge server and --llm_judge_base_url (the warnings above name the first error), then rerun the same command "
                   "to resume (the judge's connection flags may change; another --llm_judge_model needs a new --run_name)")
    elif run.reward_streak >= run.cfg.reward.reward_funcs_max_failed_steps:
        problem = (f"every reward function failed for {run.reward_streak} steps in a row (up to step {step}), so nothing was rewarded",
                   "fix the functions (the warnings above name the first error) and rerun the same command to resume")
    else:
        return
    saved = save_due(run, step, force_state=run.cfg.tracking.checkpoint_state_freq > 0) or checkpoint.newest_state(run.derived.run_dir)
    where = f"; the last state is {saved}" if saved else ""
    raise UserError(f"{problem[0]}{where}; {problem[1]}")


def stop_message(run: Run, step: int, signum: int) -> str:
    """On a signal between steps: save a resumable state if checkpointing is on, and say how to resume."""
    import signal as _signal

    name = _signal.Signals(signum).name
    if run.cfg.tracking.checkpoint_state_freq > 0:
        newest = checkpoint.newest_state(run.derived.run_dir)
        folder = newest if newest and newest.endswith(f"step_{step}") else save_due(run, step, force_state=True)
        return f"stopped by {name} after step {step}; resumable state in {folder}: rerun the same command to continue"
    return (f"stopped by {name} after step {step}; no resumable state was saved (--checkpoint_state_freq is off), "
            "so a rerun starts over: set --checkpoint_state_freq to be able to resume")


def evaluate_if_due(run: Run, step: int) -> None:
    if step not in run.eval_steps or not run.eval_prompts:
        return
    cfg = run.cfg
    if run.profiler is not None:
        run.profiler.phase = f"step {step} eval"
    start = time.perf_counter()
    metrics, records = evaluate(run.generation.model(), run.tokenizer, run.eval_prompts, cfg, run.runtime.device, eval_batch_size(cfg),
                                static_width=run.generation.static_width, rubrics=run.rubrics, reward_funcs=run.reward_funcs, step=step,
                                tools=run.tools)
    metrics["eval/seconds"] = time.perf_counter() - start
    run.tracker.log_eval(step, metrics)
    run.evals.append((step, metrics))
    write_eval_records(run.derived.run_dir, step, records)
    left = sum(1 for s in run.eval_steps if s > step)
    if len(run.evals) == 1 and left:
        log.info("evaluation: %d more, about %.0f s in all (%.0f s each); --num_evals 0 turns it off", left, left * metrics["eval/seconds"],
                 metrics["eval/seconds"])


def plot_run(run_dir: str) -> None:
    """The curves as a PNG at the end of a run (matplotlib is optional: without it, say how to get it)."""
    from .plot import PlotUnavailable, plot_metrics

    try:
        log.info("plot: %s", plot_metrics(run_dir))
    except PlotUnavailable as e:
        log.warning("plot: %s", e)


def record_step(run: Run, step: int, prompts: list[Prompt], rollouts: Rollouts, scores: Scores, advantages: torch.Tensor,
                selected: LossRows, metrics: dict[str, float]) -> None:
    """Everything a step leaves behind: metrics (with what happened to the update), samples, rollout dumps."""
    cfg = run.cfg
    run.tracker.log(step, metrics, note=update_note(metrics, selected))
    warn_truncation(metrics, step)
    if cfg.tracking.log_samples_freq > 0 and (step == 1 or step % cfg.tracking.log_samples_freq == 0):
        run.tracker.log_samples(step, sample_rows(rollouts, prompts, scores))
    if cfg.tracking.save_rollouts:
        dump_rollouts(run.derived.run_dir, step, prompts, rollouts, scores, advantages, selected, cfg.rollout.num_samples_per_prompt_rollout)


def save_progress(run: Run, last_step: int) -> str:
    """Before stopping on a server failure: keep the training done so far as a checkpoint, and say exactly
    what it holds, and where the newest resumable state is if there is one."""
    if last_step < 1:
        return "no step had finished, nothing to save; fix the server and rerun"
    newest = checkpoint.newest_state(run.derived.run_dir)
    if newest:
        return f"the newest resumable state is {newest}: fix the server and rerun the same command to continue from it"
    folder = os.path.join(run.derived.run_dir, "checkpoints", f"step_{last_step}")
    if not os.path.isdir(folder):
        folder = checkpoint.save_checkpoint(run.policy, run.tokenizer, run.derived.run_dir, last_step, -1)
    held = "the LoRA adapter and tokenizer" if run.cfg.lora.train_mode == "lora" else "the model weights and tokenizer"
    return (f"{folder} holds {held} after step {last_step}, but no optimizer state, learning-rate schedule or data position "
            "(--checkpoint_state_freq saves resumable states): fix the server, then start a new run from those weights")


# ---------------------------------------------------------------- phases


def sample_batch(run: Run, step: int, timer: PhaseTimer) -> tuple[PromptBatch, Rollouts, Scores]:
    """The step's prompts, responses and rewards: num_unique_prompts_rollout prompts from the sampler, generated and
    scored. --dynamic_sampling: further rounds of as many prompts (each drawn from the sampler, so its position and a
    resume stay exact) until that many groups have a reward signal or --max_sampling_rounds rounds are done; the step
    keeps the first groups with a signal in draw order (dynamic_sampling.py), and its stats say how many rounds it took."""
    ro = run.cfg.rollout
    rounds, signal = [], []
    while True:
        batch = next_batch(run.prompts, run.sampler, ro.num_unique_prompts_rollout)
        with timer("rollout"):
            rollouts = generate(run, batch)
        with timer("reward"):
            scores = score(run, step, rollouts, batch.prompts)
        run.episodes += len(rollouts.finish_reasons)
        if not ro.dynamic_sampling:
            return batch, rollouts, scores
        rounds.append((batch, rollouts, scores))
        signal += signal_groups(scores, ro.num_samples_per_prompt_rollout)
        if sum(signal) >= ro.num_unique_prompts_rollout or len(rounds) == ro.max_sampling_rounds:
            break
    return keep_signal(run, step, rounds, signal, timer.seconds.get("rollout", 0.0))


def keep_signal(run: Run, step: int, rounds: list[tuple[PromptBatch, Rollouts, Scores]], signal: list[bool],
                rollout_seconds: float) -> tuple[PromptBatch, Rollouts, Scores]:
    """--dynamic_sampling: the rounds merged, then only the kept groups (dynamic_sampling.kept_groups); a step short of
    groups with a signal says so. Its stats add rollout/sampling_rounds, rollout/groups_discarded and rollout/episodes,
    and rollout/tokens_per_second over every sampled token (the step's metrics would count the kept ones only)."""
    ro = run.cfg.rollout
    wanted, group = ro.num_unique_prompts_rollout, ro.num_samples_per_prompt_rollout
    kept = kept_groups(signal, wanted, wanted)
    if sum(signal) < wanted:
        trains_on = f"training on the {len(kept)} it has" if any(signal) else "training on round 1's groups as they are"
        log.warning("step %d: dynamic sampling found %d of %d groups with a reward signal in %d rounds (--max_sampling_rounds); %s",
                    step, sum(signal), wanted, len(rounds), trains_on)
    batch = merge_batches([b for b, _, _ in rounds])
    rollouts = merge_rollouts([r for _, r, _ in rounds], run.tokenizer.pad_token_id)
    scores = merge_scores([s for _, _, s in rounds])
    sampled_tokens = float(rollouts.response_lengths.sum())
    batch, rollouts, scores = select_batch(batch, rollouts, kept, group), select_rollouts(rollouts, kept, group), select_scores(scores, kept, group)
    rollouts.stats = {**(rollouts.stats or {}), "rollout/sampling_rounds": float(len(rounds)),
                      "rollout/groups_discarded": float(len(signal) - len(kept)), "rollout/episodes": float(run.episodes),
                      "rollout/tokens_per_second": sampled_tokens / max(rollout_seconds, 1e-9)}
    return batch, rollouts, scores


def generate(run: Run, batch: PromptBatch) -> Rollouts:
    """Sample the step's responses: HF generate in this process, or the vLLM rollout server (which first
    takes the policy's weights if an optimizer step changed them; its seed is drawn from the run's RNG); with tools,
    the multi-turn loop over either (tools/loop.py)."""
    ro = run.cfg.rollout
    if run.rollout_server is not None:
        engine = run.rollout_server.engine(seed=int(torch.randint(0, 2**31 - 1, (1,))))
    else:
        engine = HFEngine(run.generation.model(), run.tokenizer, response_length=ro.response_length, shared_prefix=run.cfg.model.shared_prefix,
                          temperature=ro.temperature, top_p=ro.top_p, device=run.runtime.device, static_width=run.generation.static_width)
    if run.tools is None:
        return engine.first(batch, ro.num_samples_per_prompt_rollout, ro.stop_strings)
    return rollouts_with_tools(engine, run.tools, batch, num_samples=ro.num_samples_per_prompt_rollout, response_length=ro.response_length,
                               stop_strings=ro.stop_strings)


def score(run: Run, step: int, rollouts: Rollouts, prompts: list[Prompt]) -> Scores:
    """Verifiers, and for rubric rows the LLM judge (all of the step's calls at once; rubrics.py); then the reward
    functions, when --reward_funcs lists any (reward_funcs/: their weighted sum is the reward)."""
    funcs = run.reward_funcs
    base = verify_batch(run, step, rollouts, prompts) if funcs is None or funcs.needs_base else None
    if funcs is None:
        return base
    samples = [prompts[i] for i in rollouts.prompt_index]
    inputs = funcs.inputs(step - 1, samples, rollouts.scored_texts, rollouts.response_token_ids(), rollouts.finish_reasons, rollouts.prompt_index, base)
    if rollouts.turns is not None:  # with tools: each response's turns (text, call, output)
        inputs["turns"] = rollouts.turns
    return funcs.score(inputs, base)


def verify_batch(run: Run, step: int, rollouts: Rollouts, prompts: list[Prompt]) -> Scores:
    """Today's reward: verifiers by name, the judge's rubric scores, the format reward and penalties (rewards.py)."""
    cfg = run.cfg
    samples = [prompts[i] for i in rollouts.prompt_index]
    rubric = None
    if run.rubrics is not None and any(set(p.verifiers) & set(RUBRIC_VERIFIERS) for p in prompts):
        run.rubric_buffer = run.rubric_buffer if run.rubric_buffer is not None else {}
        answers = [final_answer(t, p.thinking_open) for t, p in zip(rollouts.scored_texts, samples)]
        rubric = score_batch(run.rubrics, step, prompts, answers, cfg.rollout.num_samples_per_prompt_rollout, run.rubric_buffer)
        if cfg.rubric.save_adaptive_rubrics:
            append_records(run.derived.run_dir, run.derived.run_name, rubric.records)
    scores = compute_scores(rollouts.scored_texts, rollouts.finish_reasons, [p.verifiers for p in samples],
                            [p.ground_truth for p in samples], cfg.reward, None if rubric is None else rubric.scores,
                            [p.thinking_open for p in samples], rollouts.response_lengths.tolist(), cfg.rollout.response_length)
    scores.metrics = None if rubric is None else rubric.metrics
    scores.rubric_scores = None if rubric is None else rubric.scores
    return scores


def reference_logprobs(reference: Reference | None, rollouts: Rollouts, rows: list[int]) -> torch.Tensor | None:
    """(N, T) reference log-probs, filled for `rows` only."""
    if reference is None or not rows:
        return None
    return on_rows(rollouts, rows, reference.logprobs(rollouts, rows))


def advance_schedule(scheduler) -> None:
    """One scheduler step per training step, whether or not this one made an optimizer step (torch
    warns when the first step made none: the order is intended here)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"Detected call of `lr_scheduler.step\(\)` before `optimizer.step\(\)`")
        scheduler.step()
