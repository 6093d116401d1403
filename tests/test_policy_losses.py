"""The policy-loss variants (clip with dual clip, gspo, cispo, sapo), entropy, top-entropy tokens and batch scaling,
checked against values and gradients written out by hand in numpy float64, then through the update and the CLI."""

import json
import math
from collections import defaultdict

import numpy as np
import pytest
import torch

from conftest import run_cli, tiny_config, write_rows
from open_instruct2 import losses as L
from open_instruct2 import trainer, update
from open_instruct2.policy import response_logprobs_at
from open_instruct2.rollout import generate_rollouts
from open_instruct2.train_grpo import main

# Three sequences (the last two padded), ratios on both sides of the [0.8, 1.2] clip bounds and inside them.
MASK = np.array([[1, 1, 1, 1], [1, 1, 0, 0], [1, 1, 1, 0]], dtype=float)
RATIOS = np.array([[1.5, 0.5, 1.1, 0.95], [0.7, 1.6, 1.0, 1.0], [1.25, 0.85, 1.0, 1.0]])
OLD = np.array([[-1.0, -2.0, -0.5, -3.0], [-1.5, -0.2, -9.0, -9.0], [-0.7, -1.1, -2.2, -9.0]])
LOGP = OLD + np.log(RATIOS)
REF = OLD + np.array([[0.3, -0.4, 0.1, 0.2], [-0.2, 0.5, 0.0, 0.0], [0.1, 0.1, -0.3, 0.0]])
SAMPLER = OLD + np.array([[0.2, -0.9, 0.05, 0.0], [-0.1, 0.3, 0.0, 0.0], [0.4, -0.2, 0.1, 0.0]])  # weights e^-0.2 .. e^0.9
ADVANTAGES = [np.array([1.0, -2.0, -0.5]), np.array([-1.0, -2.0, 0.5])]  # both signs, on every row across the two


def by_hand(variant, adv, *, lo=0.2, hi=0.2, c=0.0, tau=(1.0, 1.05), agg="token_mean", beta=0.0, cap=0.0):
    """(loss, d loss / d logp (B, T), cut (B, T)) in float64, every formula written out."""
    r, A, m = np.exp(LOGP - OLD), adv[:, None], MASK
    if variant in ("clip", "gspo"):
        if variant == "gspo":  # one ratio per sequence, the mean log-ratio over its tokens; each token carries it
            r = np.exp(((LOGP - OLD) * m).sum(1, keepdims=True) / m.sum(1, keepdims=True)) * np.ones_like(LOGP)
        unclipped, clipped = -A * r, -A * np.clip(r, 1 - lo, 1 + hi)
        per_token = np.maximum(unclipped, clipped)
        grad = np.where(unclipped >= clipped, -A * r, 0.0)  # d(s_i token form)/d logp_t = s_i; clipped: no gradient
        cut = clipped > unclipped
        if c > 0:  # dual clip: A < 0 and -A r > -A c
            held = (A < 0) & (per_token > -A * c)
            per_token, grad = np.where(held, -A * c, per_token), np.where(held, 0.0, grad)
    elif variant == "cispo":
        weight = np.minimum(r, hi)
        per_token, grad, cut = -weight * A * LOGP, -weight * A * np.ones_like(LOGP), r > hi
    else:  # sapo
        t = np.where(A > 0, tau[0], tau[1])
        gate = 1 / (1 + np.exp(-t * (r - 1)))
        per_token, grad = -(4 / t) * gate * A, -4 * gate * (1 - gate) * r * A
        cut = 4 * gate * (1 - gate) < 0.5
    if cap > 0:
        w = np.minimum(np.exp(OLD - SAMPLER), cap)
        per_token, grad = per_token * w, grad * w
    if beta:
        d = LOGP - REF  # kl3 = exp(-d) - 1 + d, d kl3 / d logp = 1 - exp(-d)
        per_token, grad = per_token + beta * (np.exp(-d) - 1 + d), grad + beta * (1 - np.exp(-d))
    if agg == "token_mean":
        scale = m / m.sum()
    else:  # sequence_mean
        scale = m / m.sum(1, keepdims=True) / len(m)
    return float((per_token * scale).sum()), grad * scale, cut & (m > 0)


