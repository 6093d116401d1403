"""Metric sinks: TensorBoard (<run>/tensorboard), metrics.jsonl, wandb (optional), one console line per step,
and the rollout dumps (<run>/rollouts/step_<N>.jsonl).

Metric names are namespaced: reward/, rollout/, train/, time/, eval/. On a terminal the console shows a
progress bar with ETA; in a log file (no TTY) one plain line per step. A step that made no update says why
on its line. metrics.jsonl has one line per step ({"step": N, ...}) and one per evaluation ({"step": N,
"eval/...": ...}; step 0 is the evaluation before training).

wandb (`--with_tracking true`): the same scalars at the same steps, the sample completions as a table, and
the configuration with secrets masked; WANDB_MODE=offline works without an account. A resumed run continues the
same wandb run (its id is saved with each resumable state; resume="allow").
"""

import json
import os
import sys
import time

import torch
from torch.utils.tensorboard import SummaryWriter

CONSOLE_KEYS = [
    ("reward/mean", "reward", "{:.2f}"),
    ("reward/verifier_accuracy", "acc", "{:.2f}"),
    ("train/kl", "kl", "{:.4f}"),
    ("train/entropy", "entropy", "{:.2f}"),
    ("rollout/response_length_mean", "len", "{:.0f}"),
    ("time/step", "s/step", "{:.1f}"),
]
EVAL_KEYS = [("eval/accuracy", "accuracy", "{:.3f}"), ("eval/reward_mean", "reward", "{:.2f}"),
             ("eval/response_length_mean", "len", "{:.0f}"), ("eval/truncated_fraction", "truncated", "{:.2f}")]


def _mask(text: str, secrets: list[str]) -> str:
    for secret in secrets:
        text = text.replace(secret, "***")
    return text


def format_duration(seconds: float) -> str:
    seconds = int(round(seconds))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"


