"""Log-probs in the rollout layout, micro-batch invariance, fp32 master weights, and which parameters
one update changes (full vs LoRA)."""


import pytest
import torch
from transformers import AutoModelForCausalLM

from conftest import tiny_config
from open_instruct2 import trainer, update
from open_instruct2.losses import LossNorm
from open_instruct2.policy import MasterWeights, response_logprobs
from open_instruct2.reference import batched_logprobs
from open_instruct2.rollout import generate_rollouts
from open_instruct2.update import LossRows


def test_left_padded_logprobs_equal_unpadded(tiny_model_dir):
    model = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir), dtype=torch.float32).eval()
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(3, 1000, (n,), generator=g).tolist() for n in (3, 7, 5)]
    responses = [torch.randint(3, 1000, (n,), generator=g).tolist() for n in (4, 2, 6)]
    P, T, pad = 7, 6, 2
    ids = torch.tensor([[pad] * (P - len(p)) + p + r + [pad] * (T - len(r)) for p, r in zip(prompts, responses)])
    mask = torch.tensor([[0] * (P - len(p)) + [1] * (len(p) + len(r)) + [0] * (T - len(r)) for p, r in zip(prompts, responses)])
    with torch.no_grad():
        batched = response_logprobs(model, ids, mask, P)  # (3, 6)
        for b, (p, r) in enumerate(zip(prompts, responses)):
            alone = response_logprobs(model, torch.tensor([p + r]), torch.ones(1, len(p) + len(r), dtype=torch.long), len(p))
            assert torch.allclose(batched[b, : len(r)], alone[0], atol=1e-5)
            # and against the plain definition: log_softmax of all logits, gathered
            logits = model(torch.tensor([p + r])).logits[0].log_softmax(-1)
            naive = torch.stack([logits[len(p) - 1 + t, r[t]] for t in range(len(r))])
            assert torch.allclose(alone[0], naive, atol=1e-5)


@pytest.fixture
def run_and_rollouts(tmp_path, tiny_model_dir):
    def build(**overrides):
        cfg = tiny_config(tmp_path / str(len(list(tmp_path.iterdir()))), tiny_model_dir, **overrides)
        run = trainer.setup(cfg)
        torch.manual_seed(0)
        batch = trainer.next_batch(run.prompts, run.sampler, cfg.rollout.num_unique_prompts_rollout)
        rollouts = generate_rollouts(
            run.policy, run.tokenizer, batch, num_samples=cfg.rollout.num_samples_per_prompt_rollout,
            response_length=cfg.rollout.response_length, temperature=cfg.rollout.temperature, top_p=1.0, stop_strings=None,
            device=torch.device("cpu"),  # at the run's temperature: the sampler's log-probs are what the update's importance weights use
        )
        # Make response lengths differ so padding and trimming are exercised.
        for i, keep in enumerate([8, 3, 5, 1, 8, 6]):
            rollouts.response_mask[i, keep:] = 0
            rollouts.attention_mask[i, rollouts.prompt_width + keep :] = 0
        return run, rollouts

    return build


def test_update_does_not_depend_on_micro_batch_size(tmp_path, tiny_model_dir, run_and_rollouts):
    run, rollouts = run_and_rollouts(beta=0.1, kl_estimator="kl3")
    rows = list(range(6))
    advantages = torch.tensor([1.0, -0.5, 0.25, -1.0, 2.0, -1.75])
    ref = trainer.reference_logprobs(run.reference, rollouts, rows)
    old = ref + 0.01 * torch.randn_like(ref)  # off-policy: ratios != 1, so clipping is exercised too
    grads, losses = {}, {}
    norm = LossNorm(num_tokens=int(rollouts.response_mask.sum()), num_sequences=6, max_response_length=8)
    for size in (1, 4, 6):
        run.cfg.optim.per_device_train_batch_size = size
        run.policy.zero_grad(set_to_none=True)
        sums = update.defaultdict(lambda: torch.zeros(()))
        update.backward_mini_batch(run.policy, run.master, rollouts, rows, norm, advantages, old, ref, run.cfg, sums)
        grads[size] = [p.grad.clone() for p in run.policy.parameters()]
        losses[size] = float(sums["loss"])
    for size in (4, 6):
        assert abs(losses[size] - losses[1]) < 1e-6
        for a, b in zip(grads[1], grads[size]):
            assert torch.allclose(a, b, atol=1e-6), (a - b).abs().max()


