"""What HF generate runs with: a static cache gives the same tokens as the dynamic one; a merged LoRA copy
gives the policy's function, follows it after an optimizer step, and shares the frozen tensors; so does a
copy with its linear weights pre-packed for oneDNN (CPU)."""

import pytest
import torch
from transformers import AutoModelForCausalLM

from conftest import run_cli
from open_instruct2.generation_model import GenerationModel, PackedLinear, packing_available
from open_instruct2.rollout import STATIC_WIDTH_STEP, generate_rollouts
from test_rollout import batch_of
from test_train_e2e import tiny_args

QUESTIONS = ["Hi", "What is 12 + 30? Put the final answer after ####.", "Name three colours of the rainbow, then stop."]


def greedy(model, tokenizer, batch, static_width=None, length=12, stop=None):
    return generate_rollouts(model, tokenizer, batch, num_samples=1, response_length=length, temperature=1.0, top_p=1.0,
                             stop_strings=stop, device=torch.device("cpu"), greedy=True, static_width=static_width)


def test_static_cache_generates_the_same_tokens(builtin_model_dir, tokenizer):
    model = AutoModelForCausalLM.from_pretrained(str(builtin_model_dir), dtype=torch.float32).eval()
    batch = batch_of(tokenizer, QUESTIONS)
    dynamic = greedy(model, tokenizer, batch, stop=["\n\n"])
    static = greedy(model, tokenizer, batch, dynamic.prompt_width + 5, stop=["\n\n"])
    assert static.prompt_width == dynamic.prompt_width + 5  # padded to the run's width
    narrow = greedy(model, tokenizer, batch, dynamic.prompt_width - 1, stop=["\n\n"])  # a batch wider than the run's width
    assert narrow.prompt_width % STATIC_WIDTH_STEP == 0 and narrow.prompt_width >= dynamic.prompt_width
    assert narrow.response_texts == dynamic.response_texts
    assert static.response_texts == dynamic.response_texts and static.finish_reasons == dynamic.finish_reasons
    assert torch.equal(static.response_mask, dynamic.response_mask)
    assert torch.equal(static.input_ids[:, static.prompt_width:], dynamic.input_ids[:, dynamic.prompt_width:])
    # the extra left padding is masked out: the prompt tokens are the same, flush against the response
    assert torch.equal(static.input_ids[static.attention_mask.bool()], dynamic.input_ids[dynamic.attention_mask.bool()])


def lora_policy(tiny_model_dir):
    from peft import LoraConfig, get_peft_model

    base = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir), dtype=torch.float32)
    policy = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "gate_proj"], lora_dropout=0.0))
    torch.manual_seed(1)
    for name, p in policy.named_parameters():
        if "lora_B" in name:
            p.data.normal_(0, 0.5)  # B starts at zero: make the adapters change the function
    return policy.eval()


def test_merged_copy_is_the_policy_and_follows_it(tiny_model_dir, tokenizer):
    policy = lora_policy(tiny_model_dir)
    holder = GenerationModel(policy, merged=True, static_width=None)
    rng = torch.get_rng_state()
    copy = holder.model()
    assert torch.equal(torch.get_rng_state(), rng)  # building it draws nothing from the run's generator (samples, resume)
    assert copy is not policy and not hasattr(copy, "peft_config")
    ids = torch.tensor([[1, 400, 500, 600, 700]])
    with torch.no_grad():
        assert torch.allclose(copy(ids).logits, policy(ids).logits, atol=1e-5)
        with policy.disable_adapter():
            base_logits = policy(ids).logits
    assert not torch.allclose(copy(ids).logits, base_logits, atol=1e-3)  # the adapters are in it
    base = policy.get_base_model()
    # frozen tensors are the policy's own; the adapted ones are separate (the policy's W is untouched)
    assert copy.model.embed_tokens.weight.data_ptr() == base.model.embed_tokens.weight.data_ptr()
    assert copy.model.layers[0].self_attn.k_proj.weight.data_ptr() == base.model.layers[0].self_attn.k_proj.weight.data_ptr()
    q_copy, q_base = copy.model.layers[0].self_attn.q_proj.weight, base.model.layers[0].self_attn.q_proj.base_layer.weight
    assert q_copy.data_ptr() != q_base.data_ptr() and not torch.equal(q_copy, q_base)
    # an "optimizer step" on the adapters: the copy is stale until told, then follows in place
    address = q_copy.data_ptr()
    with torch.no_grad():
        for name, p in policy.named_parameters():
            if "lora_A" in name:
                p.add_(0.3)
        moved = policy(ids).logits
        assert not torch.allclose(holder.model()(ids).logits, moved, atol=1e-3)
        holder.weights_changed()
        assert holder.model() is copy and torch.allclose(copy(ids).logits, moved, atol=1e-5)
    assert copy.model.layers[0].self_attn.q_proj.weight.data_ptr() == address
    # greedy text from the copy = from the adapter layers
    batch = batch_of(tokenizer, QUESTIONS)
    assert greedy(copy, tokenizer, batch).response_texts == greedy(policy, tokenizer, batch).response_texts


