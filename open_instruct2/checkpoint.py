"""Saving models: periodic checkpoints (rotated), resumable training states, the final model, the config.

A checkpoint folder is written whole under a hidden temporary name (`checkpoints/.step_<N>.tmp`), its
files and the folder fsync'ed, then renamed to `checkpoints/step_<N>` and the parent fsync'ed: a crash or a
full disk mid-save leaves at most a temporary folder (removed on the next start), never a half-written
`step_<N>` that looks complete. A folder with `training_state.json` in it is a resumable state (state.py);
without, it holds the model only (`--save_freq`). Pruning (`keep_last_n_checkpoints`) removes the oldest
complete folders and never the newest resumable state.
"""

import errno
import json
import logging
import os
import re
import shutil

import torch

from .errors import UserError

log = logging.getLogger(__name__)

CONFIG_FILE = "open_instruct2_config.json"
STATE_TENSORS = "training_state.pt"
STATE_META = "training_state.json"


def _fsync_tree(folder: str) -> None:
    for root, _, files in os.walk(folder):
        for name in files:
            with open(os.path.join(root, name), "rb") as f:
                os.fsync(f.fileno())
        _fsync_dir(root)


def _fsync_dir(folder: str) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save_pretrained_atomic(model, tokenizer, folder: str, state: tuple[dict, dict] | None = None) -> None:
    """model.save_pretrained + tokenizer (+ a training state: tensors, json) into `folder`, atomically;
    an existing `folder` (the same step saved before) is replaced only once the new one is complete."""
    parent, name = os.path.split(folder)
    tmp = os.path.join(parent, f".{name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        if state is not None:
            tensors, meta = state
            torch.save(tensors, os.path.join(tmp, STATE_TENSORS))
            with open(os.path.join(tmp, STATE_META), "w") as f:  # written last: its presence marks a state
                json.dump(meta, f, indent=2)
        _fsync_tree(tmp)
        if os.path.isdir(folder):
            old = os.path.join(parent, f".{name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.rename(folder, old)
            os.rename(tmp, folder)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, folder)
        _fsync_dir(parent)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        why = "the disk is full" if e.errno == errno.ENOSPC else (e.strerror or str(e))
        previous = newest_state(os.path.dirname(parent)) if os.path.basename(parent) == "checkpoints" else None
        kept = f"; the previous state {previous} is intact" if previous else ""
        raise UserError(f"cannot write checkpoint {folder} ({why}){kept}; free space or fix the folder's permissions and rerun") from None


def save_checkpoint(model, tokenizer, run_dir: str, step: int, keep_last_n: int, state: tuple[dict, dict] | None = None) -> str:
    """checkpoints/step_<step>/ with model + tokenizer (LoRA: the adapter) and, when given, the training
    state; keep the newest keep_last_n (never dropping the newest resumable state)."""
    root = os.path.join(run_dir, "checkpoints")
    os.makedirs(root, exist_ok=True)
    folder = os.path.join(root, f"step_{step}")
    save_pretrained_atomic(model, tokenizer, folder, state)
    if keep_last_n > 0:
        prune(run_dir, keep_last_n)
    log.info("checkpoint: saved %s%s", folder, " (resumable state)" if state is not None else "")
    return folder


def prune(run_dir: str, keep_last_n: int) -> None:
    names = list_checkpoints(run_dir)
    newest = newest_state(run_dir)
    for name in names[:-keep_last_n]:
        path = os.path.join(run_dir, "checkpoints", name)
        if path != newest:
            shutil.rmtree(path)


def list_checkpoints(run_dir: str) -> list[str]:
    """Complete step_<N> folder names, oldest first (temporary folders start with a dot)."""
    root = os.path.join(run_dir, "checkpoints")
    if not os.path.isdir(root):
        return []
    names = [n for n in os.listdir(root) if re.fullmatch(r"step_\d+", n)]
    return sorted(names, key=lambda n: int(n.split("_")[1]))


def interrupted_resave(run_dir: str) -> str | None:
    """A state that a crash left half-way through being saved again (`.step_N.old` and a complete `.step_N.tmp`
    holding a state, no `step_N`): remove_partial_saves finishes it at start-up. Returns the folder, or None."""
    root = os.path.join(run_dir, "checkpoints")
    if not os.path.isdir(root):
        return None
    names = set(os.listdir(root))
    for name in sorted(names):
        match = re.fullmatch(r"\.(step_\d+)\.old", name)
        if match and match.group(1) not in names:
            tmp = os.path.join(root, f".{match.group(1)}.tmp")
            old = os.path.join(root, name)
            for folder in (tmp, old):
                if os.path.isfile(os.path.join(folder, STATE_META)) and os.path.isfile(os.path.join(folder, STATE_TENSORS)):
                    return folder
    return None


def newest_state(run_dir: str) -> str | None:
    """The newest checkpoint folder holding a complete resumable state, or None."""
    for name in reversed(list_checkpoints(run_dir)):
        folder = os.path.join(run_dir, "checkpoints", name)
        if os.path.isfile(os.path.join(folder, STATE_META)) and os.path.isfile(os.path.join(folder, STATE_TENSORS)):
            return folder
    return None


def remove_partial_saves(run_dir: str) -> None:
    """Temporary folders a crash left behind mid-save; complete checkpoints are never touched.

    Re-saving a step passes through a moment where only `.step_N.old` (the previous save) and `.step_N.tmp` (the
    new one, complete: it is fsync'ed before the old one is moved aside) exist. A crash there is finished here, not
    undone: the new folder becomes step_N (or, without it, the old one comes back)."""
    root = os.path.join(run_dir, "checkpoints")
    if not os.path.isdir(root):
        return
    names = set(os.listdir(root))
    for name in sorted(names):
        match = re.fullmatch(r"\.(step_\d+)\.old", name)
        if match and match.group(1) not in names:
            step, tmp = match.group(1), f".{match.group(1)}.tmp"
            os.rename(os.path.join(root, tmp if tmp in names else name), os.path.join(root, step))
            log.warning("checkpoint: %s was being replaced when the run stopped; kept the %s copy", step, "new" if tmp in names else "previous")
            names = set(os.listdir(root))
    for name in os.listdir(root):
        if re.fullmatch(r"\.step_\d+\.(tmp|old)", name):
            shutil.rmtree(os.path.join(root, name), ignore_errors=True)


def save_final(model, tokenizer, run_dir: str, lora: bool, merged: bool) -> None:
    """The final model (LoRA: the adapter) and tokenizer at the run folder's root; LoRA may add merged/. Written
    whole into a hidden folder beside, fsync'ed, then each file renamed into place: a crash mid-save never leaves a
    half-written weights file where from_pretrained looks."""
    tmp = os.path.join(run_dir, ".final.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        os.makedirs(tmp)
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        _fsync_tree(tmp)
        for name in os.listdir(tmp):
            target = os.path.join(run_dir, name)
            if os.path.isdir(target) and not os.path.islink(target):
                shutil.rmtree(target)
            os.replace(os.path.join(tmp, name), target)
        _fsync_dir(run_dir)
    except OSError as e:
        why = "the disk is full" if e.errno == errno.ENOSPC else (e.strerror or str(e))
        newest = newest_state(run_dir)
        raise UserError(f"cannot write the final model into {run_dir} ({why})" + (f"; the last state {newest} is intact" if newest else "")
                        + "; free space or fix the folder's permissions and rerun") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    if lora and merged:
        save_pretrained_atomic(model.merge_and_unload(), tokenizer, os.path.join(run_dir, "merged"))
    log.info("saved the final %s to %s", "adapter" if lora else "model", run_dir)


def save_config(summary: dict, run_dir: str) -> None:
    """The resolved configuration, secrets already masked by the caller (written beside, then renamed: a rerun's
    flag check reads it, so it is never half-written)."""
    path = os.path.join(run_dir, CONFIG_FILE)
    try:
        with open(path + ".tmp", "w") as f:
            json.dump(summary, f, indent=2, default=str)
            f.flush()
            os.fsync(f.fileno())
        os.replace(path + ".tmp", path)
    except OSError as e:
        if os.path.exists(path + ".tmp"):
            os.remove(path + ".tmp")
        why = "the disk is full" if e.errno == errno.ENOSPC else (e.strerror or str(e))
        raise UserError(f"cannot write {path} ({why}); free space or fix the folder's permissions and rerun") from None


def load_config(run_dir: str) -> dict | None:
    path = os.path.join(run_dir, CONFIG_FILE)
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        return json.load(f)