def test_full_update_changes_every_parameter(run_and_rollouts):
    run, rollouts = run_and_rollouts(train_mode="full")
    before = {n: p.detach().clone() for n, p in run.policy.named_parameters()}
    metrics = update.update_policy(run, rollouts, torch.tensor([1.0, -1.0, 0.5, -0.5, 2.0, -2.0]), None, LossRows(list(range(6)), list(range(6))))
    assert metrics["train/grad_norm"] > 0
    unchanged = [n for n, p in run.policy.named_parameters() if torch.equal(p, before[n])]
    assert unchanged == []


def test_lora_update_changes_only_adapters(run_and_rollouts):
    run, rollouts = run_and_rollouts(train_mode="lora", num_mini_batches=2, lora_r=4)
    before = {n: p.detach().clone() for n, p in run.policy.named_parameters()}
    update.update_policy(run, rollouts, torch.tensor([1.0, -1.0, 0.5, -0.5, 2.0, -2.0]), None, LossRows(list(range(6)), list(range(6))))
    changed = {n for n, p in run.policy.named_parameters() if not torch.equal(p, before[n])}
    adapters = {n for n, _ in run.policy.named_parameters() if "lora_" in n}
    assert adapters and changed == adapters  # two optimizer steps: lora_A moves once lora_B is non-zero
    assert all(not p.requires_grad for n, p in run.policy.named_parameters() if n not in adapters)


def test_in_process_lora_reference_is_the_base_model(run_and_rollouts, tiny_model_dir):
    run, rollouts = run_and_rollouts(train_mode="lora", lora_r=4)
    rows = list(range(6))
    update.update_policy(run, rollouts, torch.tensor([1.0, -1.0, 0.5, -0.5, 2.0, -2.0]), None, LossRows(rows, rows))
    ref = run.reference.logprobs(rollouts, rows)
    base = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir), dtype=torch.float32).eval()
    expected = batched_logprobs(base, rollouts, rows, 6, run.cfg.rollout.temperature)
    assert torch.allclose(ref, expected, atol=1e-5)
    policy_now = batched_logprobs(run.policy.eval(), rollouts, rows, 6, run.cfg.rollout.temperature)
    assert not torch.allclose(policy_now, expected, atol=1e-4)  # the adapters did change the policy


def test_master_weights_keep_small_bf16_updates():
    # A bf16 weight of 1.0 cannot move by 1e-4 (its spacing there is 2^-7 = 0.0078); the fp32 master can.
    p = torch.nn.Parameter(torch.ones(4, dtype=torch.bfloat16))
    master = MasterWeights([p])
    opt = torch.optim.SGD(master.optim_params, lr=1e-4)
    for _ in range(100):
        p.grad = torch.ones_like(p)
        master.accumulate()
        opt.step()
        opt.zero_grad()
        master.master_to_model()
    # 100 steps of 1e-4 = 0.01: the master holds 0.99, the model rounds it to bf16's nearest (0.98828125 or 0.9921875)
    assert torch.allclose(master.optim_params[0], torch.full((4,), 0.99), atol=1e-5)
    assert p.dtype == torch.bfloat16 and float(p[0].detach()) < 1.0
    naive = torch.ones(4, dtype=torch.bfloat16)
    for _ in range(100):
        naive -= 1e-4
    assert float(naive[0]) == 1.0  # without master weights every update is rounded away
