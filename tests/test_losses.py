"""losses.py against numbers worked out by hand (in the comments beside each assert)."""

import math

import pytest
import torch

from open_instruct2 import losses as L


def close(a, b, tol=1e-6):
    return torch.allclose(torch.as_tensor(a, dtype=torch.float32), torch.as_tensor(b, dtype=torch.float32), atol=tol)


def test_advantages_standard():
    # group 1: [1, 3] -> mean 2, population std 1 -> [-1, 1]
    # group 2: [0, 0] -> mean 0, std 0 -> [0, 0] (the 1e-8 keeps it finite)
    # group 3: [2, 4] -> [-1, 1]
    adv = L.compute_advantages(torch.tensor([1.0, 3.0, 0.0, 0.0, 2.0, 4.0]), 2, "standard")
    assert close(adv, [-1, 1, 0, 0, -1, 1])
    # group of 4: [0, 0, 0, 10] -> mean 2.5, std sqrt((3*6.25 + 56.25)/4) = sqrt(18.75) = 4.330127
    adv = L.compute_advantages(torch.tensor([0.0, 0.0, 0.0, 10.0]), 4, "standard")
    s = math.sqrt(18.75)
    assert close(adv, [-2.5 / s, -2.5 / s, -2.5 / s, 7.5 / s])


def test_advantages_centered():
    # [1, 3] -> [-1, 1]; [0, 0, 0, 10] group of 4 -> [-2.5, -2.5, -2.5, 7.5]
    assert close(L.compute_advantages(torch.tensor([1.0, 3.0]), 2, "centered"), [-1, 1])
    assert close(L.compute_advantages(torch.tensor([0.0, 0.0, 0.0, 10.0]), 4, "centered"), [-2.5, -2.5, -2.5, 7.5])


def test_advantages_reject_bad_input():
    with pytest.raises(ValueError, match="groups of 4"):
        L.compute_advantages(torch.zeros(6), 4, "standard")
    with pytest.raises(ValueError, match="choose one of standard, centered"):
        L.compute_advantages(torch.zeros(4), 2, "whitened")


def test_zero_std_groups():
    flags = L.zero_std_groups(torch.tensor([1.0, 1.0, 0.0, 10.0, 5.0, 5.0]), 2)
    assert flags.tolist() == [True, True, False, False, True, True]


def test_kl_estimators_by_hand():
    logp, ref = torch.tensor([[-1.0, -2.0]]), torch.tensor([[-1.5, -1.0]])  # d = [0.5, -1.0]
    ratio = torch.tensor([[2.0, 0.5]])
    assert close(L.kl1(logp, ref, ratio), [[0.5, -1.0]])
    assert close(L.kl2(logp, ref, ratio), [[0.125, 0.5]])  # d^2 / 2
    # exp(-0.5) - 1 + 0.5 = 0.6065307 - 0.5 = 0.1065307 ; exp(1) - 1 - 1 = 0.7182818
    assert close(L.kl3(logp, ref, ratio), [[0.1065307, 0.7182818]])
    assert close(L.kl4(logp, ref, ratio), [[1.0, -0.5]])  # ratio * d
    assert set(L.KL_ESTIMATORS) == {"kl1", "kl2", "kl3", "kl4"}


def norm(tokens, seqs, max_len):
    return L.LossNorm(num_tokens=tokens, num_sequences=seqs, max_response_length=max_len)


def test_aggregation_modes_by_hand():
    values = torch.tensor([[1.0, 2.0, 3.0], [4.0, 0.0, 0.0]])
    mask = torch.tensor([[1, 1, 1], [1, 0, 0]])
    n = norm(4, 2, 5)
    # token_mean: (1 + 2 + 3 + 4) / 4 tokens = 2.5
    assert close(L.aggregate(values, mask, n, "token_mean"), 2.5)
    # sequence_mean: (6/3 + 4/1) / 2 = (2 + 4) / 2 = 3
    assert close(L.aggregate(values, mask, n, "sequence_mean"), 3.0)
    # constant (Dr. GRPO): 10 / (2 sequences * 5) = 1
    assert close(L.aggregate(values, mask, n, "constant"), 1.0)
    with pytest.raises(ValueError, match="token_mean, sequence_mean, constant"):
        L.aggregate(values, mask, n, "sum")


