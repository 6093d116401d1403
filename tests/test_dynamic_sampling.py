"""DAPO's dynamic sampling (--dynamic_sampling): merging rounds and keeping groups, by hand on small batches; a real run
on the tiny model whose reward gives a signal only on some prompts (it draws further rounds, trains on groups with a
signal, keeps the sampler's stream, the episode count and a resume exact); a bad --max_sampling_rounds."""

import json
import re

import pytest
import torch

from conftest import assert_one_line_error, run_cli, tiny_config
from open_instruct2 import trainer
from open_instruct2.data import Prompt, PromptBatch, PromptSampler
from open_instruct2.dynamic_sampling import (kept_groups, merge_batches, merge_metrics, merge_rollouts, merge_scores, select_batch,
                                             select_rollouts, select_scores, signal_groups)
from open_instruct2.rewards import Scores
from open_instruct2.rollout import Rollouts
from test_resume import stopped_after, train_lines

PAD = 0


def t(rows, dtype=torch.long):
    return torch.tensor(rows, dtype=dtype)


def round_a() -> Rollouts:
    """2 prompts x 2 samples, prompt width 3 (prompt 0 is 2 tokens long), response width 2."""
    return Rollouts(
        input_ids=t([[0, 11, 12, 13, 14], [0, 11, 12, 15, 0], [21, 22, 23, 24, 25], [21, 22, 23, 26, 0]]),
        attention_mask=t([[0, 1, 1, 1, 1], [0, 1, 1, 1, 0], [1, 1, 1, 1, 1], [1, 1, 1, 1, 0]]),
        response_mask=t([[1, 1], [1, 0], [1, 1], [1, 0]]),
        prompt_width=3, finish_reasons=["length", "stop", "length", "stop"], response_texts=["a0", "a1", "a2", "a3"],
        prompt_index=[0, 0, 1, 1], sampler_logprobs=torch.tensor([[-0.1, -0.2], [-0.3, 0.0], [-0.4, -0.5], [-0.6, 0.0]]),
        stats={"time/weight_sync": 1.5, "rollout/server_relaunches": 0.0},
    )


def round_b() -> Rollouts:
    """1 prompt x 2 samples, prompt width 2 (one sample's prompt is 1 token: a hand-made case), response width 3."""
    return Rollouts(
        input_ids=t([[31, 32, 33, 34, 35], [0, 36, 37, 0, 0]]),
        attention_mask=t([[1, 1, 1, 1, 1], [0, 1, 1, 0, 0]]),
        response_mask=t([[1, 1, 1], [1, 0, 0]]),
        prompt_width=2, finish_reasons=["length", "stop"], response_texts=["b0", "b1"], prompt_index=[0, 0],
        sampler_logprobs=torch.tensor([[-1.0, -2.0, -3.0], [-4.0, 0.0, 0.0]]),
        stats={"rollout/server_relaunches": 1.0, "time/weight_sync": 0.5},
    )


def scores_a() -> Scores:
    return Scores(rewards=torch.tensor([1.0, 0.0, 1.0, 1.0]), breakdown={"verifiable": torch.tensor([1.0, 0.0, 1.0, 1.0])},
                  verifier_scores=torch.tensor([1.0, 0.0, 1.0, 1.0]), verifier_errors=1, valid=None,
                  metrics={"reward/f/mean": 1.0, "reward/f/errors": 0.0, "reward/functions_failed": 1.0, "rubric/judge_calls": 4.0,
                           "rubric/judge_failures": 1.0, "rubric/judge_failure_rate": 0.25},
                  rubric_scores=None, function_values={"f": [1.0, 0.0, 1.0, 1.0]})


def scores_b() -> Scores:
    return Scores(rewards=torch.tensor([0.5, 0.7]), breakdown={"verifiable": torch.tensor([0.5, 0.7])},
                  verifier_scores=torch.tensor([0.5, 0.7]), verifier_errors=2, valid=torch.tensor([True, False]),
                  metrics={"reward/f/mean": 0.25, "reward/f/errors": 1.0, "rubric/judge_calls": 4.0, "rubric/judge_failures": 3.0,
                           "rubric/judge_failure_rate": 0.75, "rubric/judge_latency_p50_s": 3.0},
                  rubric_scores=[0.3, None], function_values={"f": [None, 0.7]})


