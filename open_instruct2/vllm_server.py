"""A vLLM OpenAI-compatible server as this trainer uses it: an HTTP client with timeouts, retries and checked
replies, and a launched server process (own process group, environment-only secrets, relaunch, cleanup).
Both the reference (reference_vllm.py) and the rollout server (rollout_vllm.py) are built on these.

Start-up checks shared by both: /v1/models (served name discovered or given), and a probe sequence whose
tokens the server must decode as the policy's tokenizer does and whose log-probs must match the policy's
own at the sampling temperature, within a tolerance.
"""

import atexit
import logging
import math
import os
import shlex
import signal
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from typing import NamedTuple

import requests
import torch

from .errors import UserError
from .runtime import Runtime, cuda_available

log = logging.getLogger(__name__)

PROBE_TEXT = "The quick brown fox jumps over the lazy dog. What is 12 + 30? The answer is 42."
RETRYABLE_STATUS = {429, 500, 502, 503, 504}
POOL_SIZE = 64
"""Connections a client keeps open (requests' default of 10 logs "pool is full" when more requests are in flight)."""


class ServerFailure(Exception):
    """A vLLM server could not do what was asked (mid-run, the trainer saves what it has and stops)."""


class ServerUnavailable(ServerFailure):
    """The server did not answer after every retry (it may have died)."""


class ServerBadReply(ServerFailure):
    """The server answered, but not with what was asked for (or refused the request)."""


# ---------------------------------------------------------------- HTTP client


class VLLMClient:
    """Minimal client for the endpoints the reference needs, with timeouts and retries."""

    def __init__(self, base_url: str, api_key: str | None, timeout_s: float, max_retries: int,
                 chunk_tokens: int = 8192, chunk_sequences: int = 64, concurrency: int = 4, key_source: str = "--reference_api_key"):
        self.base_url = base_url.rstrip("/")
        self.headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.timeout_s, self.max_retries = timeout_s, max_retries
        self.chunk_tokens, self.chunk_sequences, self.concurrency = chunk_tokens, chunk_sequences, concurrency
        self.key_source = key_source
        """Where the API key came from, for the message when the server rejects it."""
        self.model: str | None = None
        self.session = requests.Session()
        # requests in flight at once (scoring chunks, one generation request per prompt): keep a connection for each
        adapter = requests.adapters.HTTPAdapter(pool_connections=4, pool_maxsize=POOL_SIZE)
        self.session.mount("http://", adapter)
        self.session.mount("https://", adapter)

    def _request(self, method: str, path: str, payload: dict | None = None, retries: int | None = None, json_reply: bool = True) -> dict:
        retries = self.max_retries if retries is None else retries
        url = f"{self.base_url}{path}"
        problem = ""
        for attempt in range(retries + 1):
            if attempt:
                time.sleep(min(0.5 * 2 ** (attempt - 1), 8.0))  # 0.5, 1, 2, 4, 8, 8 ... s
            try:
                response = self.session.request(method, url, json=payload, headers=self.headers, timeout=self.timeout_s)
            except requests.Timeout:
                problem = f"no answer within {self.timeout_s:g} s"
                continue
            except requests.RequestException as e:  # connection refused or reset, a reply cut short, ...
                problem = f"cannot connect ({type(e).__name__})"
                continue
            if response.status_code in RETRYABLE_STATUS:
                problem = f"HTTP {response.status_code}"
                continue
            if response.status_code in (401, 403):
                raise UserError(f"the vLLM server at {self.base_url} rejected the API key (HTTP {response.status_code}); check {self.key_source}")
            if response.status_code >= 400:
                detail = _error_detail(response)
                raise UserError(f"the vLLM server at {self.base_url} refused {path} (HTTP {response.status_code}: {detail})")
            if not json_reply:  # admin routes answer plain text
                return {"text": response.text}
            try:
                return response.json()
            except ValueError:
                raise ServerBadReply(f"{url} answered HTTP {response.status_code} with a body that is not JSON: {response.text[:120]!r}") from None
        raise ServerUnavailable(f"{url}: {problem} after {retries + 1} attempt(s)")

    def health(self) -> bool:
        try:
            return self.session.get(f"{self.base_url}/health", timeout=5).status_code == 200
        except requests.RequestException:
            return False

    def models(self) -> list[dict]:
        return self._request("GET", "/v1/models").get("data", [])

    def prompt_logprobs(self, sequences: list[list[int]], top: int = 0) -> list[list]:
        """vLLM's prompt_logprobs list of each sequence, in order; chunks are sent concurrently."""
        chunks, current, tokens = [], [], 0
        for index, seq in enumerate(sequences):
            if current and (tokens + len(seq) > self.chunk_tokens or len(current) >= self.chunk_sequences):
                chunks.append(current)
                current, tokens = [], 0
            current.append(index)
            tokens += len(seq)
        if current:
            chunks.append(current)

        def send(chunk: list[int]) -> list[list]:
            payload = {"model": self.model, "prompt": [sequences[i] for i in chunk], "max_tokens": 1,
                       "prompt_logprobs": top, "temperature": 1.0}
            reply = self._request("POST", "/v1/completions", payload)
            choices = reply.get("choices") if isinstance(reply, dict) else None
            if not isinstance(choices, list) or not all(isinstance(c, dict) and "index" in c and "prompt_logprobs" in c for c in choices):
                raise ServerBadReply(f"the reply has no choices with an index and prompt_logprobs (keys: {list(reply)[:8] if isinstance(reply, dict) else type(reply).__name__})")
            choices = sorted(choices, key=lambda c: c["index"])
            if [c["index"] for c in choices] != list(range(len(chunk))):
                raise ServerBadReply(f"the server answered choices {[c['index'] for c in choices][:10]} for {len(chunk)} sequences")
            return [c["prompt_logprobs"] for c in choices]

        with ThreadPoolExecutor(max_workers=min(self.concurrency, len(chunks))) as pool:
            results = list(pool.map(send, chunks))
        return [entries for chunk_result in results for entries in chunk_result]

    def score(self, sequences: list[list[int]], starts: list[int]) -> list[list[float]]:
        """Log-prob of each token of sequences[i][starts[i]:] given its prefix (starts[i] >= 1)."""
        return [read_logprobs(entries, seq, start, i) for i, (seq, start, entries) in
                enumerate(zip(sequences, starts, self.prompt_logprobs(sequences)))]


