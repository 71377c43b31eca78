# Set-up and the two quickstart commands (see README.md).
VENV ?= .venv
PY := $(VENV)/bin/python
# the CPU build of torch; a bare `torch` may pull a multi-GB CUDA build
TORCH ?= torch==2.13.0
export HF_HUB_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false

# transformers 4 in a folder of its own, for its question-answering pipeline (gone from
# transformers 5): tests/test_export.py and benchmarks/export_agreement.py run it with this
# folder first on PYTHONPATH, in a separate process
T4 := $(VENV)/transformers4
T4_PACKAGES := transformers==4.57.1 huggingface_hub==0.36.2 tokenizers==0.22.2 \
	requests urllib3 idna certifi charset_normalizer

.PHONY: setup demo test test-slow test-all lint bench wheel-check

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q -e ".[dev,demo]"  # editable, for development; dev includes demo
	touch $@

$(T4)/.installed: $(VENV)/.installed
	$(PY) -m pip install -q --no-deps --upgrade --target $(T4) $(T4_PACKAGES)
	touch $@

setup: $(VENV)/.installed $(T4)/.installed

demo: setup
	$(PY) -m qa_lightning.train experiment=demo

test: setup
	$(VENV)/bin/ruff check src tests benchmarks
	$(VENV)/bin/ruff format --check src tests benchmarks
	$(PY) -m pytest -q -m "not slow"

# the slow set (real MiniLM, shared SQuAD data, fault injection); CI runs it after `make test`
test-slow: setup
	$(PY) -m pytest -q -m slow

test-all: setup
	$(PY) -m pytest -q

bench: setup
	$(PY) benchmarks/run_all.py

# the built wheel (+ demo extra) in a fresh virtualenv, from an empty directory: demo epoch, predict
wheel-check:
	TORCH="$(TORCH)" scripts/wheel_check.sh