def test_unmerged_holder_is_the_policy(tiny_model_dir):
    policy = lora_policy(tiny_model_dir)
    assert GenerationModel(policy, merged=False, static_width=64).model() is policy


@pytest.mark.parametrize("shared_prefix", ["auto", "on"])
def test_lora_run_with_merged_generation_and_static_cache(tmp_path, tiny_model_dir, shared_prefix):
    """The user's path: both settings forced on a CPU (auto would pick them on CUDA), with evaluation, under
    --shared_prefix auto (the static cache prefilled per row) and on (once per prompt: that the prefill then really
    is one per prompt is test_rollout_prefix's test_a_static_cache_is_prefilled_once_too)."""
    proc = run_cli(*tiny_args(tmp_path, tiny_model_dir, "--train_mode", "lora", "--lora_r", "4", "--num_training_steps", "3",
                              "--learning_rate", "1e-2", "--lora_generation", "merged", "--generation_cache", "static",
                              "--dataset_mixer_eval_list", str(tmp_path / "rows.jsonl"), "5", "--num_evals", "2",
                              "--per_device_train_batch_size", "8", "--shared_prefix", shared_prefix))
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "LoRA merged into a copy" in proc.stdout and "HF generate: static KV cache" in proc.stdout and "LoRA generation: a merged copy" in proc.stdout
    evals = sorted((tmp_path / "out" / "e2e" / "evals").glob("step_*.jsonl"))
    assert len(evals) >= 2


def test_auto_settings_by_device_and_run_length(tmp_path, tiny_model_dir):
    from conftest import tiny_config
    from open_instruct2.generation_model import COMPILE_WORTH_STEPS, make_generation_model
    from open_instruct2.runtime import Runtime

    model = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir))
    cfg = tiny_config(tmp_path, tiny_model_dir)
    on = lambda device: Runtime(torch.device(device), torch.float32, "sdpa", 1, "test")
    # CUDA compiles only for runs long enough to pay the compile back; the width covers the longest prompt
    assert make_generation_model(cfg, on("cuda"), model, 61, COMPILE_WORTH_STEPS).static_width == 64
    assert make_generation_model(cfg, on("cuda"), model, 61, COMPILE_WORTH_STEPS - 1).static_width is None
    assert make_generation_model(cfg, on("cpu"), model, 61, 1000).static_width is None
    cfg.rollout.generation_cache = "static"
    assert make_generation_model(cfg, on("cpu"), model, 61, 2).static_width == 64
    cfg.rollout.generation_cache = "dynamic"
    assert make_generation_model(cfg, on("cuda"), model, 61, 1000).static_width is None
    assert not make_generation_model(cfg, on("cpu"), model, 61, 2).merged  # full fine-tuning: nothing to merge


