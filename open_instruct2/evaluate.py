"""Entry point: `python -m open_instruct2.evaluate MODEL [cfg.yaml] [--flag value ...]`.

Scores one model on held-out data without training: MODEL is a model folder, a hub name, a builtin name, a
checkpoint (`<run>/checkpoints/step_<N>`) or a LoRA adapter folder (a LoRA run's folder; its base model is read
from adapter_config.json). Every training flag is accepted and means what it means in training: the data
(`--dataset_mixer_eval_list`, or builtin:arithmetic's test split when training data is the builtin), the prompt
settings (system prompt, worked examples, chat template and its kwargs), verifiers, reward functions, the judge, and the sampling
(`--eval_num_samples k` for pass@k, `--eval_temperature`, `--eval_max_samples`). Prints the metrics as a table
and writes every completion to <output_dir>/<run_name>/completions.jsonl (and the metrics to metrics.json).
Bad input: one line on stderr, exit 2.
"""

import json
import logging
import os
import sys
import time

from .errors import ConfigError, UserError

log = logging.getLogger(__name__)

USAGE = "python -m open_instruct2.evaluate MODEL [cfg.yaml] [--dataset_mixer_eval_list SOURCE AMOUNT] [--flag value ...]"


def adapter_base(path: str) -> str | None:
    """The base model of a LoRA adapter folder (None: not an adapter folder)."""
    config = os.path.join(path, "adapter_config.json")
    if not os.path.isfile(config):
        return None
    with open(config) as f:
        base = json.load(f).get("base_model_name_or_path")
    if not base:
        raise UserError(f"{config} names no base_model_name_or_path; give the base model with --model_name_or_path and the adapter as MODEL")
    return base


def parse(argv: list[str]):
    from .config import apply_smoke_test, validate
    from .train_grpo import parse_config

    if not argv or argv[0].startswith("-") or argv[0].endswith((".yaml", ".yml")):
        if argv and argv[0] in ("-h", "--help"):
            print(f"usage: {USAGE}\n\n{__doc__.split(chr(10), 2)[2]}\nEvery flag: python -m open_instruct2.train_grpo --help")
            raise SystemExit(0)
        raise ConfigError(f"give the model to evaluate first: {USAGE}")
    model, rest = argv[0], argv[1:]
    cfg = parse_config(rest)
    adapter = adapter_base(model) if os.path.isdir(model) else None
    cfg.model.model_name_or_path = adapter or model
    if adapter:
        cfg.lora.train_mode = "lora"
    if not cfg.experiment.run_name:
        cfg.experiment.run_name = f"eval__{os.path.basename(os.path.normpath(model)).replace(':', '_')}__{int(time.time())}"
    cfg = apply_smoke_test(cfg)
    validate(cfg)
    return cfg, model, adapter is not None


def load(cfg, model: str, is_adapter: bool, runtime):
    """(policy for generation, tokenizer): the model, or the base with the adapter loaded onto it."""
    from .policy import disable_dropout, load_model, load_tokenizer

    if is_adapter and any(os.path.isfile(os.path.join(model, f)) for f in ("tokenizer.json", "tokenizer_config.json")):
        cfg.model.tokenizer_name_or_path = model  # a run's folder holds the tokenizer it trained with
    tokenizer = load_tokenizer(cfg)
    policy = load_model(cfg.model.model_name_or_path, cfg, runtime, trainable=False)
    if is_adapter:
        from peft import PeftModel

        policy = PeftModel.from_pretrained(policy, model)
        policy.requires_grad_(False)
    disable_dropout(policy)
    return policy, tokenizer


def step_of(model: str) -> int:
    """The training step of a checkpoint folder (checkpoints/step_<N>), else 0: it seeds sampled answers (--eval_num_samples
    > 1) as the run's own evaluation at that step was seeded."""
    name = os.path.basename(os.path.normpath(model))
    return int(name[len("step_"):]) if name.startswith("step_") and name[len("step_"):].isdigit() else 0


def print_table(metrics: dict[str, float], how: str) -> None:
    rows = [f"| {k[len('eval/'):]} | {v:.3f} |" for k, v in metrics.items() if k not in ("eval/seconds", "eval/samples_per_prompt")]
    print("\n".join([f"\nevaluation on {int(metrics['eval/prompts'])} prompts ({how}):", "| metric | value |", "|---|---|", *rows]), flush=True)


def run(cfg, model: str, is_adapter: bool) -> str:
    from .config import derive
    from .data import set_chat_template
    from .runtime import apply_runtime, resolve_runtime
    from .tools import build_tools

    derived = derive(cfg)
    runtime = resolve_runtime(cfg.runtime)
    apply_runtime(runtime, cfg.experiment.seed)
    policy, tokenizer = load(cfg, model, is_adapter, runtime)
    set_chat_template(tokenizer, cfg.model.chat_template_name)
    tools = build_tools(cfg, tokenizer)  # --tools ...: answers are multi-turn, as in training
    try:
        return _run(cfg, model, derived, runtime, policy, tokenizer, tools)
    finally:
        if tools is not None:
            tools.runner.close()


def _run(cfg, model: str, derived, runtime, policy, tokenizer, tools) -> str:
    from .config import chat_template_kwargs
    from .data import read_system_prompt
    from .evaluation import describe_sampling, eval_batch_size, evaluate, held_out_prompts
    from .generation_model import make_generation_model
    from .run_setup import make_rubric_scorer, prepare_rewards
    from .tools import template_tools

    template_kwargs = {**chat_template_kwargs(cfg.model), **template_tools(tools, cfg.tools.tool_parser)}
    prompts = held_out_prompts(cfg, tokenizer, read_system_prompt(cfg.data.system_prompt_file), template_kwargs, runtime.device.type)
    if not prompts:
        raise UserError("no evaluation data: give --dataset_mixer_eval_list SOURCE AMOUNT")
    reward_funcs = prepare_rewards(prompts, cfg, derived.num_training_steps)
    rubrics = make_rubric_scorer(cfg)
    generation = make_generation_model(cfg, runtime, policy, max(len(p.prompt_ids) for p in prompts), derived.num_training_steps)
    log.info("evaluate: %s on %d prompts, %s, up to %d tokens each", model, len(prompts), describe_sampling(cfg), cfg.rollout.response_length)
    start = time.perf_counter()
    metrics, records = evaluate(generation.model(), tokenizer, prompts, cfg, runtime.device, eval_batch_size(cfg),
                                static_width=generation.static_width, rubrics=rubrics, reward_funcs=reward_funcs, step=step_of(model),
                                tools=tools)
    metrics["eval/seconds"] = time.perf_counter() - start
    os.makedirs(derived.run_dir, exist_ok=True)
    with open(os.path.join(derived.run_dir, "completions.jsonl"), "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in records)
    with open(os.path.join(derived.run_dir, "metrics.json"), "w") as f:
        json.dump({"model": model, **metrics}, f, indent=2)
    print_table(metrics, describe_sampling(cfg))
    print(f"completions: {os.path.join(derived.run_dir, 'completions.jsonl')}", flush=True)
    return derived.run_dir


def main(argv: list[str] | None = None) -> int:
    from .train_grpo import EXIT_USER_ERROR, quiet_libraries

    argv = sys.argv[1:] if argv is None else argv
    try:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S", stream=sys.stdout)
        quiet_libraries()
        cfg, model, is_adapter = parse(argv)
        logging.getLogger().setLevel(getattr(logging, cfg.experiment.log_level))
        run(cfg, model, is_adapter)
        return 0
    except UserError as e:
        print(f"error: {' '.join(str(e).split())}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