def read_logprobs(entries, seq: list[int], start: int, index: int) -> list[float]:
    """The log-probs of seq[start:] from one sequence's prompt_logprobs, checked: one entry per token,
    keyed by the token's own id, holding a log-prob (a number <= 0, -inf allowed; never null or nan)."""
    if not isinstance(entries, list) or len(entries) != len(seq):
        got = f"{len(entries)} entries" if isinstance(entries, list) else repr(type(entries).__name__)
        raise ServerBadReply(f"sequence {index}: prompt_logprobs has {got} for {len(seq)} tokens")
    out = []
    for t in range(start, len(seq)):
        entry = entries[t]
        item = entry.get(str(seq[t])) if isinstance(entry, dict) else None
        value = item.get("logprob") if isinstance(item, dict) else None
        if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value) or value > 1e-3:
            raise ServerBadReply(f"sequence {index}, token {t} (id {seq[t]}): expected a log-prob for that id, got {entry!r:.120}")
        out.append(float(value))
    return out


def _error_detail(response: requests.Response) -> str:
    try:
        body = response.json()
        message = body.get("error", body) if isinstance(body, dict) else body
        if isinstance(message, dict):
            message = message.get("message", message)
        return " ".join(str(message).split())[:300]
    except ValueError:
        return response.text[:300]


# ---------------------------------------------------------------- launched server


