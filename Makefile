# Two entry points for a fresh clone (see README): `make demo` and `make test`.
# TORCH pins the CPU build that lies on this project's machines; elsewhere any
# torch >= 2.4 works: `make demo TORCH=torch`.
PYTHON ?= python3
TORCH ?= torch==2.13.0
VENV := .venv
BIN := $(VENV)/bin

.PHONY: setup dev demo chat test lint llamacpp

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

setup: $(VENV)/.runtime
$(VENV)/.runtime: pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet "$(TORCH)" -e .
	touch $@

dev: $(VENV)/.dev
$(VENV)/.dev: pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet "$(TORCH)" -e ".[dev]"
	$(MAKE) llamacpp
	touch $@ $(VENV)/.runtime

# llama.cpp (through llama-cpp-python, built from its sdist for this CPU) is the
# reference for GGUF export and inference speed. pip caches the built wheel, so only
# the first build takes minutes. AMX is off: GCC 12 miscompiles its tile set-up.
LLAMACPP_CMAKE ?= -DGGML_NATIVE=ON -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF
llamacpp: | $(BIN)/python
	CMAKE_BUILD_PARALLEL_LEVEL=2 CMAKE_ARGS="$(LLAMACPP_CMAKE)" \
		$(BIN)/pip install --quiet --no-binary llama-cpp-python llama-cpp-python==0.3.36

demo: setup
	$(BIN)/lmforge demo

chat: setup
	$(BIN)/lmforge chat --model smollm2

test: dev
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/python -m pytest -q

lint: dev
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/ruff format --check src tests benchmarks
