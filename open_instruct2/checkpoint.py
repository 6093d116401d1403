"""Saving models: periodic checkpoints (rotated), the final model, the resolved config.

Every folder is written under a temporary name and renamed into place, so a crash mid-save never leaves
a half-written checkpoint that looks complete.
"""

import json
import logging
import os
import re
import shutil

log = logging.getLogger(__name__)

CONFIG_FILE = "open_instruct2_config.json"


def save_pretrained_atomic(model, tokenizer, folder: str) -> None:
    """model.save_pretrained + tokenizer into `folder`, which must not exist yet."""
    tmp = f"{folder}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    os.rename(tmp, folder)


def save_checkpoint(model, tokenizer, run_dir: str, step: int, keep_last_n: int) -> str:
    """checkpoints/step_<step>/ with model + tokenizer (LoRA: the adapter); keep the newest keep_last_n."""
    root = os.path.join(run_dir, "checkpoints")
    os.makedirs(root, exist_ok=True)
    folder = os.path.join(root, f"step_{step}")
    save_pretrained_atomic(model, tokenizer, folder)
    if keep_last_n > 0:
        for old in list_checkpoints(run_dir)[:-keep_last_n]:
            shutil.rmtree(os.path.join(root, old))
    log.info("checkpoint: saved %s", folder)
    return folder


def list_checkpoints(run_dir: str) -> list[str]:
    """step_<N> folder names, oldest first."""
    root = os.path.join(run_dir, "checkpoints")
    if not os.path.isdir(root):
        return []
    names = [n for n in os.listdir(root) if re.fullmatch(r"step_\d+", n)]
    return sorted(names, key=lambda n: int(n.split("_")[1]))


def save_final(model, tokenizer, run_dir: str, lora: bool, merged: bool) -> None:
    """The final model (LoRA: the adapter) and tokenizer at the run folder's root; LoRA may add merged/."""
    model.save_pretrained(run_dir)
    tokenizer.save_pretrained(run_dir)
    if lora and merged:
        save_pretrained_atomic(model.merge_and_unload(), tokenizer, os.path.join(run_dir, "merged"))
    log.info("saved the final %s to %s", "adapter" if lora else "model", run_dir)


def save_config(summary: dict, run_dir: str) -> None:
    """The resolved configuration, secrets already masked by the caller."""
    with open(os.path.join(run_dir, CONFIG_FILE), "w") as f:
        json.dump(summary, f, indent=2, default=str)
