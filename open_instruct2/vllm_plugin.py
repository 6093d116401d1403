"""A vLLM plugin: serve log-probs at a temperature, so a vLLM reference matches the trainer's log-probs.

Rollouts are sampled at --temperature T and the trainer takes every log-prob from softmax(logits / T).
vLLM computes prompt log-probs (what the reference uses) from raw logits, whatever the request's
temperature ("prompt tokens skip sampling processors"). With OPEN_INSTRUCT2_LOGPROB_TEMPERATURE=T in the
server's environment, this plugin multiplies every model's logits by 1/T (vLLM's LogitsProcessor `scale`,
the same knob Llama's `logit_scale` uses), so prompt log-probs are those of softmax(logits / T).

vLLM loads it in every one of its processes through the `vllm.general_plugins` entry point that
open-instruct2's package declares; without the variable it does nothing. A launched reference server gets
the variable from the trainer. For your own server (endpoint_vllm) with open-instruct2 installed beside
vLLM: `OPEN_INSTRUCT2_LOGPROB_TEMPERATURE=0.7 vllm serve ...`. The trainer's start-up probe checks the
served log-probs against its own at T and names this variable when they match temperature 1 instead.

It also fixes in-place weight reloading (`/collective_rpc` reload_weights, the rollout server's weight sync)
for models whose output layer is tied to the input embedding (SmolLM2, Qwen2.5-0.5B, Llama 3.2 1B...): vLLM
0.32 reloads layer by layer, skips `lm_head` of a tied model (there is no such tensor in the checkpoint),
then puts its old tensors back ("ParallelLMHead: Failed to load weights"). The weight itself is shared with
the reloaded embedding, but on CPU the logits come from a GEMM copy packed at the first load, which stays
stale: served log-probs were off by up to 0.35 after a sync that changed the embedding (3e-5 with this
fix; 5e-5 without it when the embedding did not change). After a reload the output layer is re-processed.

And with OPEN_INSTRUCT2_VLLM_IDLE_SPIN_S=s (launched servers on CPU get 0.01), vLLM's worker stops
busy-waiting s seconds after its last message instead of 1 s: it polls its shared-memory queue with
sched_yield for a full second after every request, one core's worth of CPU taken from the trainer, whose
update starts right then (measured: an update 1.0 s slower while the idle worker burned 1.0 CPU-second).
"""

import logging
import os

ENV = "OPEN_INSTRUCT2_LOGPROB_TEMPERATURE"

log = logging.getLogger(__name__)


SPIN_ENV = "OPEN_INSTRUCT2_VLLM_IDLE_SPIN_S"


def register() -> None:
    _retie_embeddings_after_reload()
    _shorten_idle_spin()
    value = os.environ.get(ENV)
    if not value:
        return
    temperature = float(value)
    if temperature == 1.0:
        return
    from vllm.model_executor.layers.logits_processor import LogitsProcessor

    if getattr(LogitsProcessor, "_open_instruct2_temperature", None) is not None:
        return  # vLLM may load plugins more than once per process
    original_init = LogitsProcessor.__init__

    def init_with_temperature(self, *args, **kwargs):
        original_init(self, *args, **kwargs)
        self.scale = self.scale / temperature

    LogitsProcessor.__init__ = init_with_temperature
    LogitsProcessor._open_instruct2_temperature = temperature
    log.info("open-instruct2: logits are divided by %g (log-probs at the sampling temperature)", temperature)


def _retie_embeddings_after_reload() -> None:
    try:
        from vllm.model_executor.model_loader.reload import inplace
    except ImportError:  # another vLLM version: nothing to fix there
        return
    original = inplace.finalize_layerwise_reload
    if getattr(original, "_open_instruct2", False):
        return

    def finalize(model, *args, **kwargs):
        result = original(model, *args, **kwargs)
        if retie_output_layer(model):
            log.info("open-instruct2: reloaded weights: the output layer is tied to the embedding again")
        return result

    finalize._open_instruct2 = True
    inplace.finalize_layerwise_reload = finalize


def retie_output_layer(model) -> bool:
    """A tied model's lm_head: point it at the embedding's (reloaded) weight and re-run its weight processing
    (on CPU that re-packs the GEMM weights the logits are computed with). True for a tied model."""
    lm_head, embed = getattr(model, "lm_head", None), getattr(getattr(model, "model", None), "embed_tokens", None)
    if lm_head is None or embed is None or not getattr(getattr(model, "config", None), "tie_word_embeddings", False):
        return False
    if lm_head.weight is not embed.weight:
        lm_head.weight = embed.weight
    method = getattr(lm_head, "quant_method", None)
    if method is not None and hasattr(method, "process_weights_after_loading"):
        method.process_weights_after_loading(lm_head)
    return True


def _shorten_idle_spin() -> None:
    value = os.environ.get(SPIN_ENV)
    if not value:
        return
    try:
        from vllm.distributed.device_communicators import shm_broadcast
    except ImportError:
        return
    condition = getattr(shm_broadcast, "SpinCondition", None)
    if condition is None or getattr(condition, "_open_instruct2_spin", None) is not None:
        return
    seconds = float(value)
    original_init = condition.__init__

    def init(self, *args, **kwargs):
        original_init(self, *args, **kwargs)
        if self.is_reader:
            self.busy_loop_s = min(self.busy_loop_s, seconds)

    condition.__init__ = init
    condition._open_instruct2_spin = seconds