def prompt(n: int) -> Prompt:
    return Prompt(prompt_ids=[n], messages=[{"role": "user", "content": f"q{n}"}], ground_truth=[str(n)], verifiers=["gsm8k"], source="x")


def test_merged_rollouts_are_repadded_to_the_widest_prompt_and_response():
    merged = merge_rollouts([round_a(), round_b()], PAD)
    # P = max(3, 2) = 3 on the left, T = max(2, 3) = 3 on the right: round a gains a column on the right, round b one on the left
    assert merged.prompt_width == 3
    assert merged.input_ids.tolist() == [[0, 11, 12, 13, 14, 0], [0, 11, 12, 15, 0, 0], [21, 22, 23, 24, 25, 0], [21, 22, 23, 26, 0, 0],
                                         [0, 31, 32, 33, 34, 35], [0, 0, 36, 37, 0, 0]]
    assert merged.attention_mask.tolist() == [[0, 1, 1, 1, 1, 0], [0, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 0], [1, 1, 1, 1, 0, 0],
                                              [0, 1, 1, 1, 1, 1], [0, 0, 1, 1, 0, 0]]
    assert merged.response_mask.tolist() == [[1, 1, 0], [1, 0, 0], [1, 1, 0], [1, 0, 0], [1, 1, 1], [1, 0, 0]]
    assert torch.equal(merged.sampler_logprobs, torch.tensor([[-0.1, -0.2, 0], [-0.3, 0, 0], [-0.4, -0.5, 0], [-0.6, 0, 0],
                                                              [-1, -2, -3], [-4, 0, 0]]))
    assert merged.finish_reasons == ["length", "stop", "length", "stop", "length", "stop"]
    assert merged.response_texts == ["a0", "a1", "a2", "a3", "b0", "b1"]
    assert merged.prompt_index == [0, 0, 1, 1, 2, 2]  # round b's prompt is the merged batch's third
    assert merged.response_token_ids() == [[13, 14], [15], [24, 25], [26], [33, 34, 35], [37]]  # the responses themselves unchanged
    assert merged.input_ids.dtype == torch.long and merged.response_mask.dtype == torch.long
    # seconds add up; the relaunch count is a running total of the run: the last round's
    assert merged.stats == {"time/weight_sync": 2.0, "rollout/server_relaunches": 1.0}


def test_merged_scores_keep_every_field_and_merge_the_metrics_by_their_kind():
    merged = merge_scores([scores_a(), scores_b()])
    assert merged.rewards.tolist() == pytest.approx([1, 0, 1, 1, 0.5, 0.7])
    assert list(merged.breakdown) == ["verifiable"] and merged.breakdown["verifiable"].tolist() == pytest.approx([1, 0, 1, 1, 0.5, 0.7])
    assert merged.verifier_scores.tolist() == pytest.approx([1, 0, 1, 1, 0.5, 0.7])
    assert merged.verifier_errors == 3
    assert merged.valid.tolist() == [True, True, True, True, True, False]  # round a's None = all valid
    assert merged.rubric_scores == [None, None, None, None, 0.3, None]  # round a had no judge
    assert merged.function_values == {"f": [1.0, 0.0, 1.0, 1.0, None, 0.7]}
    assert merged.metrics == pytest.approx({
        "reward/f/mean": (1.0 * 4 + 0.25 * 2) / 6,  # a mean, weighted by the rounds' 4 and 2 samples: 0.75
        "reward/f/errors": 1.0,  # counts add up
        "reward/functions_failed": 1.0,  # only round a had it
        "rubric/judge_calls": 8.0, "rubric/judge_failures": 4.0,
        "rubric/judge_failure_rate": 0.5,  # 4 / 8 recomputed (averaging the rates by samples would give 0.4167)
        "rubric/judge_latency_p50_s": 3.0,  # only round b had it
    })
    assert merge_scores([scores_a()]).valid is None and merge_metrics([None, None], [4, 2]) is None


