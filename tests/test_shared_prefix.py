"""--shared_prefix: each group's prompt forwarded once in the log-prob passes and the update, with the same
log-probs, entropies, losses and gradients as the per-sample passes (fp32 and bf16, full and LoRA, prompts of
different lengths in one batch, with and without a system prompt, groups of one and of G, every micro-batch size)."""

from collections import defaultdict

import pytest
import torch

from conftest import run_cli, tiny_config, write_rows
from open_instruct2 import trainer, update
from open_instruct2.data import Prompt, PromptBatch, tokenize_prompt
from open_instruct2.logprobs import output_layer
from open_instruct2.policy import decoder_of, shares_prefix
from open_instruct2.reference import batched_forward
from open_instruct2.rollout import generate_rollouts
from open_instruct2.shared_prefix import group_rows, saved_fraction, should_share
from open_instruct2.update import select_rows

G = 3
QUESTIONS = [
    [{"role": "system", "content": "You are a careful calculator. Answer with the number after ####."},
     {"role": "user", "content": "What is 12 + 30?"}],
    [{"role": "user", "content": "Add 3 and 4, and then tell me the sum."}],
    [{"role": "user", "content": "A farmer has 17 sheep and buys 25 more. How many sheep does the farmer have now, in total?"}],
]
LENGTHS = [8, 3, 5, 1, 8, 6, 2, 7, 4]  # responses cut to these lengths


@pytest.fixture
def built(tmp_path, tiny_model_dir):
    """setup() on the tiny model, plus rollouts of 3 prompts of different lengths (one with a system prompt) x G."""

    def build(**overrides):
        cfg = tiny_config(tmp_path / f"run{len(list(tmp_path.iterdir()))}", tiny_model_dir,
                          num_samples_per_prompt_rollout=G, num_unique_prompts_rollout=3, **overrides)
        run = trainer.setup(cfg)
        prompts = [Prompt(tokenize_prompt(run.tokenizer, m), m, ["42"], ["gsm8k"], "t") for m in QUESTIONS]
        torch.manual_seed(0)
        rollouts = generate_rollouts(run.policy, run.tokenizer, PromptBatch(prompts, [0, 1, 2]), num_samples=G, response_length=8,
                                     temperature=0.7, top_p=1.0, stop_strings=None, device=torch.device("cpu"))
        for i, keep in enumerate(LENGTHS):
            rollouts.response_mask[i, keep:] = 0
            rollouts.attention_mask[i, rollouts.prompt_width + keep :] = 0
        return run, rollouts

    return build


def test_groups_are_the_samples_that_share_the_prompt_columns(built):
    run, rollouts = built()
    assert len({len(p) for p in (tokenize_prompt(run.tokenizer, m) for m in QUESTIONS)}) == 3  # left padding differs
    assert group_rows(rollouts, list(range(9))) == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    assert group_rows(rollouts, [7, 0, 8, 1]) == [0, 1, 0, 1]
    # a sample whose prompt differs by one token is a group of its own
    rollouts.input_ids[4, rollouts.prompt_width - 2] += 1
    assert group_rows(rollouts, [3, 4, 5]) == [0, 1, 0]


@pytest.mark.parametrize("dtype,atol", [("float32", 2e-5), ("bfloat16", 0.01)])
def test_no_grad_log_probs_and_entropies_equal_the_per_sample_pass(built, dtype, atol):
    run, rollouts = built(policy_dtype=dtype, train_mode="lora")
    run.policy.eval()
    for rows, size in ((list(range(9)), 4), ([0, 4, 5, 8], 8), ([2], 1)):  # several groups, groups of 1 and 2, one sample
        plain, plain_h = batched_forward(run.policy, rollouts, rows, size, 0.7, entropy=True, share=False)
        shared, shared_h = batched_forward(run.policy, rollouts, rows, size, 0.7, entropy=True, share=True)
        assert plain.abs().sum() > 0 and (plain != 0).sum() == (shared != 0).sum()
        assert torch.allclose(shared, plain, atol=atol), (shared - plain).abs().max()
        assert torch.allclose(shared_h, plain_h, atol=atol), (shared_h - plain_h).abs().max()
    if dtype == "bfloat16":  # rounding, not a different function: the mean gap is far below the bound
        assert (shared - plain).abs().mean() < atol / 10


