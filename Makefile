# Set-up and the two quickstart commands (see README.md).
VENV ?= .venv
PY := $(VENV)/bin/python
# the CPU build of torch; a bare `torch` may pull a multi-GB CUDA build
TORCH ?= torch==2.13.0
export HF_HUB_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false

.PHONY: setup demo test test-all lint bench

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q -e ".[dev]"
	touch $@

setup: $(VENV)/.installed

demo: setup
	$(PY) -m qa_lightning.train experiment=demo

test: setup
	$(VENV)/bin/ruff check src tests benchmarks
	$(VENV)/bin/ruff format --check src tests benchmarks
	$(PY) -m pytest -q -m "not slow"

test-all: setup
	$(PY) -m pytest -q

bench: setup
	$(PY) benchmarks/run_all.py