def ours(variant, adv, *, lo=0.2, hi=0.2, c=0.0, tau=(1.0, 1.05), agg="token_mean", beta=0.0, cap=0.0):
    logp = torch.tensor(LOGP, requires_grad=True)
    mask = torch.tensor(MASK, dtype=torch.long)
    norm = L.LossNorm(num_tokens=int(MASK.sum()), num_sequences=3, max_response_length=4)
    loss, metrics = L.grpo_loss(logp, torch.tensor(OLD), torch.tensor(REF) if beta else None, torch.tensor(adv), mask, norm,
                                clip_lower=lo, clip_higher=hi, beta=beta, kl_estimator="kl3", aggregation=agg,
                                sampler_logprobs=torch.tensor(SAMPLER) if cap else None, importance_cap=cap, policy_loss=variant,
                                clip_ratio_c=c, sapo_temperatures=tau)
    loss.backward()
    return loss.item(), logp.grad.numpy() * MASK, metrics


CASES = [
    ("clip", {}),
    ("clip", {"c": 1.4}),  # row 1 (A = -2, ratio 1.6 > c) is held at -c A
    ("clip", {"hi": 0.28}),  # clip-higher
    ("gspo", {"lo": 0.01, "hi": 0.01, "agg": "sequence_mean"}),
    ("gspo", {"lo": 3e-4, "hi": 4e-4, "agg": "sequence_mean"}),  # the paper's tiny bounds
    ("cispo", {"hi": 1.3}),  # a cap that binds on 1.5 and 1.6 (MiniMax's is ~5)
    ("cispo", {"hi": 5.0}),
    ("sapo", {}),
    ("sapo", {"tau": (0.5, 2.0)}),
]


@pytest.mark.parametrize("variant,kw", CASES, ids=[f"{v}-{kw}" for v, kw in CASES])
@pytest.mark.parametrize("extra", [{}, {"beta": 0.1, "cap": 2.0}], ids=["alone", "with-kl-and-importance-weights"])
def test_each_variant_against_values_by_hand(variant, kw, extra):
    cuts = []
    for adv in ADVANTAGES:
        want_loss, want_grad, want_cut = by_hand(variant, adv, **kw, **extra)
        got_loss, got_grad, metrics = ours(variant, adv, **kw, **extra)
        assert got_loss == pytest.approx(want_loss, rel=1e-10, abs=1e-12)
        np.testing.assert_allclose(got_grad, want_grad, rtol=1e-9, atol=1e-12)
        assert metrics["clip_fraction"].item() == pytest.approx(want_cut.sum())
        cuts.append(want_cut[MASK > 0])
    cut = np.concatenate(cuts)
    if variant != "sapo" and kw.get("hi") != 5.0:  # the cases bound some tokens and leave others
        assert cut.any() and not cut.all()


def test_the_variants_differ_where_their_papers_say():
    adv = ADVANTAGES[0]
    clip_grad, cispo_grad = ours("clip", adv)[1], ours("cispo", adv, hi=1.3)[1]
    # token (0, 0): A > 0, ratio 1.5 beyond 1.2: clip gives no gradient, CISPO still does (its weight capped at 1.3)
    assert clip_grad[0, 0] == 0 and cispo_grad[0, 0] == pytest.approx(-1.3 * 1.0 / MASK.sum())
    # dual clip changes only row 1 (A < 0, ratio 1.6 > 1.4)
    plain, dual = ours("clip", adv)[1], ours("clip", adv, c=1.4)[1]
    assert dual[1, 1] == 0 and plain[1, 1] != 0 and np.array_equal(np.delete(plain, 1, 0), np.delete(dual, 1, 0))
    metrics = ours("clip", adv, c=1.4)[2]
    assert metrics["dual_clip_fraction"].item() == 1.0  # a sum: one token
    # SAPO at ratio 1 has the plain policy gradient -A: its gate's slope there is 1
    logp = torch.zeros(1, 1, requires_grad=True)
    loss, _ = L.grpo_loss(logp, torch.zeros(1, 1), None, torch.tensor([2.0]), torch.ones(1, 1), L.LossNorm(1, 1, 1),
                          clip_lower=0.2, clip_higher=0.2, beta=0.0, kl_estimator="kl3", aggregation="token_mean", policy_loss="sapo")
    loss.backward()
    assert logp.grad.item() == pytest.approx(-2.0)


def test_batch_scaling_divides_by_the_batch_std():
    rewards = torch.tensor([1.0, 0.0, 0.0, 0.0, 1.0, 1.0, 0.0, 1.0])  # two groups of 4
    adv = L.compute_advantages(rewards, 4, "batch")
    means = np.array([0.25] * 4 + [0.75] * 4)
    want = (rewards.numpy() - means) / (rewards.numpy().std() + 1e-8)  # population std of all 8: 0.5
    np.testing.assert_allclose(adv.numpy(), want, rtol=1e-6)
    valid = torch.tensor([True] * 7 + [False])  # an invalid sample leaves the std and its group mean
    adv = L.compute_advantages(rewards, 4, "batch", valid)
    std = rewards[:7].numpy().std()
    assert adv[4].item() == pytest.approx((1 - 2 / 3) / std, rel=1e-5) and adv[7].item() == 0.0


