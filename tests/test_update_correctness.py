"""The update the README promises: one test (or more) per finding of the review of the GRPO math and
data flow (temperature, generation settings, schedule, format-only reward, filtered groups, dropout, bf16
accumulation, numerical guards, reference replies, hot-path waste)."""

import json
import shutil
from collections import defaultdict

import pytest
import torch
from transformers import AutoModelForCausalLM

from conftest import tiny_config
from open_instruct2 import trainer, update
from open_instruct2.data import Prompt, PromptBatch, tokenize_prompt
from open_instruct2.logprobs import token_logprobs
from open_instruct2.losses import LossNorm, grpo_loss
from open_instruct2.policy import optimizer_groups, response_logprobs
from open_instruct2.reference import batched_logprobs
from open_instruct2.rollout import generate_rollouts, ignored_generation_settings
from open_instruct2.update import LossRows, select_rows

ADV = torch.tensor([1.0, -1.0, 0.5, -0.5, 2.0, -2.0])


@pytest.fixture
def built(tmp_path, tiny_model_dir):
    """setup() on the tiny model, plus rollouts of 2 prompts x 3 samples with response lengths 8, 3, 5, 1, 8, 6."""

    def build(**overrides):
        cfg = tiny_config(tmp_path / f"run{len(list(tmp_path.iterdir()))}", tiny_model_dir, **overrides)
        run = trainer.setup(cfg)
        torch.manual_seed(0)
        batch = trainer.next_batch(run.prompts, run.sampler, cfg.rollout.num_unique_prompts_rollout)
        rollouts = generate_rollouts(
            run.policy, run.tokenizer, batch, num_samples=cfg.rollout.num_samples_per_prompt_rollout,
            response_length=cfg.rollout.response_length, temperature=cfg.rollout.temperature, top_p=1.0, stop_strings=None,
            device=torch.device("cpu"),
        )
        for i, keep in enumerate([8, 3, 5, 1, 8, 6]):
            rollouts.response_mask[i, keep:] = 0
            rollouts.attention_mask[i, rollouts.prompt_width + keep :] = 0
        return run, rollouts

    return build


def captured_gradients(run):
    """Make optimizer steps record the (master) gradients instead of stepping."""
    seen = []
    run.optimizer.step = lambda *a, **k: seen.append([None if p.grad is None else p.grad.clone() for p in run.master.optim_params])
    return seen


def naive_logprobs(model, rollouts, rows, temperature):
    """log_softmax(logits / T) of each row alone, unpadded: the definition."""
    out = []
    for r in rows:
        keep = rollouts.attention_mask[r].bool()
        ids = rollouts.input_ids[r][keep].unsqueeze(0)
        n = int(rollouts.response_mask[r].sum())
        with torch.no_grad():
            logits = model(ids).logits[0, -n - 1 : -1].double() / temperature
        out.append(logits.log_softmax(-1).gather(-1, ids[0, -n:].unsqueeze(-1)).squeeze(-1).float())
    return out


# ---------------------------------------------------------------- 1. temperature


