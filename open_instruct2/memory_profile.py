"""Memory profiling: who is eating the RAM, the trainer or vLLM? (see README_memory_profiling.md)

A background thread samples, every `memory_profile_interval_s`: this process's RSS, the summed RSS of all its
descendants (a launched vLLM server and its engine workers), the top-N descendants by RSS with their command
lines (secrets masked), system used / available memory, the Python heap (tracemalloc, when on) and the
CUDA / MPS allocator where present. The trainer adds markers at the phase boundaries of a step
(`step_<N>_start`, `_after_rollout`, `_after_reward`, `_after_reference`, `_after_update`, `_end`), each
with a sample of its own, so every sample knows the phase it fell in.

Files in <run>/memory_profile/: memory_samples.csv and memory_samples.jsonl (one row per sample, written
as they come, so a crashed run keeps them), memory_summary.json and memory_summary.md (at the end: peaks of
the trainer, of the children and of the total, the phase of each peak, the children with the largest peaks).
Samples taken before the run folder exists (model loading) are kept in memory and written when it does.
"""

import csv
import json
import logging
import os
import re
import threading
import time
import tracemalloc

import psutil
import torch

log = logging.getLogger(__name__)

MB = 2**20
CSV_FIELDS = [
    "t_s", "marker", "phase", "trainer_rss_mb", "children_rss_mb", "total_rss_mb", "children", "system_used_mb",
    "system_available_mb", "python_heap_mb", "cuda_allocated_mb", "cuda_reserved_mb", "mps_allocated_mb", "top_children",
]
SECRET_FLAG = re.compile(r"(--?[\w-]*(?:key|token|secret|password)[\w-]*)([= ])(\S+)", re.IGNORECASE)
SECRET_VALUE = re.compile(r"\b(sk-[A-Za-z0-9_-]{8,}|hf_[A-Za-z0-9]{8,})")


def sanitize(command: str, secrets: tuple[str, ...] = ()) -> str:
    """A command line with the values of key/token/secret/password flags and known secrets masked."""
    for secret in secrets:
        if secret:
            command = command.replace(secret, "***")
    command = SECRET_FLAG.sub(lambda m: f"{m.group(1)}{m.group(2)}***", command)
    return SECRET_VALUE.sub("***", command)


