"""Metric sinks: TensorBoard (<run>/tensorboard), metrics.jsonl, and one console line per step.

Metric names are namespaced: reward/, rollout/, train/, time/. On a terminal the console shows a progress
bar with ETA; in a log file (no TTY) one plain line per step.
"""

import json
import os
import sys
import time

from torch.utils.tensorboard import SummaryWriter

CONSOLE_KEYS = [
    ("reward/mean", "reward", "{:.2f}"),
    ("reward/verifier_accuracy", "acc", "{:.2f}"),
    ("train/kl", "kl", "{:.4f}"),
    ("rollout/response_length_mean", "len", "{:.0f}"),
    ("time/step", "s/step", "{:.1f}"),
]


def format_duration(seconds: float) -> str:
    seconds = int(round(seconds))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"


class Tracker:
    def __init__(self, run_dir: str, num_steps: int, config_text: str):
        self.run_dir, self.num_steps = run_dir, num_steps
        self.writer = SummaryWriter(os.path.join(run_dir, "tensorboard"))
        self.writer.add_text("config", config_text, 0)
        self.jsonl = open(os.path.join(run_dir, "metrics.jsonl"), "a")
        self.start = time.time()
        self.bar = None
        if sys.stdout.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=num_steps, desc="GRPO", unit="step", file=sys.stdout, dynamic_ncols=True)

    def log(self, step: int, metrics: dict[str, float]) -> None:
        for name, value in metrics.items():
            self.writer.add_scalar(name, value, step)
        self.writer.flush()
        self.jsonl.write(json.dumps({"step": step, **metrics}) + "\n")
        self.jsonl.flush()
        shown = {label: fmt.format(metrics[key]) for key, label, fmt in CONSOLE_KEYS if key in metrics}
        if self.bar is not None:
            self.bar.set_postfix(shown, refresh=False)
            self.bar.update(1)
            return
        elapsed = time.time() - self.start
        eta = elapsed / step * (self.num_steps - step)
        parts = " | ".join(f"{label} {value}" for label, value in shown.items())
        print(f"step {step}/{self.num_steps} | {parts} | elapsed {format_duration(elapsed)} | eta {format_duration(eta)}", flush=True)

    def log_samples(self, step: int, rows: list[tuple[str, str, float, str]]) -> None:
        """rows: (prompt, response, reward, finish reason) -> one markdown table in TensorBoard text."""
        def cell(text: str) -> str:
            return text.replace("|", "\\|").replace("\n", "<br>")

        lines = ["| prompt | response | reward | finish |", "|---|---|---|---|"]
        lines += [f"| {cell(p)} | {cell(r)} | {w:.2f} | {f} |" for p, r, w, f in rows]
        self.writer.add_text("samples", "\n".join(lines), step)
        self.writer.flush()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        self.writer.close()
        self.jsonl.close()
