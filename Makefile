# vlmad: `make demo` (main job on generated data) and `make test` (test suite) set everything up themselves.
SHELL := /bin/bash
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
ARGS ?=
# pytest-xdist workers: the suite sets torch to 1 thread per process, so one worker per core; whole files go to one
# worker (--dist loadfile) so a module's shared set-up (an export, a server, a DDP reference run) is built once
WORKERS ?= 2
XDIST := -n $(WORKERS) --dist loadfile

.PHONY: help install test test-fast test-all parity lint format demo bench gpu-check smoke train evaluate report wheel clean

help: ## list targets
	@grep -E '^[a-z-]+:.*##' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-10s %s\n", $$1, $$2}'

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[dev]'
	touch $(STAMP)

install: $(STAMP) ## create .venv and install vlmad with dev extras (first use only)

test: $(STAMP) ## fast test suite (no network, no real weights), incl. parity with the reference fixtures
	$(BIN)/python -m pytest $(XDIST) -m "not slow and not gpu and not weights" $(ARGS)

test-fast: $(STAMP) ## the inner loop while editing: unit + parity tests only (no end-to-end runs; target <= 90 s)
	$(BIN)/python -m pytest $(XDIST) tests/unit tests/parity -m "not slow and not gpu and not weights" -q $(ARGS)

test-all: $(STAMP) ## every test that can run here (incl. slow)
	$(BIN)/python -m pytest $(XDIST) -m "not gpu and not weights" $(ARGS)

parity: $(STAMP) ## only the parity tests (VLMAD_REFERENCE_FIXTURES=DIR points them at another fixture set)
	$(BIN)/python -m pytest -m parity $(ARGS)

lint: $(STAMP) ## ruff check + format check + notebooks committed without outputs
	$(BIN)/ruff check vlmad tests train.py evaluate.py
	$(BIN)/ruff format --check vlmad tests train.py evaluate.py
	$(BIN)/nbstripout --verify notebooks/*.ipynb

format: $(STAMP) ## ruff fix + format
	$(BIN)/ruff check --fix vlmad tests train.py evaluate.py
	$(BIN)/ruff format vlmad tests train.py evaluate.py

demo: $(STAMP) ## generate synthetic data, run the method comparison on the tiny random-weights backbone
	$(BIN)/python -m vlmad.demo $(ARGS)

bench: $(STAMP) ## speed benchmarks (random weights, CPU)
	$(BIN)/python -m vlmad.bench $(ARGS)

gpu-check: $(STAMP) ## one CUDA GPU, < 5 min: every method fp32 vs bf16 (img/s, memory, agreement) -> gpu_check.json
	$(BIN)/python -m vlmad.bench gpu_check $(ARGS)

smoke: $(STAMP) ## seconds-long train+test on synthetic data
	$(BIN)/python train.py experiment=smoke $(ARGS)

train: $(STAMP) ## python train.py $(ARGS)
	$(BIN)/python train.py $(ARGS)

evaluate: $(STAMP) ## python evaluate.py $(ARGS)
	$(BIN)/python evaluate.py $(ARGS)

report: $(STAMP) ## one table for a sweep or comparison dir (no torch import): make report DIR=multirun/... [ARGS=--per-category]
	$(BIN)/python -m vlmad.outputs.report $(DIR) $(ARGS)

wheel: $(STAMP) ## build dist/vlmad-*.whl (conf/ inside; `pip install` it anywhere, then `vlmad train|evaluate|...`)
	$(BIN)/pip wheel . --no-deps --no-build-isolation -q -w dist && rm -rf build

clean: ## remove caches and outputs (keeps .venv)
	rm -rf .pytest_cache .ruff_cache outputs multirun build dist