def test_aggregation_adds_up_over_micro_batches():
    """Each micro-batch's share, with mini-batch denominators, sums to the mini-batch value."""
    values = torch.tensor([[1.0, 2.0, 3.0], [4.0, 0.0, 0.0], [5.0, 6.0, 0.0]])
    mask = torch.tensor([[1, 1, 1], [1, 0, 0], [1, 1, 0]])
    n = norm(int(mask.sum()), 3, 3)
    for mode in L.LOSS_AGGREGATIONS:
        whole = L.aggregate(values, mask, n, mode)
        parts = sum(L.aggregate(values[i : i + 1], mask[i : i + 1], n, mode) for i in range(3))
        assert close(whole, parts), mode


def grpo(logp, old, ref, adv, mask, beta=0.0, agg="token_mean", kl="kl1", lo=0.2, hi=0.2):
    return L.grpo_loss(
        torch.tensor(logp), torch.tensor(old), None if ref is None else torch.tensor(ref), torch.tensor(adv),
        torch.tensor(mask), norm(int(torch.tensor(mask).sum()), len(adv), len(logp[0])),
        clip_lower=lo, clip_higher=hi, beta=beta, kl_estimator=kl, aggregation=agg,
    )


def test_policy_loss_clipping_both_sides():
    r = math.log(1.5)  # ratio 1.5 = exp(log 1.5 - 0)
    # A = +1, ratio 1.5 > 1.2: max(-1.5, -1.2) = -1.2 (clipped: no incentive to push further)
    loss, m = grpo([[r]], [[0.0]], None, [1.0], [[1]])
    assert close(loss, -1.2) and close(m["clip_fraction"], 1.0)
    # A = -1, ratio 1.5: max(1.5, 1.2) = 1.5 (not clipped: the pessimistic side)
    loss, m = grpo([[r]], [[0.0]], None, [-1.0], [[1]])
    assert close(loss, 1.5) and close(m["clip_fraction"], 0.0)
    low = math.log(0.5)
    # A = -1, ratio 0.5 < 0.8: max(0.5, 0.8) = 0.8 (clipped below)
    loss, m = grpo([[low]], [[0.0]], None, [-1.0], [[1]])
    assert close(loss, 0.8) and close(m["clip_fraction"], 1.0)
    # A = +1, ratio 0.5: max(-0.5, -0.8) = -0.5 (not clipped)
    loss, _ = grpo([[low]], [[0.0]], None, [1.0], [[1]])
    assert close(loss, -0.5)
    # clip_higher 0.3 (DAPO): A = +1, ratio 1.5 -> max(-1.5, -1.3) = -1.3
    loss, _ = grpo([[r]], [[0.0]], None, [1.0], [[1]], hi=0.3)
    assert close(loss, -1.3)


def test_loss_with_kl_and_aggregation():
    # Two sequences, ratio 1 everywhere (old = logp). Policy term per token = -A.
    logp = [[-1.0, -2.0], [-0.5, -9.0]]
    ref = [[-1.5, -1.0], [-0.5, 0.0]]
    mask = [[1, 1], [1, 0]]  # the last token is padding
    # kl1 per token: [[0.5, -1.0], [0.0, pad]]; beta 0.1
    # per token loss: seq0: -2 + 0.05 = -1.95, -2 - 0.1 = -2.1 ; seq1 (A = -1): 1 + 0 = 1
    # token_mean: (-1.95 - 2.1 + 1) / 3 = -1.0166667
    loss, m = grpo(logp, logp, ref, [2.0, -1.0], mask, beta=0.1)
    assert close(loss, -3.05 / 3)
    assert close(m["kl"], 0.5 - 1.0 + 0.0)  # metrics are sums over valid tokens; the trainer divides
    # sequence_mean: ((-1.95 - 2.1) / 2 + 1 / 1) / 2 = (-2.025 + 1) / 2 = -0.5125
    loss, _ = grpo(logp, logp, ref, [2.0, -1.0], mask, beta=0.1, agg="sequence_mean")
    assert close(loss, -0.5125)
    # constant: -3.05 / (2 sequences * 2 max length) = -0.7625
    loss, _ = grpo(logp, logp, ref, [2.0, -1.0], mask, beta=0.1, agg="constant")
    assert close(loss, -0.7625)