class VLLMServer:
    """A vLLM api_server child process in its own process group, logging to `log_path`.

    `role` names it in messages ("reference", "rollout"); `dev_mode` turns on the admin routes the rollout
    server's weight sync needs (VLLM_SERVER_DEV_MODE=1: /collective_rpc, /reset_prefix_cache)."""

    def __init__(self, *, role: str, model_path: str, log_path: str, host: str, port: int, api_key: str | None, temperature: float,
                 startup_timeout_s: float, dtype: str, max_len: int, served_name: str, gpu_fraction: float | None = None,
                 tensor_parallel_size: int = 1, extra_args: str | None = None, dev_mode: bool = False):
        self.role, self.host, self.port = role, host, port
        self.api_key, self.log_path, self.dev_mode = api_key, log_path, dev_mode
        self.temperature = temperature
        self.startup_timeout_s = startup_timeout_s
        self.on_cpu = not cuda_available()
        self.command = [
            sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", model_path,
            "--served-model-name", served_name, "--host", self.host, "--port", str(self.port),
            "--dtype", dtype, "--max-model-len", str(max_len),
            "--generation-config", "vllm",  # sampling exactly as requested: the model's generation_config.json stays out
        ]
        if self.on_cpu:
            self.command.append("--enforce-eager")  # compiling costs a minute of start-up for little gain here
        else:
            if gpu_fraction is None:
                gpu_fraction, why = reference_gpu_fraction(model_path, torch.cuda.get_device_properties(0).total_memory)
                log.info("%s: the launched vLLM may take %.2f of the GPU (%s)", role, gpu_fraction, why)
            self.command += ["--gpu-memory-utilization", f"{gpu_fraction:.3f}", "--tensor-parallel-size", str(tensor_parallel_size)]
        if extra_args:
            self.command += shlex.split(extra_args)
        self.relaunches = 0
        """Times it was relaunched after dying mid-run."""
        self.extra_env: dict[str, str] = {}
        """Variables added to the server's environment."""
        self.process: subprocess.Popen | None = None
        atexit.register(self.stop)

    def environment(self) -> dict:
        from .vllm_plugin import ENV as TEMPERATURE_ENV, SPIN_ENV

        env = dict(os.environ)
        env.pop("VLLM_API_KEY", None)
        env.pop("VLLM_SERVER_DEV_MODE", None)
        if self.dev_mode:
            env["VLLM_SERVER_DEV_MODE"] = "1"
        if self.api_key:
            env["VLLM_API_KEY"] = self.api_key
        env.pop(TEMPERATURE_ENV, None)
        if self.temperature != 1.0:
            env[TEMPERATURE_ENV] = repr(self.temperature)  # log-probs at the sampling temperature (vllm_plugin.py)
        env.update(self.extra_env)
        if self.on_cpu:
            env.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")  # GiB; the reference needs little KV cache
            # vLLM's default binds one core and reserves the rest; scoring and training never overlap, so
            # the server gets every core the trainer may use (1.8x faster scoring on 2 cores).
            cores = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else list(range(os.cpu_count() or 1))
            env.setdefault("VLLM_CPU_OMP_THREADS_BIND", ",".join(map(str, cores)))
            # and its worker stops busy-waiting right after a request instead of 1 s later (vllm_plugin.py)
            env.setdefault(SPIN_ENV, "0.01")
        return env

    def start(self, client: VLLMClient) -> None:
        _check_port_free(self.host, self.port, "--rollout_vllm_port" if self.role == "rollout" else "--reference_launch_port")
        with open(self.log_path, "a") as logfile:
            logfile.write(f"\n=== open-instruct2: starting {shlex.join(self.command)}\n")
            logfile.flush()
            self.process = subprocess.Popen(
                self.command, env=self.environment(), stdout=logfile, stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL, start_new_session=True, preexec_fn=_die_with_parent,
            )
        log.info("%s: launching vLLM (pid %d), log %s", self.role, self.process.pid, self.log_path)
        start = time.time()
        while time.time() - start < self.startup_timeout_s:
            if self.process.poll() is not None:
                code = self.process.returncode
                self.process = None
                raise UserError(f"the vLLM {self.role} server exited with code {code} during start-up: {_last_lines(self.log_path)} (full log: {self.log_path})")
            if client.health():
                log.info("%s: vLLM ready in %.0f s", self.role, time.time() - start)
                return
            time.sleep(0.5)
        self.stop()
        raise UserError(f"the vLLM {self.role} server was not healthy within --reference_startup_timeout_s {self.startup_timeout_s:g}; see {self.log_path} or raise the timeout")

    def relaunch(self, client: VLLMClient, problem: Exception) -> None:
        """Mid-run, the server stopped answering: stop what is left of it and start it again."""
        self.relaunches += 1
        log.warning("%s: %s; relaunching the vLLM %s server (relaunch %d) and retrying", self.role, problem, self.role, self.relaunches)
        self.stop()
        self.start(client)

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def stop(self) -> None:
        """SIGTERM to the server's process group, then SIGKILL to whatever is left, workers included."""
        process, self.process = self.process, None
        if process is None:
            return
        import psutil

        try:
            family = [psutil.Process(process.pid), *psutil.Process(process.pid).children(recursive=True)]
        except psutil.NoSuchProcess:
            family = []
        try:
            os.killpg(process.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            pass
        for p in family:
            try:
                p.kill()
            except psutil.NoSuchProcess:
                pass
        psutil.wait_procs(family, timeout=10)
        log.info("%s: vLLM server stopped", self.role)


def reference_gpu_fraction(model_path: str, total_bytes: int) -> tuple[float, str]:
    """The share of the GPU a launched reference needs: its weights twice (weights, then KV cache and
    activations) plus 2 GiB of CUDA context and graphs, at least 0.1, at most 0.9. The policy trains on
    the same GPU, and its weights, gradients, fp32 masters and AdamW state take 8-16 bytes per parameter;
    vLLM's own default (0.9) would leave it nothing."""
    weights = sum(
        os.path.getsize(os.path.join(model_path, f)) for f in os.listdir(model_path) if f.endswith((".safetensors", ".bin"))
    ) if os.path.isdir(model_path) else 0
    if not weights:
        return 0.3, "weights not in a local folder, so a fixed 0.3"
    need = 2 * weights + 2 * 2**30
    fraction = min(0.9, max(0.1, need / total_bytes))
    return fraction, f"2 x {weights / 2**30:.1f} GiB of weights + 2 GiB of {total_bytes / 2**30:.0f} GiB"


def _check_port_free(host: str, port: int, flag: str) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            raise UserError(f"port {port} on {host} is already in use; choose another {flag} or stop what uses it") from None


def _die_with_parent() -> None:
    """In the child: get SIGTERM if the trainer dies without cleaning up (Linux), so no orphan remains."""
    if sys.platform.startswith("linux"):
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def _last_lines(path: str, n: int = 3) -> str:
    try:
        with open(path, errors="replace") as f:
            lines = [line.strip() for line in f.readlines() if line.strip()]
    except OSError:
        return "(no log)"
    return " | ".join(lines[-n:])[-600:]


def pick_served_model(models: list[dict], wanted: str | None, url: str, flag: str = "--reference_served_model_name") -> dict:
    """The model to use from a /v1/models list: `wanted` (any entry, an adapter included), or else the only base
    model: LoRA adapters loaded into the server (entries with a `parent`, e.g. one a stopped run could not unload)
    are not counted."""
    bases = [m for m in models if not m.get("parent")]
    names = [m["id"] for m in bases]
    if wanted is not None:
        for m in models:
            if m["id"] == wanted:
                return m
        raise UserError(f"{flag} {wanted!r} is not served by {url}; it serves {[m['id'] for m in models]}")
    if len(bases) != 1:
        raise UserError(f"{url} serves {len(bases)} models {names}; choose one with {flag}")
    return bases[0]


class Probe(NamedTuple):
    diff: float | None
    """Mean |served - policy| log-prob on the probe (None: not compared, the served model is not the policy's)."""
    temperature: float
    """The temperature the served log-probs are at: the sampling temperature, or 1 (a plainly started server)."""


def check_probe(client: VLLMClient, tokenizer, policy, runtime: Runtime, compare_logprobs: bool, temperature: float = 1.0,
                role: str = "reference", tolerance: float = 0.1, accept_temperature_1: bool = False) -> Probe:
    """The server must decode our token ids as our tokenizer does, and (when the reference is the policy's
    starting model) give the policy's log-probs at the sampling temperature, within `tolerance` on average
    (bf16 kernels differ more than fp32 ones). A server that gives them at temperature 1 instead (started without
    OPEN_INSTRUCT2_LOGPROB_TEMPERATURE) is refused naming that variable, unless `accept_temperature_1` (the
    reference: its KL term can compare the policy at temperature 1). Returns the mean |difference| and the served
    temperature."""
    ids = tokenizer(PROBE_TEXT, add_special_tokens=False)["input_ids"]
    [entries] = client.prompt_logprobs([ids])
    for t in range(1, len(ids)):
        served = entries[t].get(str(ids[t]))
        ours = tokenizer.decode([ids[t]])
        if served is None or served.get("decoded_token") not in (None, ours):
            got = None if served is None else served.get("decoded_token")
            raise UserError(
                f"the {role} server's tokenizer differs from the policy's (token id {ids[t]} is {got!r} there, {ours!r} here); "
                "serve a model with the policy's tokenizer"
            )
    if not compare_logprobs:
        return Probe(None, temperature)
    served = torch.tensor(read_logprobs(entries, ids, 1, 0))
    from .policy import response_logprobs

    def policy_logprobs(t: float) -> torch.Tensor:
        was_training = policy.training
        policy.eval()
        with torch.no_grad():
            input_ids = torch.tensor([ids], device=runtime.device)
            values = response_logprobs(policy, input_ids, torch.ones_like(input_ids), 1, t)[0].float().cpu()
        policy.train(was_training)
        return values

    diff = float((served - policy_logprobs(temperature)).abs().mean())
    if accept_temperature_1 and temperature != 1.0:  # which of the two it serves: the closer (a T near 1 can pass both tolerances)
        at_1 = float((served - policy_logprobs(1.0)).abs().mean())
        if at_1 < diff and at_1 <= tolerance:
            return Probe(at_1, 1.0)
    if diff > tolerance and temperature != 1.0:
        at_1 = float((served - policy_logprobs(1.0)).abs().mean())
        if at_1 < diff / 2:
            from .vllm_plugin import ENV

            raise UserError(
                f"the {role} server gives log-probs at temperature 1, but rollouts are sampled at --temperature {temperature:g}; "
                f"start it with {ENV}={temperature:g} in its environment (open-instruct2 installed beside vLLM), or train with --temperature 1"
            )
    if diff > tolerance:
        raise UserError(
            f"the {role} server's model does not compute the policy's log-probs (mean |difference| {diff:.3f} on a probe); "
            "serve the policy's starting model, or name the intended one with --reference_model_name_or_path"
        )
    return Probe(diff, temperature)