class Tracker:
    def __init__(self, run_dir: str, num_steps: int, config_text: str, wandb_settings: dict | None = None, first_step: int = 1):
        """wandb_settings: {"project", "entity", "name", "config", "secrets"} to also log to wandb (config already
        masked; the secrets are masked in the command line wandb records)."""
        self.run_dir, self.num_steps, self.first_step = run_dir, num_steps, first_step
        # A resumed run (first_step > 1): TensorBoard drops events logged from first_step on by the run that
        # crashed, so no step appears twice (metrics.jsonl is truncated the same way, state.py).
        self.writer = SummaryWriter(os.path.join(run_dir, "tensorboard"), purge_step=first_step if first_step > 1 else None)
        if first_step == 1:
            self.writer.add_text("config", config_text, 0)
        self.jsonl = open(os.path.join(run_dir, "metrics.jsonl"), "a")
        self.start = time.time()
        self.step_seconds = 0.0
        """Seconds spent in the training steps logged so far (time/step): the ETA's rate, without set-up and evaluations."""
        self.bar = None
        self.wandb = None
        self.wandb_id: str | None = None
        """The wandb run's id (saved with each resumable state: a resumed run continues the same wandb run)."""
        if wandb_settings is not None:
            import wandb

            # wandb records the command line: the secrets in it are masked while it looks
            argv, secrets = sys.argv, [v for v in wandb_settings.get("secrets", ()) if v]
            sys.argv = [_mask(a, secrets) for a in argv]
            try:
                self.wandb = wandb.init(project=wandb_settings["project"], entity=wandb_settings["entity"], name=wandb_settings["name"],
                                        config=wandb_settings["config"], dir=run_dir, reinit="finish_previous", id=wandb_settings.get("id"),
                                        resume="allow", settings=wandb.Settings(silent=True, console="off"))  # our console stays ours
            finally:
                sys.argv = argv
            self.wandb_id = self.wandb.id
        if sys.stdout.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=num_steps, initial=first_step - 1, desc="GRPO", unit="step", file=sys.stdout, dynamic_ncols=True)

    def _scalars(self, step: int, metrics: dict[str, float]) -> None:
        for name, value in metrics.items():
            self.writer.add_scalar(name, value, step)
        self.writer.flush()
        self.jsonl.write(json.dumps({"step": step, **metrics}) + "\n")
        self.jsonl.flush()
        if self.wandb is not None:
            self.wandb.log(metrics, step=step)

    def log(self, step: int, metrics: dict[str, float], note: str | None = None) -> None:
        self._scalars(step, metrics)
        shown = {label: fmt.format(metrics[key]) for key, label, fmt in CONSOLE_KEYS if key in metrics}
        if self.bar is not None:
            self.bar.set_postfix({**shown, **({"note": note} if note else {})}, refresh=False)
            self.bar.update(1)
            return
        elapsed = time.time() - self.start
        self.step_seconds += metrics.get("time/step", 0.0)
        done = step - self.first_step + 1
        eta = (self.step_seconds or elapsed) / done * (self.num_steps - step)  # evaluations to come are not in it: each says its own
        parts = " | ".join(f"{label} {value}" for label, value in shown.items())
        extra = f" | {note}" if note else ""
        print(f"step {step}/{self.num_steps} | {parts}{extra} | elapsed {format_duration(elapsed)} | eta {format_duration(eta)}", flush=True)

    def log_eval(self, step: int, metrics: dict[str, float]) -> None:
        self._scalars(step, metrics)
        parts = " | ".join(f"{label} {fmt.format(metrics[key])}" for key, label, fmt in EVAL_KEYS if key in metrics)
        line = f"eval at step {step} | {parts} | {int(metrics['eval/prompts'])} prompts in {metrics['eval/seconds']:.0f} s"
        if self.bar is not None:
            self.bar.write(line)
        else:
            print(line, flush=True)

    def log_samples(self, step: int, rows: list[tuple[str, str, float, str]]) -> None:
        """rows: (prompt, response, reward, finish reason) -> one markdown table in TensorBoard text (and a wandb table)."""
        def cell(text: str) -> str:
            return text.replace("|", "\\|").replace("\n", "<br>")

        lines = ["| prompt | response | reward | finish |", "|---|---|---|---|"]
        lines += [f"| {cell(p)} | {cell(r)} | {w:.2f} | {f} |" for p, r, w, f in rows]
        self.writer.add_text("samples", "\n".join(lines), step)
        self.writer.flush()
        if self.wandb is not None:
            import wandb

            table = wandb.Table(columns=["step", "prompt", "response", "reward", "finish_reason"], data=[[step, *row] for row in rows])
            self.wandb.log({"samples": table}, step=step)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        self.writer.close()
        self.jsonl.close()
        if self.wandb is not None:
            self.wandb.finish()


def dump_rollouts(run_dir: str, step: int, prompts, rollouts, scores, advantages: torch.Tensor, selected, group: int) -> str:
    """<run>/rollouts/step_<N>.jsonl: one line per sample, with what the update made of it."""
    from .losses import zero_std_groups

    folder = os.path.join(run_dir, "rollouts")
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, f"step_{step}.jsonl")
    in_loss, computed = set(selected.rows), set(selected.computed)
    zero_std = zero_std_groups(scores.rewards, group, scores.valid).tolist()
    lengths, advantages = rollouts.response_lengths.tolist(), advantages.tolist()
    with open(path, "w") as f:
        for i, text in enumerate(rollouts.response_texts):
            prompt = prompts[rollouts.prompt_index[i]]
            f.write(json.dumps({
                "sample": i,
                "prompt": next((m["content"] for m in reversed(prompt.messages) if m["role"] == "user"), ""),
                "ground_truth": prompt.ground_truth,
                "response": text,
                "reward": float(scores.rewards[i]),
                "reward_breakdown": {k: float(v[i]) for k, v in scores.breakdown.items()},
                "verifier_score": None if scores.verifier_scores is None else float(scores.verifier_scores[i]),
                **({} if scores.function_values is None else {"reward_functions": {k: v[i] for k, v in scores.function_values.items()}}),
                "advantage": advantages[i],
                "finish_reason": rollouts.finish_reasons[i],
                "length": lengths[i],
                **({} if rollouts.turns is None else {"turns": rollouts.turns[i], "tool_output_tokens": int(rollouts.tool_mask[i].sum()),
                                                       "trained_tokens": int(rollouts.response_mask[i].sum())}),
                "zero_std_group": zero_std[i],
                "in_loss": i in in_loss,
                "computed": i in computed,
            }) + "\n")
    return path