def test_top_entropy_mask_keeps_the_top_fraction_of_valid_tokens():
    entropy = torch.tensor([[0.1, 0.9, 0.5, 7.0], [0.8, 0.3, 0.0, 0.0]])
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]])  # the 7.0 is padding and must not count
    assert L.top_entropy_mask(entropy, mask, 0.5).tolist() == [[False, True, True, False], [True, False, False, False]]
    assert L.top_entropy_mask(entropy, mask, 0.2).tolist() == [[False, True, False, False], [False] * 4]  # ceil(0.2 * 5) = 1
    assert L.top_entropy_mask(entropy, mask, 1.0).tolist() == mask.bool().tolist()


# ---------------------------------------------------------------- through the update, on the tiny model


@pytest.fixture
def rollout_batch(tmp_path, tiny_model_dir):
    def build(**overrides):
        cfg = tiny_config(tmp_path / f"run{len(list(tmp_path.iterdir()))}", tiny_model_dir, reference_mode="none", beta=0.0,
                          num_unique_prompts_rollout=2, num_samples_per_prompt_rollout=3, response_length=6, **overrides)
        run = trainer.setup(cfg)
        torch.manual_seed(0)
        batch = trainer.next_batch(run.prompts, run.sampler, 2)
        rollouts = generate_rollouts(run.policy, run.tokenizer, batch, num_samples=3, response_length=6, temperature=cfg.rollout.temperature,
                                     top_p=1.0, stop_strings=None, device=torch.device("cpu"))
        for i, keep in enumerate([6, 2, 4, 1, 6, 5]):  # padded rows of different lengths
            rollouts.response_mask[i, keep:] = 0
            rollouts.attention_mask[i, rollouts.prompt_width + keep :] = 0
        return run, rollouts

    return build


def full_softmax(run, rollouts, temperature):
    """Per row: the entropy of softmax(logits / T) at each response token, and the log-prob of the sampled one, from
    the full float64 softmax of the row alone (unpadded)."""
    entropies, logps = [], []
    for r in range(len(rollouts.finish_reasons)):
        keep = rollouts.attention_mask[r].bool()
        ids = rollouts.input_ids[r][keep].unsqueeze(0)
        n = int(rollouts.response_mask[r].sum())
        with torch.no_grad():
            logp = (run.policy(ids).logits[0, -n - 1 : -1].double() / temperature).log_softmax(-1)
        entropies.append(-(logp.exp() * logp).sum(-1))
        logps.append(logp)
    return entropies, logps


def test_the_entropy_metric_equals_a_full_softmax(rollout_batch):
    run, rollouts = rollout_batch(per_device_train_batch_size=2)
    temperature = run.cfg.rollout.temperature
    entropies, _ = full_softmax(run, rollouts, temperature)
    want = float(torch.cat(entropies).mean())
    part = rollouts.rows(list(range(6)))
    (_,), entropy = response_logprobs_at(run.policy, part.input_ids, part.attention_mask, part.prompt_width, (temperature,), entropy=True)
    got = [entropy[r, : len(e)].double() for r, e in enumerate(entropies)]
    torch.testing.assert_close(torch.cat(got), torch.cat(entropies), rtol=1e-5, atol=1e-5)
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 0.0, 1.0])
    selected = update.select_rows(rewards, rollouts.finish_reasons, 3, run.cfg, with_kl=False)
    metrics = update.update_policy(run, rollouts, L.compute_advantages(rewards, 3, "standard"), None, selected)
    assert metrics["train/entropy"] == pytest.approx(want, rel=1e-5)  # a token mean over the 24 response tokens


