"""Data flags (training and evaluation mixers, token lengths, system prompt, worked examples), `parse_mixer`, and the
data's own checks: the lengths, then the inputs (mixer pairs, local files present). max_token_length
against response_length: checks.py."""

import math
import os
from dataclasses import field
from typing import Optional

from ..errors import ConfigError
from .base import documented, require, require_positive


LOCAL_SUFFIXES = (".jsonl", ".json", ".parquet", ".csv")
"""The files a data source may be (data.load_rows reads them; validation checks that they exist)."""


@documented("data")
class DataConfig:
    dataset_mixer_list: list[str] = field(default_factory=lambda: ["builtin:arithmetic", "1.0"])
    """Pairs '<source> <amount>': source is a hub dataset (name or name:config), a local .jsonl/.json/.parquet/.csv file, a folder written by datasets' save_to_disk, or builtin:<name>; rows in open-instruct's RLVR format or TRL's prompt formats (README 'Data'); an amount with a '.' is a fraction of the source, else a row count. The original defaulted to ai2-adapt-dev/rlvr_gsm8k_zs 1.0."""
    dataset_mixer_list_splits: list[str] = field(default_factory=lambda: ["train"])
    """Split of each source (one value for all, or one per source)."""
    dataset_mixer_eval_list: list[str] = field(default_factory=list)
    """Evaluation sources, in the same '<source> <amount>' form."""
    dataset_mixer_eval_list_splits: list[str] = field(default_factory=lambda: ["test"])
    """Split of each evaluation source."""
    max_token_length: int = 512
    """Longest prompt + response in tokens; must be >= max_prompt_token_length + response_length."""
    max_prompt_token_length: int = 256
    """Prompts longer than this (in tokens, chat template included) are dropped, with a count in the log."""
    system_prompt_file: Optional[str] = None
    """Text file whose content becomes the system message of every prompt (replacing any in the data)."""
    few_shot_file: Optional[str] = None
    """JSON file holding a list of worked example turns ({role: user|assistant, content}, user first, alternating, ending with an assistant turn) placed after the system message and before each prompt's own turns, in training and evaluation. New."""
    shuffle_eval_dataset: bool = False
    """Shuffle the evaluation set before taking eval_max_samples."""
    prompt_column: str = "prompt"
    """The column holding the prompt of TRL-format rows (a string, or a list of messages), e.g. question for gsm8k. New."""


def parse_mixer(values: list[str], splits: list[str], flag: str) -> list[tuple[str, float | int, str]]:
    """['a', '1.0', 'b', '500'] -> [('a', 1.0, split), ('b', 500, split)]; a '.' means a fraction."""
    require(
        len(values) % 2 == 0,
        f"--{flag} needs '<source> <amount>' pairs, got {len(values)} values {values}; e.g. --{flag} builtin:arithmetic 1.0",
    )
    pairs = list(zip(values[0::2], values[1::2]))
    require(
        len(splits) in (1, len(pairs)),
        f"--{flag}_splits has {len(splits)} values for {len(pairs)} sources; give one split for all or one per source",
    )
    out = []
    for i, (source, amount) in enumerate(pairs):
        try:
            value = float(amount) if "." in amount else int(amount)
        except ValueError:
            raise ConfigError(
                f"--{flag}: amount {amount!r} for {source!r} is not a number; use a fraction like 1.0 or a row count like 500"
            ) from None
        require(value > 0 and math.isfinite(value), f"--{flag}: amount {amount!r} for {source!r} must be > 0")
        out.append((source, value, splits[0] if len(splits) == 1 else splits[i]))
    return out


def validate_data(data: DataConfig) -> None:
    require_positive(data, "max_token_length", "max_prompt_token_length")


def check_data_inputs(data: DataConfig) -> None:
    """The mixers parse and their local files exist; so does the system prompt file (run after every value check)."""
    for flag, (values, splits) in {"dataset_mixer_list": (data.dataset_mixer_list, data.dataset_mixer_list_splits),
                                   "dataset_mixer_eval_list": (data.dataset_mixer_eval_list, data.dataset_mixer_eval_list_splits)}.items():
        for source, _, _ in parse_mixer(values, splits, flag):
            if source.endswith(LOCAL_SUFFIXES):
                require(os.path.isfile(source), f"--{flag}: file {source!r} not found; check the path")
    for flag in ("system_prompt_file", "few_shot_file"):
        path = getattr(data, flag)
        require(path is None or os.path.isfile(path), f"--{flag} {path!r} not found; check the path")