def test_selected_groups_take_their_samples_prompts_and_renumber_prompt_index():
    rollouts, scores = merge_rollouts([round_a(), round_b()], PAD), merge_scores([scores_a(), scores_b()])
    batch = merge_batches([PromptBatch([prompt(10), prompt(11)], [10, 11]), PromptBatch([prompt(12)], [12])])
    assert [p.prompt_ids for p in batch.prompts] == [[10], [11], [12]] and batch.indices == [10, 11, 12]
    kept = [2, 0]  # round b's group first: the new numbering follows the kept order
    b, r, s = select_batch(batch, rollouts, kept, 2), select_rollouts(rollouts, kept, 2), select_scores(scores, kept, 2)
    assert [p.prompt_ids for p in b.prompts] == [[12], [10]] and b.indices == [12, 10]
    assert r.prompt_index == [0, 0, 1, 1]
    assert r.input_ids.tolist() == [[0, 31, 32, 33, 34, 35], [0, 0, 36, 37, 0, 0], [0, 11, 12, 13, 14, 0], [0, 11, 12, 15, 0, 0]]
    assert r.attention_mask.tolist() == [[0, 1, 1, 1, 1, 1], [0, 0, 1, 1, 0, 0], [0, 1, 1, 1, 1, 0], [0, 1, 1, 1, 0, 0]]
    assert r.response_mask.tolist() == [[1, 1, 1], [1, 0, 0], [1, 1, 0], [1, 0, 0]]
    assert torch.equal(r.sampler_logprobs, torch.tensor([[-1, -2, -3], [-4, 0, 0], [-0.1, -0.2, 0], [-0.3, 0, 0]]))
    assert r.prompt_width == 3 and r.finish_reasons == ["length", "stop", "length", "stop"] and r.response_texts == ["b0", "b1", "a0", "a1"]
    assert r.stats == rollouts.stats  # what was sampled, kept or not
    assert s.rewards.tolist() == pytest.approx([0.5, 0.7, 1.0, 0.0]) and s.breakdown["verifiable"].tolist() == pytest.approx([0.5, 0.7, 1, 0])
    assert s.verifier_scores.tolist() == pytest.approx([0.5, 0.7, 1.0, 0.0])
    assert s.valid.tolist() == [True, False, True, True]
    assert s.rubric_scores == [0.3, None, None, None] and s.function_values == {"f": [None, 0.7, 1.0, 0.0]}
    assert s.verifier_errors == 3 and s.metrics == scores.metrics  # every scored sample's errors and calls, kept or not
    # the rows of groups that were all valid: valid goes back to None (all valid), as compute_scores leaves it
    assert select_scores(scores, [0, 1], 2).valid is None
    # the selection is an ordinary Rollouts: the update's trimming of shared padding still works on it
    part = r.rows([2, 3])
    assert part.prompt_width == 2 and part.input_ids.tolist() == [[11, 12, 13, 14], [11, 12, 15, 0]]


def test_signal_and_kept_groups():
    assert signal_groups(scores_a(), 2) == [True, False]  # (1, 0) differ; (1, 1) equal
    assert signal_groups(scores_b(), 2) == [False]  # one valid sample: no signal
    assert signal_groups(merge_scores([scores_a(), scores_b()]), 2) == [True, False, False]
    assert kept_groups([False, True, False, True, True], 2, 2) == [1, 3]  # the first two with a signal, in draw order
    assert kept_groups([True, False, False, False], 2, 2) == [0]  # short: what there is
    assert kept_groups([False] * 6, 2, 2) == [0, 1]  # none: round 1 as it is


def test_mismatched_rounds_are_refused():
    no_logprobs = round_b()
    no_logprobs.sampler_logprobs = None
    with pytest.raises(ValueError, match="sampler log-probs"):
        merge_rollouts([round_a(), no_logprobs], PAD)
    other = scores_b()
    other.breakdown = {"format": other.breakdown["verifiable"]}
    with pytest.raises(ValueError, match="different reward parts"):
        merge_scores([scores_a(), other])