def gradients_of_one_update(run, rollouts, rows, step=False):
    """update_policy's gradients (captured instead of stepped; with `step`, captured and stepped, so that later
    mini-batches and epochs are off-policy) and metrics for the selected rows."""
    seen = []
    optimizer_step = run.optimizer.step

    def capture(*args, **kwargs):
        seen.append([None if p.grad is None else p.grad.clone() for p in run.master.optim_params])
        if step:
            optimizer_step(*args, **kwargs)

    run.optimizer.step = capture
    rewards = torch.tensor([1.0, 0.0, 0.5, 0.0, 1.0, 1.0, 0.2, 0.9, 0.4])
    advantages = rewards - rewards.view(3, G).mean(1).repeat_interleave(G)  # (N,)
    ref = None if run.reference is None else run.reference.logprobs(rollouts, rows)
    ref_full = None if ref is None else update.on_rows(rollouts, rows, ref)
    selected = select_rows(rewards, rollouts.finish_reasons, G, run.cfg, with_kl=run.reference is not None)
    selected.rows = selected.computed = rows
    metrics = update.update_policy(run, rollouts, advantages, ref_full, selected)
    return seen, metrics, ref


def close(step: int, a: torch.Tensor, b: torch.Tensor) -> bool:
    """Elementwise within 1e-5 + 1e-4 relative (one step from the same weights)."""
    return torch.allclose(b, a, atol=1e-5, rtol=1e-4)


def close_over_steps(step: int, a: torch.Tensor, b: torch.Tensor) -> bool:
    """Within 1e-4 of the gradient's own scale at the first step (measured: 2-5e-6), 1e-3 at later ones (measured: up
    to 2.7e-4; Adam turns the first steps' rounding into small differences of the weights)."""
    return bool((b - a).abs().max() <= (1e-4 if step == 0 else 1e-3) * a.abs().max() + 1e-8)


def assert_same_gradients(plain, shared, within):
    """The per-sample and shared runs' gradients (a list per optimizer step) are None alike and `within` each other
    parameter by parameter, and some are not zero."""
    assert len(plain) == len(shared) > 0
    compared = 0
    for step, (step_a, step_b) in enumerate(zip(plain, shared)):
        for a, b in zip(step_a, step_b):
            assert (a is None) == (b is None)
            if a is not None:
                assert within(step, a, b), (step, (b - a).abs().max(), a.abs().max())
                compared += int(a.abs().sum() > 0)
    assert compared > 0


@pytest.mark.parametrize("train_mode", ["full", "lora"])
@pytest.mark.parametrize("size", [1, 2, 4])
def test_gradients_losses_and_metrics_equal_the_per_sample_update(built, train_mode, size):
    """Micro-batches of 1 (a group split over three backward passes), 2 and 4 (parts of two groups); the KL term
    against the in-process reference (itself shared), the top-entropy token mask, a group of one."""
    results = {}
    for mode in ("off", "on"):
        run, rollouts = built(train_mode=train_mode, beta=0.1, per_device_train_batch_size=size, num_epochs=1,
                              num_mini_batches=1, shared_prefix=mode, top_entropy_quantile=0.5)
        rows = [0, 1, 2, 3, 4, 5, 7]  # group 2 is a group of one here
        assert shares_prefix(run.policy, mode, rollouts, rows) == (mode == "on")
        results[mode] = gradients_of_one_update(run, rollouts, rows)
    (plain, plain_metrics, plain_ref), (shared, shared_metrics, shared_ref) = results["off"], results["on"]
    assert torch.allclose(shared_ref, plain_ref, atol=2e-5)
    assert len(plain) == len(shared) == 1
    assert_same_gradients(plain, shared, close)
    assert plain_metrics.keys() == shared_metrics.keys()
    for name, value in plain_metrics.items():
        assert shared_metrics[name] == pytest.approx(value, rel=1e-4, abs=1e-6), name


@pytest.mark.parametrize("targets", [None, ["q_proj", "v_proj", "lm_head"]])  # the second: layer 0's prefix keys need no gradient
def test_off_policy_epochs_and_mini_batches_equal_the_per_sample_update(built, targets):
    """Three mini-batches x two epochs, each optimizer step taken: the old log-probs pass (shared too) and the ratios
    of the later steps are off-policy, with the entropy bonus and the KL term; LoRA on the default modules, and on
    the output layer too (its adapter reached through the chunked head); every step's gradient and the metrics
    equal the per-sample run's (close_over_steps; at 5e-2 a step Adam grows the first step's 5e-6 of rounding
    to 0.2 by the sixth, so the rate is 1e-2)."""
    results = {}
    for mode in ("off", "on"):
        run, rollouts = built(train_mode="lora", learning_rate=1e-2, beta=0.1, per_device_train_batch_size=2, num_epochs=2,
                              num_mini_batches=3, entropy_coef=0.01, shared_prefix=mode, lora_target_modules=targets)
        if targets:
            assert any("lm_head" in name and "lora_B" in name for name, p in run.policy.named_parameters() if p.requires_grad)
        results[mode] = gradients_of_one_update(run, rollouts, list(range(9)), step=True)
    (plain, plain_metrics, _), (shared, shared_metrics, _) = results["off"], results["on"]
    assert len(plain) == 6
    assert_same_gradients(plain, shared, close_over_steps)
    assert plain_metrics["train/clip_fraction"] > 0  # the later steps really are off-policy: some ratios are clipped
    for name, value in plain_metrics.items():
        assert shared_metrics[name] == pytest.approx(value, rel=1e-3, abs=1e-5), name