def test_garbage_in_padding_cannot_poison_the_loss():
    # Padding log-probs of -200 against a reference of 0 would make kl3 = exp(200) = inf; inf * 0 = nan.
    loss, _ = grpo([[-1.0, -200.0]], [[-1.0, 0.0]], [[-1.0, 0.0]], [1.0], [[1, 0]], beta=0.1, kl="kl3")
    assert torch.isfinite(loss) and close(loss, -1.0)


def test_gradient_of_the_loss():
    # token_mean, ratio 1, A = 2 on a single token: d loss / d logp = -A * ratio = -2; plus beta * d kl1/d logp = 0.1
    logp = torch.tensor([[-1.0]], requires_grad=True)
    loss, _ = L.grpo_loss(logp, logp.detach(), torch.tensor([[-1.2]]), torch.tensor([2.0]), torch.tensor([[1]]),
                          norm(1, 1, 1), clip_lower=0.2, clip_higher=0.2, beta=0.1, kl_estimator="kl1", aggregation="token_mean")
    loss.backward()
    assert close(logp.grad, [[-1.9]])


def test_kl3_is_finite_when_the_reference_finds_a_token_impossible():
    # d = logp - ref = -1 - (-150) = 149 and the other way round: exp(149) overflows fp32 (max ~3.4e38 = e^88.7).
    logp = torch.tensor([[-1.0, -150.0]], requires_grad=True)
    ref = torch.tensor([[-150.0, -1.0]])
    kl = L.kl3(logp, ref, torch.ones(1, 2))
    assert torch.isfinite(kl).all()
    # clamped at +-40: exp(-40) - 1 + 40 and exp(40) - 1 - 40
    assert close(kl, [[math.exp(-40) - 1 + 40, math.exp(40) - 1 - 40]])
    loss, _ = grpo(logp.tolist(), logp.tolist(), ref.tolist(), [0.0], [[1, 1]], beta=0.1, kl="kl3")
    assert torch.isfinite(loss)
    kl.sum().backward()
    assert torch.isfinite(logp.grad).all()


def test_zero_std_groups_get_exactly_zero_advantage():
    # Eight rewards of 0.1 do not average to exactly 0.1 in fp32: the mean is off by 7e-9, the std is ~7e-9,
    # and (r - mean) / (std + 1e-8) turned that rounding into advantages of 0.43 (measured before the fix).
    rewards = torch.tensor([0.1] * 8 + [0.3] * 8 + [1.0, 0.0] * 4)
    for mode in ("standard", "centered"):
        adv = L.compute_advantages(rewards, 8, mode)
        assert adv[:16].tolist() == [0.0] * 16 and adv[16:].abs().sum() > 0


def test_invalid_samples_leave_their_group_statistics():
    # group 1: [1, 0, (invalid 100), 1] -> valid mean 2/3, std sqrt(2/9); the invalid sample's advantage is 0
    rewards = torch.tensor([1.0, 0.0, 100.0, 1.0, 3.0, 3.0, 5.0, 0.0])
    valid = torch.tensor([True, True, False, True, True, True, False, False])
    adv = L.compute_advantages(rewards, 4, "standard", valid)
    std = (2 / 9) ** 0.5
    assert torch.allclose(adv[:4], torch.tensor([(1 - 2 / 3) / std, (0 - 2 / 3) / std, 0.0, (1 - 2 / 3) / std]), atol=1e-5)
    # group 2: its two valid rewards are equal (3, 3): no signal, however different the invalid ones are
    assert adv[4:].tolist() == [0.0] * 4
    assert L.zero_std_groups(rewards, 4, valid).tolist() == [False] * 4 + [True] * 4
    assert L.zero_std_groups(torch.tensor([1.0, 2.0]), 2, torch.tensor([True, False])).tolist() == [True, True]  # one valid: no group


