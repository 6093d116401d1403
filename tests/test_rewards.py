"""Reward composition: format reward (additive and gating), non-stop penalty, multi-verifier rows,
verifier errors counted (not silently zero)."""

import json

import pytest
import torch

from open_instruct2.config import RewardConfig
from open_instruct2.rewards import compute_scores, format_score

GOOD = "<think>7 + 5 = 12</think> <answer>#### 12</answer>"
UNFORMATTED = "7 + 5 = 12 #### 12"
FORMATTED_WRONG = "<think>hmm</think><answer>#### 11</answer>"


def scores(texts, cfg, reasons=None, verifiers=None, truths=None):
    n = len(texts)
    return compute_scores(texts, reasons or ["stop"] * n, verifiers or [["gsm8k"]] * n, truths or [["12"]] * n, cfg)


def test_format_score():
    assert format_score(GOOD) == 1.0
    assert format_score("  <think>a\nb</think>\n<answer>c</answer>\n") == 1.0
    assert format_score(UNFORMATTED) == 0.0
    assert format_score("<answer>12</answer><think>x</think>") == 0.0
    assert format_score("<think>x</think><answer>12</answer> and more text") == 0.0


def test_verifiable_only():
    s = scores([GOOD, UNFORMATTED, FORMATTED_WRONG], RewardConfig())
    assert s.rewards.tolist() == [10.0, 10.0, 0.0]  # verification_reward 10 x verifier score
    assert s.verifier_scores.tolist() == [1.0, 1.0, 0.0]
    assert set(s.breakdown) == {"verifiable"}


def test_additive_format_reward():
    cfg = RewardConfig(apply_r1_style_format_reward=True, r1_style_format_reward=1.0, additive_format_reward=True)
    s = scores([GOOD, UNFORMATTED, FORMATTED_WRONG], cfg)
    assert s.rewards.tolist() == [11.0, 10.0, 1.0]
    assert s.breakdown["format"].tolist() == [1.0, 0.0, 1.0]


def test_gating_format_reward():
    cfg = RewardConfig(apply_r1_style_format_reward=True, additive_format_reward=False)
    s = scores([GOOD, UNFORMATTED, FORMATTED_WRONG], cfg)
    assert s.rewards.tolist() == [10.0, 0.0, 0.0]  # right but unformatted gets nothing


def test_format_reward_alone():
    cfg = RewardConfig(apply_verifiable_reward=False, apply_r1_style_format_reward=True, additive_format_reward=True, r1_style_format_reward=2.0)
    assert scores([GOOD, UNFORMATTED], cfg).rewards.tolist() == [2.0, 0.0]


def test_non_stop_penalty_replaces_the_reward():
    cfg = RewardConfig(non_stop_penalty=True, non_stop_penalty_value=-1.0)
    s = scores([GOOD, GOOD, UNFORMATTED], cfg, reasons=["stop", "length", "length"])
    assert s.rewards.tolist() == [10.0, -1.0, -1.0]
    assert s.breakdown["non_stop_penalized"].tolist() == [0.0, 1.0, 1.0]
    assert scores([GOOD], RewardConfig(), reasons=["length"]).rewards.tolist() == [10.0]  # off by default


def test_multi_verifier_rows_average():
    ifeval = json.dumps({"instruction_id": ["punctuation:no_comma"], "kwargs": [{}]})
    cfg = RewardConfig()
    s = scores(["#### 12", "#### 12, done", "#### 13"], cfg, verifiers=[["gsm8k", "ifeval"]] * 3, truths=[["12", ifeval]] * 3)
    assert s.verifier_scores.tolist() == [1.0, 0.5, 0.5]  # mean of (gsm8k, ifeval)
    assert s.rewards.tolist() == [10.0, 5.0, 5.0]


def test_one_verifier_several_ground_truths_takes_the_best():
    s = scores(["#### 12", "#### 13", "#### 14"], RewardConfig(), truths=[["12", "13"]] * 3)
    assert s.verifier_scores.tolist() == [1.0, 1.0, 0.0]


def test_verifier_errors_are_counted_and_logged(caplog):
    with caplog.at_level("WARNING"):
        s = scores(["#### 12", "#### 12"], RewardConfig(), truths=[["twelve"], ["12"]])
    assert s.verifier_errors == 1 and s.verifier_scores.tolist() == [0.0, 1.0]
    assert "1 verifier error(s)" in caplog.text and "not a number" in caplog.text


def test_every_sample_gets_one_reward_tensor():
    s = scores([GOOD] * 5, RewardConfig())
    assert isinstance(s.rewards, torch.Tensor) and s.rewards.shape == (5,)


def test_format_only_reward_is_not_gated_by_an_absent_verifier():
    """--apply_verifiable_reward false with the gating format reward: nothing to gate, the format pays."""
    cfg = RewardConfig(apply_verifiable_reward=False, apply_r1_style_format_reward=True, r1_style_format_reward=1.0,
                       additive_format_reward=False)
    s = compute_scores([GOOD, UNFORMATTED], ["stop", "stop"], [["gsm8k"]] * 2, [["12"]] * 2, cfg)
    assert s.rewards.tolist() == [1.0, 0.0]  # a group of these has a signal


def test_only_reward_good_outputs_pays_nothing_for_partial_credit():
    # string_f1 gives partial credit (SQuAD normalisation drops "the"): "cat sat" vs "cat sat down" -> P 1, R 2/3, F1 0.8
    truths = [["the cat sat down"]] * 2
    texts = ["the cat sat", "the cat sat down"]
    partial = compute_scores(texts, ["stop"] * 2, [["string_f1"]] * 2, truths, RewardConfig(verification_reward=1.0))
    assert partial.rewards[0] == pytest.approx(0.8) and partial.rewards[1] == 1.0
    strict = compute_scores(texts, ["stop"] * 2, [["string_f1"]] * 2, truths, RewardConfig(verification_reward=1.0, only_reward_good_outputs=True))
    assert strict.rewards.tolist() == [0.0, 1.0]
    assert strict.verifier_scores[0] == pytest.approx(0.8)  # the verifier's own score is still logged


def test_a_verifier_returning_nan_is_a_counted_error_not_a_reward(monkeypatch):
    from open_instruct2 import rewards

    monkeypatch.setitem(rewards.VERIFIERS, "nan_verifier", lambda text, truth: float("nan"))
    s = compute_scores(["x", "y"], ["stop"] * 2, [["nan_verifier"]] * 2, [["1"]] * 2, RewardConfig())
    assert s.verifier_errors == 2 and s.rewards.tolist() == [0.0, 0.0]