class MemoryProfiler:
    def __init__(self, interval_s: float, top_n_children: int, tracemalloc_on: bool, secrets: tuple[str, ...] = ()):
        self.interval_s, self.top_n, self.tracemalloc_on, self.secrets = interval_s, top_n_children, tracemalloc_on, secrets
        self.process = psutil.Process()
        self.start_time = time.perf_counter()
        self.phase = "setup"
        self.samples: list[dict] = []
        self.names: dict[int, str] = {}  # pid -> sanitised command line, read once per child (after its exec)
        self.own_name = sanitize(" ".join(self.process.cmdline()), secrets)[:300]
        self.folder: str | None = None
        self.lock = threading.Lock()
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self._loop, name="memory-profiler", daemon=True)

    # ------------------------------------------------------------ lifecycle

    def start(self) -> "MemoryProfiler":
        if self.tracemalloc_on and not tracemalloc.is_tracing():
            tracemalloc.start()
        self.sample("profiler_start")
        self.thread.start()
        return self

    def attach(self, run_dir: str) -> None:
        """The run folder exists now: write what was sampled so far and keep appending."""
        folder = os.path.join(run_dir, "memory_profile")
        os.makedirs(folder, exist_ok=True)
        with self.lock:
            self.folder = folder
            if not os.path.exists(self._path("memory_samples.csv")):  # a resumed run appends
                with open(self._path("memory_samples.csv"), "w", newline="") as f:
                    csv.DictWriter(f, CSV_FIELDS).writeheader()
            for s in self.samples:
                self._append(s)
        log.info("memory profile: sampling every %g s into %s", self.interval_s, folder)

    def stop(self) -> dict | None:
        """Stop sampling; write and return the summary (None when the run folder never existed)."""
        if self.stopped.is_set():
            return None
        self.sample("profiler_stop")
        self.stopped.set()
        if self.thread.is_alive():
            self.thread.join(timeout=10)
        top_sites = self._top_allocation_sites()
        if self.tracemalloc_on and tracemalloc.is_tracing():
            tracemalloc.stop()
        if self.folder is None:
            return None
        summary = summarize(self.samples, top_sites)
        with open(self._path("memory_summary.json"), "w") as f:
            json.dump(summary, f, indent=2)
        with open(self._path("memory_summary.md"), "w") as f:
            f.write(summary_markdown(summary))
        log.info("memory profile: peak trainer %.0f MB, children %.0f MB, total %.0f MB; %s",
                 summary["peak_trainer"]["mb"], summary["peak_children"]["mb"], summary["peak_total"]["mb"],
                 self._path("memory_summary.md"))
        return summary

    # ------------------------------------------------------------ markers

    def mark(self, marker: str, next_phase: str) -> None:
        """A marker sample at a phase boundary; later samples belong to `next_phase`."""
        self.sample(marker)
        self.phase = next_phase

    # ------------------------------------------------------------ sampling

    def _loop(self) -> None:
        while not self.stopped.wait(self.interval_s):
            try:
                self.sample("")
            except Exception as e:  # noqa: BLE001 - the profiler must never kill the run
                log.warning("memory profile: a sample failed (%s: %s)", type(e).__name__, e)

    def sample(self, marker: str) -> dict:
        trainer = self.process.memory_info().rss
        children = []
        for child in self.process.children(recursive=True):
            try:
                rss = child.memory_info().rss
                # a child caught between fork and exec shows the trainer's command line: read it again until it is its own
                # (later names are not taken: vLLM renames its workers "VLLM::Worker", and a dying child has none)
                if child.pid not in self.names or self.names[child.pid] == self.own_name:
                    self.names[child.pid] = sanitize(" ".join(child.cmdline()), self.secrets)[:300]
                children.append((rss, child.pid))
            except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
                continue
        children.sort(reverse=True)
        system = psutil.virtual_memory()
        record = {
            "t_s": round(time.perf_counter() - self.start_time, 3),
            "marker": marker,
            "phase": self.phase,
            "trainer_rss_mb": round(trainer / MB, 1),
            "children_rss_mb": round(sum(r for r, _ in children) / MB, 1),
            "total_rss_mb": round((trainer + sum(r for r, _ in children)) / MB, 1),
            "children": len(children),
            "system_used_mb": round(system.used / MB, 1),
            "system_available_mb": round(system.available / MB, 1),
            "python_heap_mb": round(tracemalloc.get_traced_memory()[0] / MB, 1) if tracemalloc.is_tracing() else None,
            "cuda_allocated_mb": None,
            "cuda_reserved_mb": None,
            "mps_allocated_mb": None,
            "top_children": [{"pid": pid, "rss_mb": round(rss / MB, 1), "cmd": self.names.get(pid, "")} for rss, pid in children[: self.top_n]],
        }
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            record["cuda_allocated_mb"] = round(torch.cuda.memory_allocated() / MB, 1)
            record["cuda_reserved_mb"] = round(torch.cuda.memory_reserved() / MB, 1)
        elif getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            record["mps_allocated_mb"] = round(torch.mps.current_allocated_memory() / MB, 1)
        with self.lock:
            self.samples.append(record)
            if self.folder is not None:
                self._append(record)
        return record

    def _path(self, name: str) -> str:
        return os.path.join(self.folder, name)

    def _append(self, record: dict) -> None:
        with open(self._path("memory_samples.jsonl"), "a") as f:
            f.write(json.dumps(record) + "\n")
        row = dict(record, top_children=" | ".join(f"{c['pid']}:{c['rss_mb']:.0f}MB:{c['cmd'][:80]}" for c in record["top_children"]))
        with open(self._path("memory_samples.csv"), "a", newline="") as f:
            csv.DictWriter(f, CSV_FIELDS).writerow(row)

    def _top_allocation_sites(self, n: int = 10) -> list[dict]:
        if not (self.tracemalloc_on and tracemalloc.is_tracing()):
            return []
        stats = tracemalloc.take_snapshot().statistics("lineno")[:n]
        return [{"site": str(s.traceback), "mb": round(s.size / MB, 2), "blocks": s.count} for s in stats]


# ---------------------------------------------------------------- summary (pure)


def _peak(samples: list[dict], key: str) -> dict:
    best = max(samples, key=lambda s: s[key])
    return {"mb": best[key], "t_s": best["t_s"], "phase": best["phase"], "marker": best["marker"]}


