"""Reward flags (verifiable and format rewards, penalties, verifier renames and extra verifier modules)
and their own checks; the rewards themselves are computed in open_instruct2/rewards.py."""

import math
import os
from typing import Optional

from .base import documented, require


@documented("rewards")
class RewardConfig:
    apply_verifiable_reward: bool = True
    """Score responses with the verifier named by each row's 'dataset' field."""
    verification_reward: float = 10.0
    """Reward for a fully correct answer (verifier score x this)."""
    apply_r1_style_format_reward: bool = False
    """Reward the <think>...</think><answer>...</answer> format."""
    r1_style_format_reward: float = 1.0
    """Reward for the R1 format."""
    additive_format_reward: bool = False
    """true: the format reward is added. false: a response without the format gets no verifiable reward."""
    non_stop_penalty: bool = False
    """Give responses that hit response_length (finish reason 'length') the reward non_stop_penalty_value instead."""
    non_stop_penalty_value: float = 0.0
    """Reward given to truncated responses when non_stop_penalty is on."""
    only_reward_good_outputs: bool = False
    """All-or-nothing verifiable reward: only responses whose verifier score is 1 get it; partial credit (ifeval fractions, string_f1, length budgets) becomes 0. (open-instruct zeroes outputs with tool errors; there are no tools here.)"""
    remap_verifier: Optional[list[str]] = None
    """Rename verifiers named in the data, as old=new pairs, e.g. --remap_verifier math=strict_math."""
    verifier_module: Optional[str] = None
    """Python file that registers extra verifiers with open_instruct2.verifiers.register(name, doc)."""
    reward_funcs: Optional[list[str]] = None
    """Reward functions whose weighted sum is the reward, TRL's convention (README 'Your own task'): builtin names (verifiable, rubric, think_answer_format, soft_overlong, repetition_penalty), my_pkg.module.fn, or path/to/file.py:fn. Each is called once per batch with prompts, completions, completion_ids, every other dataset column and trainer_state, and returns a float or None (not applicable) per completion. Default: verifiable (the verifiers and the rubric judge, as before). New."""
    reward_weights: Optional[list[float]] = None
    """One weight per --reward_funcs entry (default 1 each). New."""
    verifier: Optional[str] = None
    """The verifier of TRL-format rows (a prompt column), e.g. gsm8k; it checks the --ground_truth_column. RLVR rows name theirs in their 'dataset' field. New."""
    ground_truth_column: Optional[str] = None
    """The column --verifier checks TRL-format rows against (default: ground_truth), as open-instruct's ground_truths_key. New."""
    overlong_buffer_len: int = 0
    """L of DAPO's soft overlong punishment: a response longer than response_length - L tokens gets a penalty growing linearly to -overlong_penalty_factor at response_length, added to the reward (logged as reward/soft_overlong); with --reward_funcs, list soft_overlong there. 0 = off. New."""
    overlong_penalty_factor: float = 1.0
    """The soft overlong punishment at response_length (p of -p x (length - (response_length - L)) / L). New."""
    repetition_ngram_size: int = 3
    """n of the repetition_penalty reward function (repeated word n-grams). New."""
    repetition_max_penalty: float = -1.0
    """repetition_penalty's reward when every n-gram repeats (0 for none; it scales linearly in between). New."""
    reward_funcs_max_failed_steps: int = 3
    """Stop (after saving) when every reward function failed for this many steps in a row (a failure on the first batch stops at once). New."""


def validate_reward(rw: RewardConfig) -> None:
    require(
        rw.apply_verifiable_reward or rw.apply_r1_style_format_reward or bool(rw.reward_funcs),
        "no reward is active: set --apply_verifiable_reward true or --apply_r1_style_format_reward true",
    )
    require(rw.reward_weights is None or bool(rw.reward_funcs), "--reward_weights weighs --reward_funcs; give the functions too")
    require(rw.reward_weights is None or len(rw.reward_weights) == len(rw.reward_funcs),
            f"--reward_weights has {len(rw.reward_weights or [])} values for {len(rw.reward_funcs or [])} --reward_funcs; give one weight per function")
    require(rw.ground_truth_column is None or rw.verifier is not None,
            "--ground_truth_column names the column --verifier checks; give --verifier too (e.g. --verifier gsm8k)")
    require(rw.overlong_buffer_len >= 0, f"--overlong_buffer_len must be >= 0, got {rw.overlong_buffer_len}")
    require("soft_overlong" not in (rw.reward_funcs or []) or rw.overlong_buffer_len > 0,
            "--reward_funcs soft_overlong needs --overlong_buffer_len L > 0 (the last L tokens before response_length are penalised)")
    require(not rw.reward_funcs or rw.overlong_buffer_len == 0 or "soft_overlong" in rw.reward_funcs,
            "--overlong_buffer_len works through the soft_overlong reward function when --reward_funcs lists functions: add soft_overlong "
            "to --reward_funcs, or drop --overlong_buffer_len")
    require(rw.overlong_penalty_factor >= 0, f"--overlong_penalty_factor must be >= 0, got {rw.overlong_penalty_factor}")
    require(rw.repetition_max_penalty <= 0, f"--repetition_max_penalty must be <= 0 (a penalty), got {rw.repetition_max_penalty}")
    require(all(math.isfinite(w) for w in rw.reward_weights or []), f"--reward_weights must be finite numbers, got {rw.reward_weights}")
    require(rw.reward_funcs_max_failed_steps >= 1, f"--reward_funcs_max_failed_steps must be >= 1, got {rw.reward_funcs_max_failed_steps}")
    require(rw.repetition_ngram_size >= 1, f"--repetition_ngram_size must be >= 1, got {rw.repetition_ngram_size}")
    require(rw.verification_reward >= 0, f"--verification_reward must be >= 0, got {rw.verification_reward}")


def check_reward_inputs(rw: RewardConfig) -> None:
    """The verifier renames parse and the verifier module exists (run after every value check)."""
    for pair in rw.remap_verifier or []:
        require(pair.count("=") == 1 and all(pair.split("=")), f"--remap_verifier {pair!r} must look like old=new")
    if rw.verifier_module is not None:
        require(os.path.isfile(rw.verifier_module), f"--verifier_module {rw.verifier_module!r} not found; check the path")
