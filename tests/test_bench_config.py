"""`make bench` compares like with like: the two trainers get the same generation settings, completions per
step, optimizer steps per rollout batch, micro-batching, precision, beta, learning rate and steps."""

import sys
from argparse import Namespace

import pytest

from conftest import REPO

sys.path.insert(0, str(REPO / "benchmarks"))


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_ours_and_trl_get_equal_settings(tmp_path, dtype):
    pytest.importorskip("trl")
    import bench_trl as B
    from trl import GRPOConfig

    from open_instruct2.config import validate
    from open_instruct2.rollout import sampling_config
    from open_instruct2.train_grpo import parse_config

    s = B.settings(Namespace(steps=5, prompts=2, samples=4, length=64, dtype=dtype))
    ours = parse_config([str(a) for a in B.ours_args(s, str(tmp_path / "model"), str(tmp_path / "out"), "r")])
    validate(ours)
    trl = GRPOConfig(**B.trl_config(s, str(tmp_path / "trl")))
    # generation: the same distribution, the same length
    generation, [sampler] = sampling_config(temperature=ours.rollout.temperature, top_p=ours.rollout.top_p,
                                            response_length=ours.rollout.response_length, pad_token_id=2, eos_token_ids=[2])
    assert (sampler.temperature, sampler.top_p, generation.top_k) == (trl.temperature, trl.top_p, None) and trl.top_k == 0
    assert trl.repetition_penalty == 1.0 and trl.min_p is None and generation.repetition_penalty is None and generation.min_p is None
    assert generation.max_new_tokens == trl.max_completion_length == 64
    assert ours.rollout.stop_strings is None
    # completions per step: prompts x samples, all generated at once
    batch = ours.rollout.num_unique_prompts_rollout * ours.rollout.num_samples_per_prompt_rollout
    assert batch == trl.per_device_train_batch_size * trl.gradient_accumulation_steps == 8
    assert ours.rollout.num_samples_per_prompt_rollout == trl.num_generations == 4
    # one optimizer step per rollout batch, one micro-batch of the whole batch
    assert ours.optim.num_epochs * ours.optim.num_mini_batches == trl.num_iterations * trl.steps_per_generation // trl.gradient_accumulation_steps == 1
    assert ours.optim.per_device_train_batch_size == trl.per_device_train_batch_size == batch
    # the same math and precision
    assert ours.optim.beta == trl.beta == 0.0 and ours.reference.reference_mode == "none"
    assert ours.optim.learning_rate == trl.learning_rate and ours.optim.lr_scheduler_type == str(trl.lr_scheduler_type).split(".")[-1].lower() == "constant"
    assert ours.rollout.num_training_steps == trl.max_steps == 5 and ours.experiment.seed == trl.seed
    assert ours.runtime.policy_dtype == dtype and trl.bf16 == (dtype == "bfloat16") and not trl.fp16
    assert ours.model.gradient_checkpointing is False and trl.gradient_checkpointing is False
    assert ours.lora.train_mode == "full"


def test_the_long_prompt_row_gives_both_trainers_the_same_prompts(tmp_path, tokenizer):
    """--prompt-tokens: ours reads the filler through --system_prompt_file, TRL gets it as each prompt's first turn;
    the token ids of the two prompts are the same, and they average about the asked length."""
    import statistics

    import bench_trl as B

    from open_instruct2.bootstrap import arithmetic_rows
    from open_instruct2.data import read_system_prompt, tokenize_prompt, with_frame
    from open_instruct2.train_grpo import parse_config

    rows = arithmetic_rows("train")[:16]
    s = B.settings(Namespace(steps=5, prompts=2, samples=8, length=64, dtype="float32"))
    s["system"] = B.long_system_prompt(tokenizer, rows, 256)
    s["longest_prompt"] = max(len(tokenize_prompt(tokenizer, [{"role": "system", "content": s["system"]}, *r["messages"]])) for r in rows)
    ours = parse_config([str(a) for a in B.ours_args(s, str(tmp_path / "model"), str(tmp_path / "out"), "r")])
    system = read_system_prompt(ours.data.system_prompt_file)
    assert system == s["system"]
    lengths = []
    for r in rows:
        ours_ids = tokenize_prompt(tokenizer, with_frame(r["messages"], system, []))
        trl_ids = tokenize_prompt(tokenizer, [{"role": "system", "content": s["system"]}, *r["messages"]])
        assert ours_ids == trl_ids
        lengths.append(len(ours_ids))
    assert 200 < statistics.mean(lengths) <= 256 and max(lengths) <= ours.data.max_prompt_token_length