@pytest.mark.parametrize("train_mode", ["full", "lora"])
def test_gradients_under_gradient_checkpointing_equal_the_per_sample_update(built, train_mode):
    """--gradient_checkpointing true with the shared prefix: each checkpointed layer keeps the pass's replay-safe
    cache, the replays in the backward (the samples' and the prefix's) compute the same states, and the gradient is
    the per-sample one without checkpointing. The prefix's layers really are replayed: they run forward twice."""
    results, forwards = {}, {}
    for mode, checkpointing in (("off", False), ("on", True)):
        run, rollouts = built(train_mode=train_mode, beta=0.0, reference_mode="none", per_device_train_batch_size=2,
                              shared_prefix=mode, gradient_checkpointing=checkpointing)
        assert run.policy.is_gradient_checkpointing == checkpointing
        seen = []
        layer = next(m for m in run.policy.modules() if type(m).__name__.endswith("DecoderLayer"))
        hook = layer.register_forward_pre_hook(lambda m, args: seen.append(args[0].shape[1]))
        try:
            results[mode] = gradients_of_one_update(run, rollouts, list(range(9)))[0]
        finally:
            hook.remove()
        forwards[mode] = seen
    prefix_columns = rollouts.prompt_width - 1 - int((rollouts.attention_mask[:, : rollouts.prompt_width] == 0).sum(dim=1).min())
    assert forwards["on"].count(prefix_columns) == 2 * 3  # each group's prefix: its forward and its replay
    assert_same_gradients(results["off"], results["on"], close)


def test_reentrant_checkpointing_is_refused_not_silently_wrong(built):
    """Reentrant checkpointing would build the prefix's keys/values without a graph (its gradient lost): the
    trainer asks for non-reentrant, and a model switched to reentrant gets an error naming the fix."""
    run, rollouts = built(train_mode="full", beta=0.0, reference_mode="none", shared_prefix="on", gradient_checkpointing=True)
    run.policy.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
    with pytest.raises(RuntimeError, match="non-reentrant gradient checkpointing.*--shared_prefix off"):
        gradients_of_one_update(run, rollouts, list(range(9)))


@pytest.mark.parametrize("train_mode", ["full", "lora"])
def test_bf16_gradients_match_within_rounding(built, train_mode):
    grads = {}
    for mode in ("off", "on"):
        run, rollouts = built(policy_dtype="bfloat16", train_mode=train_mode, beta=0.0, reference_mode="none",
                              per_device_train_batch_size=2, shared_prefix=mode)
        grads[mode] = torch.cat([g.flatten() for g in gradients_of_one_update(run, rollouts, list(range(9)))[0][0] if g is not None])
    a, b = grads["off"], grads["on"]
    assert torch.nn.functional.cosine_similarity(a, b, dim=0) > 0.999
    assert (a - b).norm() < 0.02 * a.norm()


def test_the_prefix_is_forwarded_once_per_group(built):
    run, rollouts = built()
    run.policy.eval()
    output_layer(run.policy)  # its one check of the head (4 tokens) before the count
    seen = []
    hook = run.policy.get_input_embeddings().register_forward_hook(lambda m, args, out: seen.append(args[0].numel()))
    try:
        rows = list(range(9))
        batched_forward(run.policy, rollouts, rows, 9, 0.7, share=False)
        plain, seen[:] = sum(seen), []
        batched_forward(run.policy, rollouts, rows, 9, 0.7, share=True)
        shared = sum(seen)
    finally:
        hook.remove()
    p, t = rollouts.prompt_width, max(LENGTHS)
    left = int((rollouts.attention_mask[:, :p] == 0).sum(dim=1).min())
    assert plain == 9 * (p - left + t)
    assert shared == 3 * (p - 1 - left) + 9 * (t + 1)
    assert saved_fraction(rollouts, rows, group_rows(rollouts, rows)) > 0.5


