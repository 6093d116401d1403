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
"""

import logging
import os

ENV = "OPEN_INSTRUCT2_LOGPROB_TEMPERATURE"

log = logging.getLogger(__name__)


def register() -> None:
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