def test_token_logprobs_match_the_definition_and_autograd():
    torch.manual_seed(0)
    logits = torch.randn(2, 3, 11, dtype=torch.float64, requires_grad=True)
    targets = torch.randint(0, 11, (2, 3))
    expected = (logits / 0.7).log_softmax(-1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    assert torch.allclose(token_logprobs(logits, targets, 0.7), expected, atol=1e-12)
    assert torch.autograd.gradcheck(lambda x: token_logprobs(x, targets, 0.7), (logits,))
    # bf16 logits: the log-normaliser is taken in fp32, the gradient comes back in bf16
    low = logits.detach().to(torch.bfloat16).requires_grad_(True)
    values = token_logprobs(low, targets, 0.7)
    assert values.dtype == torch.float32
    values.sum().backward()
    reference = logits.detach().to(torch.bfloat16).double().requires_grad_(True)
    token_logprobs(reference, targets, 0.7).sum().backward()
    assert low.grad.dtype == torch.bfloat16 and torch.allclose(low.grad.double(), reference.grad, atol=1e-2)


def test_policy_and_in_process_reference_log_probs_are_at_the_sampling_temperature(built):
    run, rollouts = built(temperature=0.7, train_mode="full", beta=0.1)
    rows = list(range(6))
    expected = naive_logprobs(run.reference.model, rollouts, rows, 0.7)
    ref = run.reference.logprobs(rollouts, rows)
    policy = batched_logprobs(run.policy.eval(), rollouts, rows, 4, 0.7)
    raw = naive_logprobs(run.reference.model, rollouts, rows, 1.0)
    for r in rows:
        n = len(expected[r])
        assert torch.allclose(ref[r, :n], expected[r], atol=1e-5)
        assert torch.allclose(policy[r, :n], expected[r], atol=1e-5)
        assert not torch.allclose(ref[r, :n], raw[r], atol=1e-3)  # temperature 1 would be a different distribution


# ---------------------------------------------------------------- 2. generation settings


def test_the_models_generation_config_does_not_leak_into_sampling(tmp_path, tiny_model_dir, tokenizer):
    poisoned_dir = tmp_path / "poisoned"
    shutil.copytree(tiny_model_dir, poisoned_dir)
    settings = {"repetition_penalty": 5.0, "no_repeat_ngram_size": 1, "min_p": 0.3, "top_k": 2, "min_new_tokens": 12}
    (poisoned_dir / "generation_config.json").write_text(json.dumps({**settings, "do_sample": True, "eos_token_id": 2}))
    clean = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir)).eval()
    poisoned = AutoModelForCausalLM.from_pretrained(str(poisoned_dir)).eval()
    assert ignored_generation_settings(poisoned) == {"do_sample": True, **settings}
    messages = [{"role": "user", "content": "Count to ten."}]
    batch = PromptBatch([Prompt(tokenize_prompt(tokenizer, messages), messages, ["1"], ["gsm8k"], "t")], [0])

    def sample(model):
        torch.manual_seed(5)
        return generate_rollouts(model, tokenizer, batch, num_samples=4, response_length=16, temperature=0.7, top_p=1.0,
                                 stop_strings=None, device=torch.device("cpu")).input_ids

    assert torch.equal(sample(poisoned), sample(clean))
    assert poisoned.generation_config.repetition_penalty == 5.0  # restored: a saved model keeps its own file
    from peft import LoraConfig, get_peft_model

    wrapped = get_peft_model(poisoned, LoraConfig(r=2, target_modules=["q_proj"]))  # lora_B = 0: same outputs
    assert torch.equal(sample(wrapped), sample(clean))
    assert wrapped.get_base_model().generation_config.repetition_penalty == 5.0


# ---------------------------------------------------------------- 3. learning-rate schedule


def lrs_and_steps(tmp_path, tiny_model_dir, **overrides):
    cfg = tiny_config(tmp_path, tiny_model_dir, reference_mode="none", beta=0.0, warm_up_steps=2, num_training_steps=4,
                      num_mini_batches=2, log_samples_freq=-1, **overrides)
    run_dir = trainer.train(cfg)
    lines = [json.loads(line) for line in open(f"{run_dir}/metrics.jsonl")]
    return [m["train/lr"] for m in lines], [m["train/optimizer_steps"] for m in lines]


def test_the_schedule_follows_training_steps_and_logs_the_rate_used(tmp_path, tiny_model_dir):
    """linear, warm-up 2 of 4 training steps: the rates used are lr x [0, 1/2, 1, 1/2], whatever number of
    optimizer steps each training step makes: none at all here (the tiny model never answers right, so
    every group has equal rewards and beta is 0) ..."""
    lrs, steps = lrs_and_steps(tmp_path / "a", tiny_model_dir)
    assert steps == [0, 0, 0, 0]
    assert lrs == pytest.approx([0.0, 5e-4, 1e-3, 5e-4])
    # ... or two per step (two mini-batches, every group kept)
    lrs, steps = lrs_and_steps(tmp_path / "b", tiny_model_dir, filter_zero_std_groups=False)
    assert steps == [2, 2, 2, 2]
    assert lrs == pytest.approx([0.0, 5e-4, 1e-3, 5e-4])


# ---------------------------------------------------------------- 5. filtered groups and denominators