def test_auto_shares_where_it_saves_work(built):
    run, rollouts = built()
    decoder = decoder_of(run.policy)
    rows = list(range(9))
    assert should_share("auto", decoder, rollouts, rows)
    assert not should_share("off", decoder, rollouts, rows)
    assert not should_share("auto", decoder, rollouts, [0, 3, 6])  # groups of one save nothing
    one_token = generate_rollouts(run.policy, run.tokenizer, PromptBatch([Prompt([5], [], ["1"], ["gsm8k"], "t")], [0]), num_samples=4,
                                  response_length=4, temperature=0.7, top_p=1.0, stop_strings=None, device=torch.device("cpu"))
    assert not should_share("auto", decoder, one_token, [0, 1, 2, 3])
    assert not should_share("on", decoder, one_token, [0, 1, 2, 3])
    assert not should_share("on", decoder, rollouts, [])  # nothing to compute
    # rows of 1-token prompts beside a longer prompt: their prefix columns are all padding, 0 columns to share
    mixed = generate_rollouts(run.policy, run.tokenizer, PromptBatch([Prompt(p, [], ["1"], ["gsm8k"], "t") for p in ([5], [6], list(range(10, 30)))],
                                                                     [0, 1, 2]), num_samples=2, response_length=4, temperature=0.7,
                              top_p=1.0, stop_strings=None, device=torch.device("cpu"))
    assert not should_share("on", decoder, mixed, [0, 1, 2, 3])
    assert should_share("on", decoder, mixed, [0, 1, 4, 5])  # with the long prompt's group there is a prefix
    plain, _ = batched_forward(run.policy, mixed, [0, 1, 4, 5], 4, 0.7, share=False)
    shared, _ = batched_forward(run.policy, mixed, [0, 1, 4, 5], 4, 0.7, share=True)
    assert torch.allclose(shared, plain, atol=2e-5)


@pytest.mark.parametrize("checkpointing", ["true", "false"])
def test_a_training_run_with_the_shared_prefix(tmp_path, tiny_model_dir, checkpointing):
    """LoRA on q_proj and v_proj only: without checkpointing (which makes the embeddings' output require a gradient)
    layer 0's prefix keys depend on no trainable weight, and the prefix's backward once failed on them."""
    data = write_rows(tmp_path / "rows.jsonl")
    base = ["--model_name_or_path", tiny_model_dir, "--dataset_mixer_list", data, "1.0", "--num_unique_prompts_rollout", "2",
            "--num_samples_per_prompt_rollout", "4", "--response_length", "8", "--num_training_steps", "2", "--policy_dtype", "float32",
            "--device", "cpu", "--output_dir", tmp_path / "out", "--beta", "0.05", "--reference_mode", "in_process"]
    proc = run_cli(*base, "--shared_prefix", "on", "--gradient_checkpointing", checkpointing, "--train_mode", "lora", "--num_epochs", "2",
                   "--lora_target_modules", "q_proj", "v_proj", "--run_name", "shared")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "step 2/2" in proc.stdout + proc.stderr  # (a layer that dropped its cache would have stopped the run: shared_prefix.py)


@pytest.mark.parametrize("mode", ["off", "on"])
def test_the_training_pass_never_allocates_the_full_logits(built, monkeypatch, mode):
    """The update's forward and backward (entropy, two temperatures for the KL) allocate no tensor of more logits
    than one chunk, per sample and shared: the (B, T, V) logits never exist (the recorder sees the naive ones exist
    in tests/test_logprobs_hidden.py)."""
    from test_logprobs_hidden import AllocationRecorder

    from open_instruct2 import logprobs
    from open_instruct2.losses import LossNorm

    run, rollouts = built(train_mode="lora", beta=0.1, per_device_train_batch_size=9, shared_prefix=mode)
    vocab = run.policy.get_output_embeddings().weight.shape[0]
    bound = 8 * vocab  # a micro-batch of 9 x 8 response tokens is 9 chunks
    monkeypatch.setattr(logprobs, "CHUNK_ELEMENTS", bound)
    rows = list(range(9))
    ref = update.on_rows(rollouts, rows, run.reference.logprobs(rollouts, rows))
    norm = LossNorm(num_tokens=int(rollouts.response_mask.sum()), num_sequences=9, max_response_length=8)
    recorder = AllocationRecorder(vocab)
    with recorder:
        update.backward_mini_batch(run.policy, run.master, rollouts, rows, norm, torch.randn(9), None, ref, run.cfg,
                                   defaultdict(lambda: torch.zeros(())), kl_temperature=1.0)
    largest = max(recorder.largest.values())
    assert 0 < largest <= bound < 9 * 8 * vocab, largest
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in run.policy.parameters())