def test_top_entropy_tokens_and_the_entropy_bonus_in_the_update(rollout_batch):
    """--top_entropy_quantile 0.5 with micro-batches of 2: the gradient is the one of the loss whose policy-gradient term
    is on the top half of the mini-batch's tokens by the pre-update entropy; --entropy_coef adds -coef x entropy."""
    run, rollouts = rollout_batch(per_device_train_batch_size=2, top_entropy_quantile=0.5, entropy_coef=0.01, max_grad_norm=0.0)
    rollouts.sampler_logprobs = None  # no importance weights: the policy-gradient term is -A on the kept tokens
    temperature = run.cfg.rollout.temperature
    entropies, logps = full_softmax(run, rollouts, temperature)
    flat = torch.cat(entropies)
    k = math.ceil(0.5 * flat.numel())
    threshold = torch.topk(flat, k).values.min()
    advantages = torch.tensor([1.0, -0.5, -0.5, 2.0, -1.0, -1.0])
    # by hand: sum over tokens of (-A [entropy >= threshold] - 0.01 entropy) / tokens, per row alone, in float64
    want_loss = 0.0
    for r, (h, lp) in enumerate(zip(entropies, logps)):
        want_loss += float(((-advantages[r] * (h >= threshold).double()) - 0.01 * h).sum()) / flat.numel()
    run.policy.zero_grad(set_to_none=True)
    rows = list(range(6))
    loss_by_hand = 0.0
    for r in rows:  # the same loss through autograd on each row alone (the definition), summed
        part = rollouts.rows([r])
        (logp,), h = response_logprobs_at(run.policy, part.input_ids, part.attention_mask, part.prompt_width, (temperature,), entropy=True)
        m = part.response_mask.bool()
        top = (entropies[r] >= threshold).float()
        term = (-advantages[r] * torch.exp(logp - logp.detach())[m] * top - 0.01 * h[m]).sum() / flat.numel()
        term.backward()
        loss_by_hand += term.item()
    assert loss_by_hand == pytest.approx(want_loss, rel=1e-4)
    want_grads = [p.grad.clone() for p in run.master.optim_params]
    run.policy.zero_grad(set_to_none=True)
    seen = []
    run.optimizer.step = lambda *a, **kw: seen.append([p.grad.clone() for p in run.master.optim_params])
    selected = update.LossRows(rows=rows, computed=rows)
    metrics = update.update_policy(run, rollouts, advantages, None, selected)
    assert metrics["train/pg_token_fraction"] == pytest.approx(k / flat.numel())
    for got, want in zip(seen[0], want_grads):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)


# ---------------------------------------------------------------- the CLI


def variant_args(variant):
    return {"clip": ["--clip_ratio_c", "3.0", "--entropy_coef", "0.001"],
            "gspo": ["--clip_lower", "3e-4", "--clip_higher", "4e-4", "--loss_aggregation", "sequence_mean"],
            "cispo": ["--clip_higher", "5.0", "--top_entropy_quantile", "0.5"],
            "sapo": ["--advantage_normalization_type", "batch", "--num_epochs", "2"]}[variant]