def test_filtering_changes_no_gradient_and_a_lone_group_is_not_a_full_strength_update(built):
    run, rollouts = built(beta=0.0, reference_mode="none", train_mode="full", max_grad_norm=0.0)  # no clipping
    rewards = torch.tensor([1.0, 0.0, 1.0, 0.0, 0.0, 0.0])  # the second group has no signal
    advantages = trainer.compute_advantages(rewards, 3, "standard")
    assert advantages[3:].tolist() == [0.0, 0.0, 0.0]

    def gradient(filtering, rows=None):
        run.cfg.optim.filter_zero_std_groups = filtering
        selected = rows or select_rows(rewards, ["stop"] * 6, 3, run.cfg, with_kl=False)
        seen = captured_gradients(run)
        update.update_policy(run, rollouts, advantages, None, selected)
        [grads] = seen
        return torch.cat([g.flatten() for g in grads])

    filtered, kept = gradient(True), gradient(False)
    assert torch.allclose(filtered, kept, atol=1e-7) and filtered.abs().sum() > 0
    # the first group alone, as if the other had never been sampled: its gradient divided by its own tokens
    alone = gradient(True, LossRows([0, 1, 2], [0, 1, 2]))
    tokens = rollouts.response_mask.sum(1)  # 8, 3, 5 | 1, 8, 6
    share = float(tokens[:3].sum() / tokens.sum())  # 16 / 31
    assert torch.allclose(filtered, share * alone, atol=5e-6)  # the shared prefix (default) rounds its sums in another order


def test_the_kl_term_stays_on_filtered_groups(built):
    run, rollouts = built(beta=0.5, kl_estimator="kl1", reference_mode="in_process", train_mode="full", max_grad_norm=0.0)
    rewards = torch.zeros(6)  # every group filtered: only the KL term is left
    selected = select_rows(rewards, ["stop"] * 6, 3, run.cfg, with_kl=True)
    assert selected.computed == selected.rows == list(range(6))
    assert select_rows(rewards, ["stop"] * 6, 3, run.cfg, with_kl=False).computed == []
    ref = trainer.on_rows(rollouts, selected.computed, run.reference.logprobs(rollouts, selected.computed) - 0.3)
    seen = captured_gradients(run)
    metrics = update.update_policy(run, rollouts, torch.zeros(6), ref, selected)
    assert metrics["train/optimizer_steps"] == 1.0
    assert metrics["train/kl"] == pytest.approx(0.3, abs=1e-4)  # kl1 = logp - ref = 0.3 on every token of every row
    assert torch.cat([g.flatten() for g in seen[0]]).abs().sum() > 0


def test_filtered_group_fraction_is_logged_only_when_filtering(built):
    from open_instruct2.rewards import Scores

    run, rollouts = built()
    # hand-made rewards: the first group has a signal, the second does not; one sample of the first is unscored
    rewards = torch.tensor([1.0, 0.0, 0.0, 2.0, 2.0, 2.0])
    scores = Scores(rewards=rewards, breakdown={"verifiable": rewards}, verifier_scores=rewards / 10, verifier_errors=0)
    sel = LossRows(list(range(6)), [0, 1, 2])
    on = trainer.step_metrics(scores, rollouts, sel, 3, {}, {"rollout": 1.0}, 1e-3, filtering=True)
    off = trainer.step_metrics(scores, rollouts, sel, 3, {}, {"rollout": 1.0}, 1e-3, filtering=False)
    assert "rollout/filtered_group_fraction" in on and "rollout/filtered_group_fraction" not in off
    assert on["rollout/zero_std_group_fraction"] == 0.5 and on["rollout/filtered_group_fraction"] == 0.5  # one group of two
    with_kl = trainer.step_metrics(scores, rollouts, sel, 3, {}, {"rollout": 1.0}, 1e-3, filtering=True, with_kl=True)
    assert with_kl["rollout/filtered_group_fraction"] == 0.0  # a KL term keeps every group in the update: none filtered
    scores.valid = torch.tensor([True, False, False, True, True, True])  # the first group keeps one valid sample: no signal either
    assert trainer.step_metrics(scores, rollouts, sel, 3, {}, {"rollout": 1.0}, 1e-3, filtering=True)["rollout/zero_std_group_fraction"] == 1.0


