"""A step's metrics and console notes, from what the step produced (no side effects but a warning log).

Names are namespaced (reward/, rollout/, train/, time/, rubric/); see README "Logging and outputs".
"""

import logging

from .data import Prompt
from .losses import zero_std_groups
from .rewards import Scores
from .rollout import Rollouts
from .update import LossRows

log = logging.getLogger(__name__)


def step_metrics(scores: Scores, rollouts: Rollouts, selected: LossRows, group: int, update: dict, seconds: dict, lr: float,
                 filtering: bool, with_kl: bool = False) -> dict[str, float]:
    """filtering: --filter_zero_std_groups; with a KL term (with_kl) no group is filtered (update.select_rows)."""
    n = len(rollouts.finish_reasons)
    lengths = rollouts.response_lengths.float()
    truncated = sum(r == "length" for r in rollouts.finish_reasons)
    rewarded = scores.rewards if scores.valid is None else scores.rewards[scores.valid]  # samples with a reward this step
    metrics = {
        "reward/mean": float(rewarded.mean()) if len(rewarded) else 0.0,
        "reward/std": float(rewarded.std(unbiased=False)) if len(rewarded) else 0.0,
        **({} if scores.verifier_scores is None else {  # None: only reward functions scored the batch
            "reward/verifier_accuracy": float((scores.verifier_scores >= 1.0).float().mean()),
            "reward/verifier_errors": float(scores.verifier_errors)}),
        **{f"reward/{k}": float(v.float().mean()) for k, v in scores.breakdown.items()},
        "rollout/response_length_mean": float(lengths.mean()),
        "rollout/response_length_max": float(lengths.max()),
        "rollout/truncated_fraction": truncated / n,
        "rollout/zero_std_group_fraction": float(zero_std_groups(scores.rewards, group, scores.valid).float().mean()),
        "rollout/loss_samples": float(len(selected.rows)),
        "rollout/computed_samples": float(len(selected.computed)),
        "rollout/tokens_per_second": float(lengths.sum()) / max(seconds.get("rollout", 0.0), 1e-9),
        **update,
        "train/lr": lr,
        **{f"time/{k}": v for k, v in seconds.items()},
        "time/step": sum(seconds.values()),
        **(scores.metrics or {}),
        **(rollouts.stats or {}),
    }
    if filtering:
        metrics["rollout/filtered_group_fraction"] = 0.0 if with_kl else metrics["rollout/zero_std_group_fraction"]
    if selected.computed and seconds.get("update"):
        trained = int(rollouts.attention_mask[selected.computed].sum())
        metrics["train/tokens_per_second"] = trained / seconds["update"]
    return metrics


def warn_truncation(metrics: dict[str, float], step: int) -> None:
    """Most responses hitting response_length means the reward mostly sees cut-off answers."""
    truncated = metrics["rollout/truncated_fraction"]
    if truncated > 0.5 and (step == 1 or step % 10 == 0):
        log.warning("step %d: %.0f%% of responses hit --response_length; raise it, add --stop_strings, or for thinking "
                    "models switch thinking off with --chat_template_kwargs '{\"enable_thinking\": false}'", step, 100 * truncated)


def sample_rows(rollouts: Rollouts, prompts: list[Prompt], scores: Scores, limit: int = 8) -> list[tuple[str, str, float, str]]:
    out = []
    for i in range(min(limit, len(rollouts.response_texts))):
        prompt = prompts[rollouts.prompt_index[i]]
        question = next(m["content"] for m in reversed(prompt.messages) if m["role"] == "user")
        out.append((question, rollouts.response_texts[i], float(scores.rewards[i]), rollouts.finish_reasons[i]))
    return out


def update_note(metrics: dict[str, float], selected: LossRows) -> str | None:
    """Why a step made no policy-gradient update, for the console line (None when it made one)."""
    if not selected.rows:
        why = []
        if selected.unscored:
            why.append(f"{selected.unscored} had no reward (the judge could not score them)")
        if selected.masked_truncated:
            why.append(f"{selected.masked_truncated} were truncated (--mask_truncated_completions is on)")
        return "no update: no response was left for the loss: " + " and ".join(why) if why else "no update: no response was left for the loss"
    if metrics.get("train/optimizer_steps", 0.0) == 0.0:
        if metrics.get("train/nonfinite_updates", 0.0) > 0:
            return (f"no update: the loss or gradient was not finite, so the {int(metrics['train/nonfinite_updates'])} optimizer step(s) "
                    "were skipped (weights and AdamW untouched; --max_nonfinite_updates such steps in a row stop the run)")
        return "no update: every group had equal rewards (no signal)"
    if metrics["rollout/zero_std_group_fraction"] == 1.0:
        if "train/kl" in metrics:
            return "KL term only: every group had equal rewards"
        return "no signal: every group had equal rewards (zero gradient; AdamW's momentum still moved the weights)"
    return None


def print_eval_table(evals: list) -> None:
    """The first and the last evaluation side by side (before and after training, on a full run)."""
    if len(evals) < 2:
        return
    (first_step, first), (last_step, last) = evals[0], evals[-1]
    names = [k for k in first if k in last and k not in ("eval/seconds", "eval/prompts", "eval/judge_calls", "eval/judge_failures",
                                                         "eval/samples_per_prompt")]
    rows = [f"| {k[len('eval/'):]} | {first[k]:.3f} | {last[k]:.3f} | {last[k] - first[k]:+.3f} |" for k in names]
    k = int(last.get("eval/samples_per_prompt", 1))
    how = "greedy" if k == 1 else f"{k} sampled answers each; accuracy = right answers / answers"
    print("\n".join([f"\nevaluation on {int(last['eval/prompts'])} held-out prompts ({how}):",
                     f"| metric | step {first_step} | step {last_step} | change |", "|---|---|---|---|", *rows]), flush=True)
