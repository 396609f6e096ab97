# Two commands do all set-up on a fresh machine with only Python:
#   make tune   creates .venv, installs feedtune, writes the embedded dataset, runs the main job
#   make test   creates/updates .venv with the test extras, lints, runs the whole test suite
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# torch and torchvision are pinned first so pip takes the builds this machine caches; a range
# would let pip pick a newer multi-GB download.
TORCH := torch==2.14.1 torchvision==0.29.1

.PHONY: install install-test data train tune test lint format clean gpu-check

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --upgrade pip

$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/pip install $(TORCH)
	$(BIN)/pip install -e .
	touch $@

$(VENV)/.installed-test: pyproject.toml $(VENV)/.installed
	$(BIN)/pip install -e ".[test]"
	touch $@

install: $(VENV)/.installed
install-test: $(VENV)/.installed-test

data: install
	$(BIN)/feedtune data

train: data
	PATH="$(abspath $(BIN)):$$PATH" $(BIN)/mlflow run . -e train --env-manager local

tune: data
	PATH="$(abspath $(BIN)):$$PATH" $(BIN)/mlflow run . -e tune --env-manager local

lint: install-test
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/ruff format --check src tests benchmarks
	$(BIN)/lint-imports

format: install-test
	$(BIN)/ruff format src tests benchmarks
	$(BIN)/ruff check --fix src tests benchmarks

# Two workers: many tests wait on processes, servers and heartbeats. Each module runs on one
# worker (--dist loadfile), so its servers and processes are never shared. (Four workers,
# or tests handed out one by one, took longer on two cores: BENCHMARKS.md, "Test suite".)
test: lint
	$(BIN)/python -m pytest -n 2 --dist loadfile

# On a CUDA machine, within 8 minutes: the CUDA tests, bench, train and tune with a real model
# (README, "Several processes or GPUs"); OUT=folder (new or empty) for the logs and summary.
# Exits 3 at once where no CUDA device is present.
gpu-check: install-test
	$(BIN)/python benchmarks/gpu_check.py $(or $(OUT),gpu-check-out)

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
