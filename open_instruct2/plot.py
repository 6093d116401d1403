"""Curves of a run as one PNG, from its metrics.jsonl: reward, eval accuracy, KL, response length, seconds
per step, against the training step. Written at the end of every run (<run>/curves.png) and on demand:

    python -m open_instruct2.plot <run folder> [--out file.png]

matplotlib is optional (`make setup` installs it; `pip install 'open-instruct2[plot]'`).
"""

import argparse
import json
import os
import sys

PANELS = [
    ("reward", ["reward/mean", "eval/reward_mean"]),
    ("accuracy", ["reward/verifier_accuracy", "eval/accuracy"]),
    ("KL to the reference", ["train/kl"]),
    ("response length (tokens)", ["rollout/response_length_mean", "eval/response_length_mean"]),
    ("seconds per step", ["time/step", "time/rollout", "time/update"]),
]


class PlotUnavailable(Exception):
    """No plot can be made (matplotlib missing, no metrics)."""


def read_metrics(run_dir: str) -> dict[str, list[tuple[int, float]]]:
    """metric name -> [(step, value)] from <run>/metrics.jsonl (training and evaluation lines alike)."""
    path = os.path.join(run_dir, "metrics.jsonl")
    if not os.path.isfile(path):
        raise PlotUnavailable(f"{path} not found; give the folder of a run")
    series: dict[str, list[tuple[int, float]]] = {}
    with open(path) as f:
        for line in f:
            if not line.strip():
                continue
            record = json.loads(line)
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)):
                    series.setdefault(key, []).append((record["step"], float(value)))
    if not series:
        raise PlotUnavailable(f"{path} holds no metrics yet")
    return series


def plot_metrics(run_dir: str, out: str | None = None) -> str:
    """Write the PNG; returns its path."""
    series = read_metrics(run_dir)
    try:
        import logging

        import matplotlib

        logging.getLogger("matplotlib").setLevel(logging.WARNING)  # "generated new fontManager" is not news
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise PlotUnavailable("matplotlib is not installed, so no curves.png: pip install matplotlib") from None
    fig, axes = plt.subplots(len(PANELS), 1, figsize=(8, 2.4 * len(PANELS)), sharex=True)
    for ax, (title, keys) in zip(axes, PANELS):
        drawn = False
        for key in keys:
            if key in series:
                steps, values = zip(*series[key])
                ax.plot(steps, values, marker="o" if key.startswith("eval/") else None, markersize=3, label=key)
                drawn = True
        ax.set_title(title, fontsize=10)
        if drawn:
            ax.legend(fontsize=7, loc="best")
        else:
            ax.text(0.5, 0.5, "not logged in this run", ha="center", va="center", transform=ax.transAxes, fontsize=8, color="gray")
        ax.grid(alpha=0.3)
    axes[-1].set_xlabel("training step (0 = before training)")
    fig.suptitle(os.path.basename(os.path.normpath(run_dir)), fontsize=11)
    fig.tight_layout()
    out = out or os.path.join(run_dir, "curves.png")
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m open_instruct2.plot", description="Plot a run's metrics.jsonl as a PNG.")
    parser.add_argument("run_dir", help="the run folder (holds metrics.jsonl)")
    parser.add_argument("--out", help="the PNG to write (default <run>/curves.png)")
    args = parser.parse_args(argv)
    try:
        print(plot_metrics(args.run_dir, args.out))
    except PlotUnavailable as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