def test_auto_lora_merges_only_when_the_copy_fits(tmp_path, tiny_model_dir, monkeypatch):
    from conftest import tiny_config
    from open_instruct2 import generation_model as G
    from open_instruct2.runtime import Runtime

    policy = lora_policy(tiny_model_dir)
    need = G.copy_bytes(policy, packed=False)
    assert need == sum(m.base_layer.weight.nbytes for _, m in G._adapted_layers(policy.get_base_model())) > 0
    cfg = tiny_config(tmp_path, tiny_model_dir, train_mode="lora")
    cfg.rollout.generation_linear = "plain"  # the merged copy's own rule (packed has its own, below)
    cpu = Runtime(torch.device("cpu"), torch.float32, "sdpa", 1, "test")
    monkeypatch.setattr(G, "free_memory", lambda device: 4 * need + 4)
    assert G.make_generation_model(cfg, cpu, policy, 10, 2).merged
    monkeypatch.setattr(G, "free_memory", lambda device: 4 * need - 4)
    assert not G.make_generation_model(cfg, cpu, policy, 10, 2).merged
    cfg.rollout.lora_generation = "merged"  # forced: merged whatever the memory
    assert G.make_generation_model(cfg, cpu, policy, 10, 2).merged


needs_packing = pytest.mark.skipif(not packing_available(), reason="pre-packed linear weights need an x86 CPU with oneDNN")
needs_bf16_packing = pytest.mark.skipif(not packing_available(torch.bfloat16),
                                        reason="pre-packed bf16 weights need an x86 CPU with AVX512 or AMX (oneDNN refuses them on AVX2)")


@pytest.mark.parametrize("dtype", [pytest.param(torch.float32, marks=needs_packing), pytest.param(torch.bfloat16, marks=needs_bf16_packing)])
def test_packed_copy_is_the_policy_and_follows_it(tiny_model_dir, tokenizer, dtype):
    policy = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir), dtype=dtype)
    holder = GenerationModel(policy, merged=False, static_width=None, packed=True)
    copy = holder.model()
    layers = [m for m in copy.modules() if isinstance(m, PackedLinear)]
    assert len(layers) == sum(type(m) is torch.nn.Linear for m in policy.modules()) and not any(type(m) is torch.nn.Linear for m in copy.modules())
    assert copy.model.embed_tokens.weight.data_ptr() == policy.model.embed_tokens.weight.data_ptr()  # shared, not copied
    ids = torch.tensor([[1, 400, 500, 600, 700], [2, 3, 4, 5, 6]])
    with torch.no_grad():
        # bf16: the same sums as F.linear; fp32: oneDNN may sum in another order
        assert torch.allclose(copy(ids).logits, policy(ids).logits, atol=1e-5 if dtype == torch.float32 else 0)
        for p in policy.parameters():  # an "optimizer step": in place, as MasterWeights / AdamW write
            p.add_(torch.randn_like(p) * 0.05)
        moved = policy(ids).logits
        assert not torch.allclose(holder.model()(ids).logits, moved, atol=1e-3)  # stale until told
        holder.weights_changed()
        assert holder.model() is copy and torch.allclose(copy(ids).logits, moved, atol=1e-5 if dtype == torch.float32 else 0)
    batch = batch_of(tokenizer, QUESTIONS)
    assert greedy(copy, tokenizer, batch, stop=["\n\n"]).response_texts == greedy(policy, tokenizer, batch, stop=["\n\n"]).response_texts


@needs_packing
def test_packed_lora_copy_merges_the_adapters(tiny_model_dir):
    policy = lora_policy(tiny_model_dir)
    holder = GenerationModel(policy, merged=True, static_width=None, packed=True)
    copy = holder.model()
    ids = torch.tensor([[1, 400, 500, 600, 700]])
    with torch.no_grad():
        assert torch.allclose(copy(ids).logits, policy(ids).logits, atol=1e-5)
        for name, p in policy.named_parameters():
            if "lora_A" in name:
                p.add_(0.3)
        holder.weights_changed()
        assert torch.allclose(holder.model()(ids).logits, policy(ids).logits, atol=1e-5)
    # the frozen layers keep their dense source (the policy's tensor); adapted ones keep none (packed only)
    base = policy.get_base_model()
    k_proj, q_proj = copy.model.layers[0].self_attn.k_proj, copy.model.layers[0].self_attn.q_proj
    assert k_proj.source.data_ptr() == base.model.layers[0].self_attn.k_proj.weight.data_ptr() and q_proj.source is None