def test_importance_weights_token_and_sequence_level_by_hand():
    old = torch.tensor([[-1.0, -2.0, -3.0], [-1.0, -1.0, 0.0]])
    sampler = torch.tensor([[-1.5, -1.0, -3.0], [-0.5, -1.2, -9.0]])  # last entry is padding
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    w, capped = L.importance_weights(old, sampler, mask, cap=1.5, level="token")
    expected = [[min(math.exp(0.5), 1.5), math.exp(-1.0), 1.0], [math.exp(-0.5), math.exp(0.2), 1.0]]
    torch.testing.assert_close(w, torch.tensor(expected), rtol=1e-6, atol=0)
    assert capped.tolist() == [[True, False, False], [False, False, False]]  # padding never counts
    w, capped = L.importance_weights(old, sampler, mask, cap=1.5, level="sequence")
    assert w[0].tolist() == pytest.approx([math.exp(-0.5)] * 3, rel=1e-6)  # exp(0.5 - 1 + 0)
    assert w[1, :2].tolist() == pytest.approx([math.exp(-0.3)] * 2, rel=1e-6) and not capped.any()
    w, capped = L.importance_weights(old, sampler + 100.0, mask, cap=3.0, level="sequence")  # no overflow: clamped in log space
    assert torch.isfinite(w).all()
    w, capped = L.importance_weights(old, sampler - 100.0, mask, cap=3.0, level="sequence")
    assert w[0].tolist() == pytest.approx([3.0] * 3) and capped[0].all()
    w, capped = L.importance_weights(old, sampler - 100.0, mask, cap=0.0, level="token")  # off
    assert (w == 1).all() and not capped.any()


def test_loss_with_sampler_logprobs_weights_the_policy_gradient_only():
    torch.manual_seed(0)
    logprobs = (torch.randn(2, 4) - 2).requires_grad_()
    ref = torch.randn(2, 4) - 2
    adv = torch.tensor([1.0, -0.5])
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1]])
    norm = L.LossNorm(num_tokens=7, num_sequences=2, max_response_length=4)
    kwargs = dict(clip_lower=0.2, clip_higher=0.2, beta=0.0, kl_estimator="kl3", aggregation="token_mean")
    plain, _ = L.grpo_loss(logprobs, logprobs.detach(), ref, adv, mask, norm, **kwargs)
    same, metrics = L.grpo_loss(logprobs, logprobs.detach(), ref, adv, mask, norm, sampler_logprobs=logprobs.detach(),
                                importance_cap=2.0, **kwargs)
    assert same.item() == pytest.approx(plain.item()) and metrics["sampler_mismatch_max"].item() == 0.0
    sampler = logprobs.detach() - 0.1  # the sampler found every token a little less likely: weight e^0.1
    weighted, metrics = L.grpo_loss(logprobs, logprobs.detach(), ref, adv, mask, norm, sampler_logprobs=sampler, importance_cap=2.0, **kwargs)
    assert weighted.item() == pytest.approx(plain.item() * math.exp(0.1), rel=1e-5)
    assert metrics["sampler_mismatch_mean"].item() == pytest.approx(0.7, rel=1e-5)  # a sum over 7 tokens of 0.1
    assert metrics["importance_weight"].item() == pytest.approx(7 * math.exp(0.1), rel=1e-5)
    kl_only = dict(kwargs, beta=0.1)
    a, _ = L.grpo_loss(logprobs, logprobs.detach(), ref, torch.zeros(2), mask, norm, **kl_only)
    b, _ = L.grpo_loss(logprobs, logprobs.detach(), ref, torch.zeros(2), mask, norm, sampler_logprobs=sampler - 5, importance_cap=2.0, **kl_only)
    assert a.item() == pytest.approx(b.item())  # the KL term is not weighted