def test_what_filtering_changes_with_several_mini_batches(built):
    """The README's claim made exact. beta 0, two mini-batches, the first group rewarded once, the second with no
    signal: while each mini-batch holds a sample with a signal, filtering the second group leaves the update as it
    was without filtering. A mini-batch holding only the no-signal group is where they differ: filtered, it makes no
    optimizer step; unfiltered, it takes an AdamW step on a zero gradient, which still moves the weights (the
    momentum of the mini-batch before)."""
    rewards = torch.tensor([1.0, 0.0, 0.0, 0.0, 0.0, 0.0])

    def weights_after(filtering, seed):
        run, rollouts = built(beta=0.0, reference_mode="none", train_mode="full", num_mini_batches=2, filter_zero_std_groups=filtering)
        selected = select_rows(rewards, ["stop"] * 6, 3, run.cfg, with_kl=False)
        assert selected.computed == ([0, 1, 2] if filtering else list(range(6)))
        torch.manual_seed(seed)  # the mini-batches: halves of torch.randperm(6) after this seed
        metrics = update.update_policy(run, rollouts, trainer.compute_advantages(rewards, 3, "standard"), None, selected)
        return torch.cat([p.detach().flatten() for p in run.policy.parameters()]), metrics["train/optimizer_steps"]

    # seed 1: mini-batches {1, 5, 2} and {0, 3, 4}: both hold a sample of the rewarded group
    (a, steps_a), (b, steps_b) = weights_after(True, 1), weights_after(False, 1)
    assert steps_a == steps_b == 2 and torch.allclose(a, b, rtol=0, atol=1e-6)
    # seed 24: mini-batches {2, 1, 0} and {4, 5, 3}: the second holds only the group with no signal
    (a, steps_a), (b, steps_b) = weights_after(True, 24), weights_after(False, 24)
    assert (steps_a, steps_b) == (1, 2)
    assert float((a - b).abs().max()) > 1e-4  # lr 1e-3: the unfiltered zero-gradient step moved the weights


# ---------------------------------------------------------------- 6. dropout


def test_no_dropout_in_any_pass(built):
    run, rollouts = built(train_mode="lora", lora_r=4, lora_dropout=0.5)
    assert run.policy.peft_config["default"].lora_dropout == 0.5  # still written into the adapter's config
    with torch.no_grad():  # lora_B starts at 0, which would hide the adapters' dropout
        for name, param in run.policy.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.5)
    part = rollouts.rows(list(range(6)))
    run.policy.train()
    first = response_logprobs(run.policy, part.input_ids, part.attention_mask, part.prompt_width, 0.7)
    second = response_logprobs(run.policy, part.input_ids, part.attention_mask, part.prompt_width, 0.7)
    run.policy.eval()
    evaluated = response_logprobs(run.policy, part.input_ids, part.attention_mask, part.prompt_width, 0.7)
    assert torch.equal(first, second) and torch.allclose(first, evaluated, atol=1e-6)


# ---------------------------------------------------------------- 7. fp32 accumulation, weight-decay groups


def test_bf16_gradients_accumulate_in_fp32(tmp_path, tiny_model_dir, tokenizer):
    """64 micro-batches of one sequence on a bf16 policy: the accumulated gradient equals the exact sum of
    the 64 bf16 micro-batch gradients (summing in bf16 drifts by ~1% at 64)."""
    cfg = tiny_config(tmp_path, tiny_model_dir, policy_dtype="bfloat16", train_mode="full", reference_mode="none", beta=0.0,
                      num_unique_prompts_rollout=2, num_samples_per_prompt_rollout=32, response_length=4,
                      shared_prefix="off")  # per-sample micro-batches (the shared prefix's fp32 sums: test_shared_prefix.py)
    run = trainer.setup(cfg)
    batch = trainer.next_batch(run.prompts, run.sampler, 2)
    torch.manual_seed(0)
    rollouts = generate_rollouts(run.policy, run.tokenizer, batch, num_samples=32, response_length=4, temperature=1.0,
                                 top_p=1.0, stop_strings=None, device=torch.device("cpu"))
    advantages = torch.randn(64)
    norm = LossNorm(num_tokens=int(rollouts.response_mask.sum()), num_sequences=64, max_response_length=4)
    exact = None
    for r in range(64):  # each micro-batch's own bf16 gradient, summed in float64
        run.policy.zero_grad(set_to_none=True)
        part = rollouts.rows([r])
        logprobs = response_logprobs(run.policy, part.input_ids, part.attention_mask, part.prompt_width, cfg.rollout.temperature)
        loss, _ = grpo_loss(logprobs, logprobs.detach(), None, advantages[[r]], part.response_mask, norm, clip_lower=0.2,
                            clip_higher=0.2, beta=0.0, kl_estimator="kl3", aggregation="token_mean",
                            sampler_logprobs=rollouts.sampler_logprobs[[r], : logprobs.shape[1]],  # generate's own, as the update uses
                            importance_cap=cfg.rollout.importance_sampling_cap)
        loss.backward()
        grads = [p.grad.double() for p, _ in run.master.pairs]
        exact = grads if exact is None else [a + b for a, b in zip(exact, grads)]
    run.policy.zero_grad(set_to_none=True)
    update.backward_mini_batch(run.policy, run.master, rollouts, list(range(64)), norm, advantages, None, None, cfg,
                               defaultdict(lambda: torch.zeros(())))
    got = torch.cat([m.grad.double().flatten() for _, m in run.master.pairs])
    want = torch.cat([g.flatten() for g in exact])
    assert float((got - want).norm() / want.norm()) < 1e-5