def summarize(samples: list[dict], top_sites: list[dict] | None = None) -> dict:
    """Peaks (with the phase each fell in), per-phase maxima, and the children with the largest peaks."""
    children: dict[int, dict] = {}
    for s in samples:
        for c in s["top_children"]:
            seen = children.setdefault(c["pid"], {"pid": c["pid"], "cmd": c["cmd"], "peak_rss_mb": 0.0, "phase": s["phase"]})
            if seen["cmd"] != c["cmd"] and c["cmd"]:  # the name read after exec (sample() keeps it from then on)
                seen["cmd"] = c["cmd"]
            if c["rss_mb"] > seen["peak_rss_mb"]:
                seen.update(peak_rss_mb=c["rss_mb"], phase=s["phase"])
    phases: dict[str, dict] = {}
    for s in samples:
        kind = re.sub(r"^step \d+ ", "", s["phase"])  # "step 3 rollout" -> "rollout"
        p = phases.setdefault(kind, {"trainer_mb": 0.0, "children_mb": 0.0, "total_mb": 0.0, "samples": 0})
        p["trainer_mb"] = max(p["trainer_mb"], s["trainer_rss_mb"])
        p["children_mb"] = max(p["children_mb"], s["children_rss_mb"])
        p["total_mb"] = max(p["total_mb"], s["total_rss_mb"])
        p["samples"] += 1
    return {
        "samples": len(samples),
        "markers": sum(1 for s in samples if s["marker"]),
        "duration_s": samples[-1]["t_s"] if samples else 0.0,
        "peak_trainer": _peak(samples, "trainer_rss_mb"),
        "peak_children": _peak(samples, "children_rss_mb"),
        "peak_total": _peak(samples, "total_rss_mb"),
        "min_system_available_mb": min(s["system_available_mb"] for s in samples),
        "peak_python_heap_mb": max((s["python_heap_mb"] or 0.0) for s in samples),
        "peak_cuda_allocated_mb": max((s["cuda_allocated_mb"] or 0.0) for s in samples),
        "top_children": sorted(children.values(), key=lambda c: -c["peak_rss_mb"])[:10],
        "by_phase": phases,
        "top_python_allocation_sites": top_sites or [],
    }


def summary_markdown(summary: dict) -> str:
    def peak(name, p):
        return f"| {name} | {p['mb']:.0f} | {p['phase']} | {p['t_s']:.1f} |"

    lines = [
        "# Memory profile", "",
        f"{summary['samples']} samples ({summary['markers']} at markers) over {summary['duration_s']:.0f} s; "
        f"lowest system memory available: {summary['min_system_available_mb']:.0f} MB.", "",
        "| peak of | MB (RSS) | phase | at (s) |", "|---|---|---|---|",
        peak("trainer (this process)", summary["peak_trainer"]),
        peak("children (vLLM server and workers, ...)", summary["peak_children"]),
        peak("total", summary["peak_total"]), "",
        "## Children with the largest peaks", "", "| pid | peak MB | phase | command |", "|---|---|---|---|",
    ]
    lines += [f"| {c['pid']} | {c['peak_rss_mb']:.0f} | {c['phase']} | `{c['cmd'][:120]}` |" for c in summary["top_children"]] or ["| - | - | - | none |"]
    lines += ["", "## Largest RSS in each phase", "", "| phase | trainer MB | children MB | total MB | samples |", "|---|---|---|---|---|"]
    lines += [f"| {k} | {v['trainer_mb']:.0f} | {v['children_mb']:.0f} | {v['total_mb']:.0f} | {v['samples']} |" for k, v in summary["by_phase"].items()]
    if summary["peak_cuda_allocated_mb"]:
        lines += ["", f"Peak CUDA memory allocated by torch: {summary['peak_cuda_allocated_mb']:.0f} MB."]
    if summary["top_python_allocation_sites"]:
        lines += ["", "## Python allocation sites (tracemalloc, at the end)", "", "| MB | blocks | site |", "|---|---|---|"]
        lines += [f"| {s['mb']:.2f} | {s['blocks']} | `{s['site']}` |" for s in summary["top_python_allocation_sites"]]
    return "\n".join(lines) + "\n"