# ---------------------------------------------------------------- a real run on the tiny model

SIGNAL_ROWS = {1, 4, 6}
"""Rows (of write_rows' 8: "What is {i} + ...") whose groups get different rewards; every other group's are all 0."""

REWARD_FILE = '''
import json, re
LOG = {log!r}
GROUP = {group}

def by_row(prompts, completions, trainer_state, **kwargs):
    rows = [int(re.search(r"What is (\\d+) \\+", p[-1]["content"]).group(1)) for p in prompts]
    with open(LOG, "a") as f:
        f.write(json.dumps({{"step": trainer_state.global_step + 1, "rows": rows[::GROUP]}}) + "\\n")
    return [float(i % 2) if row in {signal} else 0.0 for i, row in enumerate(rows)]
'''


def reward_file(folder, group):
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "by_row.py"
    path.write_text(REWARD_FILE.format(log=str(folder / "seen.jsonl"), group=group, signal=SIGNAL_ROWS))
    return f"{path}:by_row"


def seen(folder):
    """Per step, the prompt rows of each round the reward function scored."""
    out = {}
    for line in open(folder / "seen.jsonl"):
        record = json.loads(line)
        out.setdefault(record["step"], []).append(record["rows"])
    return out


def settings(folder, **extra):
    return dict(dynamic_sampling=True, max_sampling_rounds=3, reward_funcs=[reward_file(folder, 2)], num_unique_prompts_rollout=2,
                num_samples_per_prompt_rollout=2, num_training_steps=5, num_evals=0, save_rollouts=True, log_samples_freq=-1, **extra)


def test_a_run_draws_further_rounds_and_trains_on_groups_with_a_signal(tmp_path, tiny_model_dir, caplog):
    cfg = tiny_config(tmp_path, tiny_model_dir, run_name="d", **settings(tmp_path))
    with caplog.at_level("WARNING", logger="open_instruct2.trainer"):
        run_dir = trainer.train(cfg)
    rounds = seen(tmp_path)
    # every round drew the sampler's next 2 prompts: its stream is the one a run without dynamic sampling walks through
    stream = PromptSampler(8, cfg.experiment.seed).next_indices(2 * sum(len(r) for r in rounds.values()))
    assert [row for step in sorted(rounds) for batch in rounds[step] for row in batch] == stream
    lines = train_lines(run_dir)
    assert [m["step"] for m in lines] == [1, 2, 3, 4, 5]
    cases = []
    for m in lines:
        drawn = [row for batch in rounds[m["step"]] for row in batch]  # groups in draw order
        with_signal = [row for row in drawn if row in SIGNAL_ROWS]
        # it stopped at the first round that made 2 groups with a signal, or after 3 rounds
        need = next((r + 1 for r in range(3) if sum(row in SIGNAL_ROWS for row in drawn[: 2 * (r + 1)]) >= 2), 3)
        assert m["rollout/sampling_rounds"] == len(rounds[m["step"]]) == need
        expected = with_signal[:2] or drawn[:2]  # the first 2 with a signal; none at all: round 1's
        assert m["rollout/groups_discarded"] == len(drawn) - len(expected)
        dumped = [json.loads(line) for line in open(f"{run_dir}/rollouts/step_{m['step']}.jsonl")]
        trained = [int(re.search(r"What is (\d+) \+", d["prompt"]).group(1)) for d in dumped[::2]]
        assert trained == expected and m["rollout/loss_samples"] == 2 * len(expected)
        assert m["rollout/zero_std_group_fraction"] == (1.0 if not with_signal else 0.0)
        assert m["reward/by_row/mean"] == pytest.approx(sum(0.5 for row in drawn if row in SIGNAL_ROWS) / len(drawn))  # over every round
        cases.append("full" if need == 1 else "filled" if len(with_signal) >= 2 else "short" if with_signal else "none")
        if cases[-1] in ("short", "none"):  # it says so
            assert f"step {m['step']}: dynamic sampling found {len(with_signal)} of 2 groups with a reward signal in 3 rounds" in caplog.text
    # this seed shows every case: filled up after further rounds, short of groups after 3 rounds, and none at all
    assert {"filled", "short", "none"} <= set(cases), cases
    assert "training on round 1's groups as they are" in caplog.text and "training on the 1 it has" in caplog.text
    episodes = [sum(4 * len(rounds[s]) for s in range(1, step + 1)) for step in range(1, 6)]
    assert [m["rollout/episodes"] for m in lines] == episodes  # 2 prompts x 2 samples per round


