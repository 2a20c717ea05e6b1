# Two entry points for a fresh clone (see README): `make chat` and `make test`.
# TORCH pins the CPU build that lies on this project's machines; elsewhere any
# torch >= 2.4 works: `make chat TORCH=torch`.
PYTHON ?= python3
TORCH ?= torch==2.13.0
VENV := .venv
BIN := $(VENV)/bin

.PHONY: setup dev chat test lint

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

setup: $(VENV)/.runtime
$(VENV)/.runtime: pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet "$(TORCH)" -e .
	touch $@

dev: $(VENV)/.dev
$(VENV)/.dev: pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet "$(TORCH)" -e ".[dev]"
	touch $@ $(VENV)/.runtime

chat: setup
	$(BIN)/lmforge chat --model smollm2

test: dev
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/python -m pytest -q

lint: dev
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/ruff format --check src tests benchmarks