@pytest.mark.parametrize("variant", list(L.POLICY_LOSSES))
@pytest.mark.parametrize("mode", ["lora", "full"])
def test_three_steps_of_each_variant_through_the_entry_point(tmp_path, tiny_model_dir, variant, mode):
    data = write_rows(tmp_path / "rows.jsonl", 8)
    (tmp_path / "parity.py").write_text("def parity(completion_ids, **kwargs):\n    return [float(sum(ids) % 2) for ids in completion_ids]\n")
    argv = ["--model_name_or_path", str(tiny_model_dir), "--dataset_mixer_list", data, "1.0", "--reference_mode", "in_process",
            "--beta", "0.05", "--num_unique_prompts_rollout", "2", "--num_samples_per_prompt_rollout", "3", "--response_length", "6",
            "--policy_dtype", "float32", "--learning_rate", "1e-3", "--output_dir", str(tmp_path / "out"), "--run_name", "v",
            "--num_training_steps", "3", "--num_evals", "0", "--train_mode", mode, "--lora_r", "4", "--policy_loss", variant,
            "--reward_funcs", f"{tmp_path / 'parity.py'}:parity", "soft_overlong", "--overlong_buffer_len", "3", *variant_args(variant)]
    if variant == "clip" and mode == "full":  # one of the runs as a user starts it: a subprocess
        proc = run_cli(*argv)
        assert proc.returncode == 0, proc.stderr[-3000:]
    else:
        assert main(argv) == 0
    rows = [json.loads(x) for x in (tmp_path / "out" / "v" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3]
    for r in rows:
        for name in ("train/entropy", "reward/soft_overlong/mean"):
            assert math.isfinite(r[name]) and r[name] >= (0 if name == "train/entropy" else -1), (name, r)
        assert all(math.isfinite(v) for v in r.values() if isinstance(v, float)), r
        if "train/clip_fraction" in r:
            assert 0 <= r["train/clip_fraction"] <= 1
    assert any(r["rollout/zero_std_group_fraction"] < 1 and r["train/optimizer_steps"] > 0 for r in rows)  # the variant's term trained
    assert json.loads((tmp_path / "out" / "v" / "open_instruct2_config.json").read_text())["flags"]["policy_loss"] == variant


BAD = [
    (["--clip_lower", "-0.1"], "--clip_lower must be in [0, 1)"),
    (["--clip_higher", "-1"], "--clip_higher must be >= 0"),
    (["--policy_loss", "cispo"], "set --clip_higher 5"),
    (["--policy_loss", "sapo", "--sapo_temperature_neg", "0"], "--sapo_temperature_neg must be > 0"),
    (["--sapo_temperature_pos", "-1"], "--sapo_temperature_pos must be > 0"),
    (["--top_entropy_quantile", "0"], "--top_entropy_quantile must be in (0, 1]"),
    (["--top_entropy_quantile", "1.5"], "--top_entropy_quantile must be in (0, 1]"),
    (["--clip_ratio_c", "0.5"], "--clip_ratio_c must be 0 (off) or > 1"),
    (["--clip_ratio_c", "3", "--policy_loss", "sapo"], "applies to --policy_loss clip only"),
    (["--entropy_coef", "-0.1"], "--entropy_coef must be >= 0"),
    (["--entropy_coef", "inf"], "--entropy_coef must be a finite number"),
    (["--sapo_temperature_pos", "inf"], "--sapo_temperature_pos must be a finite number"),
    (["--policy_loss", "ppo"], "--policy_loss"),
    (["--reward_funcs", "think_answer_format", "--overlong_buffer_len", "4"], "add soft_overlong"),
]


@pytest.mark.parametrize("argv,needle", BAD, ids=[" ".join(a) for a, _ in BAD])
def test_bad_values_are_one_line_exit_2(argv, needle, capsys):
    assert main([*argv, "--dry_run", "true"]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1 and err[0].startswith("error: ") and needle in err[0], err


def test_help_documents_every_new_flag():
    proc = run_cli("--help")
    for flag in ("--policy_loss", "--clip_ratio_c", "--sapo_temperature_pos", "--sapo_temperature_neg", "--entropy_coef",
                 "--top_entropy_quantile", "--overlong_buffer_len", "--overlong_penalty_factor"):
        assert flag in proc.stdout, flag
    assert "gspo" in proc.stdout and "cispo" in proc.stdout and "batch" in proc.stdout


def test_soft_overlong_on_the_verifiable_path():
    from open_instruct2.config import RewardConfig
    from open_instruct2.rewards import compute_scores

    cfg = RewardConfig(overlong_buffer_len=4, overlong_penalty_factor=0.5)
    texts = ["#### 12"] * 4
    s = compute_scores(texts, ["stop"] * 4, [["gsm8k"]] * 4, [["12"]] * 4, cfg, response_lengths=[3, 6, 8, 10], response_length=10)
    assert s.breakdown["soft_overlong"].tolist() == [0.0, 0.0, -0.25, -0.5]  # -0.5 x (l - 6) / 4 past 10 - 4
    assert s.rewards.tolist() == [10.0, 10.0, 9.75, 9.5]
    off = compute_scores(texts, ["stop"] * 4, [["gsm8k"]] * 4, [["12"]] * 4, RewardConfig(), response_lengths=[3, 6, 8, 10], response_length=10)
    assert "soft_overlong" not in off.breakdown and off.rewards.tolist() == [10.0] * 4


def test_the_entropy_kernel_gradients_and_masked_logits():
    """Both outputs of token_logprobs_entropy against autograd in float64 (gradcheck), and a -inf logit (a masked
    token) leaves the entropy and its gradient finite, equal to the full softmax's."""
    from open_instruct2.logprobs import token_logprobs_entropy

    torch.manual_seed(0)
    logits = torch.randn(2, 3, 7, dtype=torch.float64, requires_grad=True)
    targets = torch.randint(0, 6, (2, 3))
    assert torch.autograd.gradcheck(lambda x: token_logprobs_entropy(x, targets, 0.7), (logits,))
    assert torch.autograd.gradcheck(lambda x: token_logprobs_entropy(x, targets, 0.7)[1], (logits,))
    masked = logits.detach().clone()
    masked[..., 6] = -torch.inf
    x = masked.clone().requires_grad_()
    logp, h = token_logprobs_entropy(x, targets, 0.7)
    (logp.sum() + h.sum()).backward()
    y = masked.clone().requires_grad_()
    ls = (y / 0.7).log_softmax(-1)
    want_h = -(ls.exp() * ls.nan_to_num(neginf=0.0)).sum(-1)
    (ls.gather(-1, targets.unsqueeze(-1)).squeeze(-1).sum() + want_h.sum()).backward()
    torch.testing.assert_close(h, want_h)
    torch.testing.assert_close(x.grad, y.grad.nan_to_num(0.0))