def test_weight_decay_skips_norms_biases_and_embeddings(built):
    run, _ = built(train_mode="full", weight_decay=0.1)
    groups = optimizer_groups(run.policy, run.master, 0.1)
    names = {id(p): n for n, p in run.policy.named_parameters()}
    decayed = {names[id(p)] for p in groups[0]["params"]}
    free = {names[id(p)] for p in groups[1]["params"]}
    assert groups[0]["weight_decay"] == 0.1 and groups[1]["weight_decay"] == 0.0
    assert "model.embed_tokens.weight" in free and all("norm" in n or "embed" in n for n in free)
    assert all(n.endswith("proj.weight") for n in decayed) and len(decayed) == 2 * 7
    assert [g["weight_decay"] for g in run.optimizer.param_groups] == [0.1, 0.0]


# ---------------------------------------------------------------- 10. the hot path


def count_forwards(monkeypatch):
    """(rows, response columns) of every log-prob computation (policy.hidden_token_logprobs)."""
    from open_instruct2 import policy

    shapes = []
    original = policy.hidden_token_logprobs

    def recorded(hidden, head, targets, *args, **kwargs):
        shapes.append(tuple(targets.shape))
        return original(hidden, head, targets, *args, **kwargs)

    monkeypatch.setattr(policy, "hidden_token_logprobs", recorded)
    return shapes


def test_no_grad_passes_use_the_inference_batch_and_micro_batches_are_sorted_by_length(built, monkeypatch):
    run, rollouts = built(train_mode="full", reference_mode="none", beta=0.0, num_epochs=2, per_device_train_batch_size=2,
                          inference_batch_size=6, shared_prefix="off")  # the per-sample passes (shared: test_shared_prefix.py)
    calls = count_forwards(monkeypatch)
    update.update_policy(run, rollouts, ADV, None, LossRows(list(range(6)), list(range(6))))
    # one no-grad forward for the old log-probs of all six rows, then 2 epochs x 3 micro-batches of 2 rows;
    # sorted by length (1, 3 | 5, 6 | 8, 8), each micro-batch takes log-probs for its longest response only
    assert calls == [(6, 8)] + [(2, 3), (2, 6), (2, 8)] * 2


def test_generation_does_not_decode_per_token(built, tokenizer):
    run, _ = built(train_mode="full")
    batch = trainer.next_batch(run.prompts, run.sampler, 2)
    decodes = []
    original = run.tokenizer.decode
    run.tokenizer.decode = lambda *a, **k: decodes.append(1) or original(*a, **k)
    rollouts = generate_rollouts(run.policy, run.tokenizer, batch, num_samples=3, response_length=16, temperature=1.0, top_p=1.0,
                                 stop_strings=["####", "\n\n"], device=torch.device("cpu"))
    assert len(decodes) <= 6  # the final texts only; stop strings are matched on token ids
    assert all(len(t) > 0 for t in rollouts.response_texts)


def test_a_stop_string_never_fires_on_the_prompt(tiny_model_dir, tokenizer):
    """The prompt ends in "\\n"; a first response token "\\n" must not count as the stop string "\\n\\n"."""
    model = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir)).eval()
    newline = tokenizer.encode("\n", add_special_tokens=False)
    prompt = tokenizer.encode("Hello\n", add_special_tokens=False)
    assert tokenizer.decode(prompt).endswith("\n") and len(newline) == 1
    bias = torch.zeros(model.config.vocab_size)
    bias[newline[0]] = 50.0  # the model now says "\n" at every step
    model.lm_head.register_forward_hook(lambda m, i, out: out + bias)
    batch = PromptBatch([Prompt(prompt, [], ["1"], ["gsm8k"], "t")], [0])
    torch.manual_seed(0)
    r = generate_rollouts(model, tokenizer, batch, num_samples=2, response_length=8, temperature=1.0, top_p=1.0,
                          stop_strings=["\n\n"], device=torch.device("cpu"))
    assert r.response_mask.sum(1).tolist() == [2, 2] and r.finish_reasons == ["stop", "stop"]
    assert r.response_texts == ["\n\n", "\n\n"]