def test_auto_packs_on_an_x86_cpu_only(tmp_path, tiny_model_dir, monkeypatch):
    from conftest import tiny_config
    from open_instruct2 import generation_model as G
    from open_instruct2.errors import UserError
    from open_instruct2.runtime import Runtime

    model = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir))
    cfg = tiny_config(tmp_path, tiny_model_dir)
    on = lambda device, dtype=torch.bfloat16: Runtime(torch.device(device), dtype, "sdpa", 1, "test")
    assert G.make_generation_model(cfg, on("cpu"), model, 10, 2).packed == packing_available(torch.bfloat16)
    assert not G.make_generation_model(cfg, on("cpu", torch.float32), model, 10, 2).packed  # no faster at fp32
    assert not G.make_generation_model(cfg, on("cuda"), model, 10, 2).packed
    cfg.rollout.generation_linear = "packed"
    with pytest.raises(UserError, match="--generation_linear packed needs an x86 CPU"):
        G.make_generation_model(cfg, on("cuda"), model, 10, 2)
    if packing_available() and not packing_available(torch.bfloat16):  # an AVX2 CPU: bf16 packing is refused in one line
        with pytest.raises(UserError, match="cannot pack bfloat16 weights"):
            G.make_generation_model(cfg, on("cpu"), model, 10, 2)
    if packing_available():
        assert G.make_generation_model(cfg, on("cpu", torch.float32), model, 10, 2).packed  # forced: at fp32 too
    monkeypatch.setattr(G, "packing_available", lambda dtype=None: True)  # an x86 CPU, whatever this machine is
    cfg.rollout.generation_linear = "auto"
    need = G.copy_bytes(model, packed=True)
    assert need == sum(m.weight.nbytes for m in model.modules() if type(m) is torch.nn.Linear)
    monkeypatch.setattr(G, "free_memory", lambda device: 4 * need - 4)
    assert not G.make_generation_model(cfg, on("cpu"), model, 10, 2).packed
    monkeypatch.setattr(G, "free_memory", lambda device: 4 * need + 4)
    assert G.make_generation_model(cfg, on("cpu"), model, 10, 2).packed
    policy = lora_policy(tiny_model_dir)
    lora = tiny_config(tmp_path, tiny_model_dir, train_mode="lora")
    holder = G.make_generation_model(lora, on("cpu"), policy, 10, 2)
    assert holder.packed and holder.merged  # LoRA is merged into the packed weights
    lora.rollout.lora_generation = "adapters"
    assert not G.make_generation_model(lora, on("cpu"), policy, 10, 2).packed


@needs_bf16_packing
def test_packed_run_samples_what_the_plain_run_samples(tmp_path, tiny_model_dir):
    """The user's path on an x86 CPU at bf16 (auto packs there): a full fine-tuning run with evaluation, and the
    same run generating through the model's own layers; packing is exact in bf16, so with one seed both sample
    the same responses at every step, updates in between included."""
    import json

    runs = {}
    for linear in ("packed", "plain"):
        out = tmp_path / linear
        out.mkdir()
        proc = run_cli(*tiny_args(out, tiny_model_dir, "--num_training_steps", "3", "--policy_dtype", "bfloat16", "--generation_linear", linear,
                                  "--reference_mode", "none", "--beta", "0", "--dataset_mixer_eval_list", str(out / "rows.jsonl"), "4",
                                  "--num_evals", "1"))
        assert proc.returncode == 0, proc.stderr[-4000:]
        assert ("linear weights pre-packed for oneDNN" in proc.stdout) == (linear == "packed")
        lines = [json.loads(line) for line in (out / "out" / "e2e" / "metrics.jsonl").read_text().splitlines()]
        steps = [m for m in lines if "reward/mean" in m]
        assert len(steps) == 3 and sum(m["train/optimizer_steps"] for m in steps[:2]) >= 1  # a real update before a later rollout
        runs[linear] = [(m["reward/mean"], m["rollout/response_length_mean"]) for m in steps]
        runs[linear + " eval"] = [json.loads(line)["response"] for f in sorted((out / "out" / "e2e" / "evals").glob("*.jsonl"))
                                  for line in f.read_text().splitlines()]
    assert runs["packed"] == runs["plain"] and runs["packed eval"] == runs["plain eval"] and runs["packed eval"]