def test_a_resumed_run_draws_the_same_prompts_as_a_straight_one(tmp_path, tiny_model_dir):
    a, b = tmp_path / "a", tmp_path / "b"
    straight = trainer.train(tiny_config(a, tiny_model_dir, run_name="s", checkpoint_state_freq=1, **settings(a)))
    stopped = stopped_after(tiny_config(b, tiny_model_dir, run_name="s", checkpoint_state_freq=1, **settings(b)), 2)
    assert "stopped by SIGTERM after step 2" in stopped.message
    assert sorted(seen(b)) == [1, 2]
    resumed = trainer.train(tiny_config(b, tiny_model_dir, run_name="s", checkpoint_state_freq=1, **settings(b)))
    assert seen(b) == seen(a)  # the same prompts in every round of every step
    keys = ("rollout/sampling_rounds", "rollout/groups_discarded", "rollout/episodes", "reward/mean")
    assert [[m[k] for k in keys] for m in train_lines(resumed)] == [[m[k] for k in keys] for m in train_lines(straight)]
    meta = json.load(open(f"{resumed}/checkpoints/step_5/training_state.json"))
    assert meta["episodes"] == train_lines(straight)[-1]["rollout/episodes"] == 4 * sum(len(r) for r in seen(a).values())
    assert meta["episodes"] > 5 * 4  # more responses than steps x rollout batch: the further rounds are counted


def test_off_keeps_todays_step_and_counts_episodes_as_before(tmp_path, tiny_model_dir):
    cfg = tiny_config(tmp_path, tiny_model_dir, run_name="o", checkpoint_state_freq=1, **{**settings(tmp_path), "dynamic_sampling": False,
                                                                                          "num_training_steps": 2})
    run_dir = trainer.train(cfg)
    assert seen(tmp_path) == {1: [PromptSampler(8, cfg.experiment.seed).next_indices(4)[:2]],
                              2: [PromptSampler(8, cfg.experiment.seed).next_indices(4)[2:]]}  # one round a step
    assert not any(k.startswith(("rollout/sampling_rounds", "rollout/groups_discarded", "rollout/episodes")) for m in train_lines(run_dir) for k in m)
    assert json.load(open(f"{run_dir}/checkpoints/step_2/training_state.json"))["episodes"] == 2 * 4


def test_a_state_without_episodes_restores_step_times_batch(tmp_path, tiny_model_dir):
    common = dict(run_name="e", checkpoint_state_freq=1, **{**settings(tmp_path), "num_training_steps": 2})
    stopped_after(tiny_config(tmp_path, tiny_model_dir, **common), 1)
    path = tmp_path / "out" / "e" / "checkpoints" / "step_1" / "training_state.json"
    meta = json.loads(path.read_text())
    assert meta["episodes"] == 4 * len(seen(tmp_path)[1])
    meta.pop("episodes")  # as a state saved before the count was kept
    path.write_text(json.dumps(meta))
    run = trainer.setup(tiny_config(tmp_path, tiny_model_dir, **common))
    try:
        assert run.start_step == 1 and run.episodes == 1 * 4
    finally:
        run.tracker.close()
        if run.reference is not None:
            run.reference.close()


def test_max_sampling_rounds_zero_is_refused(tmp_path):
    proc = run_cli("--dynamic_sampling", "true", "--max_sampling_rounds", "0", "--output_dir", tmp_path / "out")
    assert_one_line_error(proc, "--max_sampling_rounds must be >= 1", "got 0")
    assert not (tmp_path / "out").exists()
