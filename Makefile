# Two entry points for a fresh clone (see README): `make demo` and `make test`.
# TORCH pins the CPU build that lies on this project's machines; elsewhere any
# torch >= 2.4 works: `make demo TORCH=torch`.
PYTHON ?= python3
TORCH ?= torch==2.13.0
VENV := .venv
BIN := $(VENV)/bin

.PHONY: setup dev demo chat test llamacpp refquant

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
# reference for GGUF export and inference speed. GGML_NATIVE builds for the CPU at hand,
# but -march=native also turns AMX on where a Xeon has it, whatever GGML_AMX_* say, and
# that code dies with SIGILL here: the -mno-amx-* flags win over -march in either order.
# The wheel is cached under a key of the version, the flags and this CPU's feature list,
# so a wheel built for another CPU or with other flags is never reused (pip's own cache
# keys wheels by version only).
LLAMACPP_VERSION := 0.3.36
LLAMACPP_CMAKE ?= -DGGML_NATIVE=ON
LLAMACPP_CFLAGS ?= -mno-amx-tile -mno-amx-int8 -mno-amx-bf16
LLAMACPP_KEY = $(shell (echo "$(LLAMACPP_VERSION) $(LLAMACPP_CMAKE) $(LLAMACPP_CFLAGS)"; \
	grep -m1 '^flags' /proc/cpuinfo) | sha256sum | cut -c1-16)
LLAMACPP_WHEELS = $(HOME)/.cache/lmforge/wheels/llama-cpp-python-$(LLAMACPP_KEY)
llamacpp: | $(BIN)/python
	@if ! ls $(LLAMACPP_WHEELS)/*.whl >/dev/null 2>&1; then \
		echo "building llama-cpp-python $(LLAMACPP_VERSION) for this CPU (minutes, once)"; \
		rm -rf $(LLAMACPP_WHEELS).tmp && \
		CMAKE_BUILD_PARALLEL_LEVEL=2 CMAKE_ARGS="$(LLAMACPP_CMAKE)" \
		CFLAGS="$(LLAMACPP_CFLAGS)" CXXFLAGS="$(LLAMACPP_CFLAGS)" \
		$(BIN)/pip wheel --quiet --no-cache-dir --no-deps --no-binary llama-cpp-python \
			-w $(LLAMACPP_WHEELS).tmp llama-cpp-python==$(LLAMACPP_VERSION) && \
		mv $(LLAMACPP_WHEELS).tmp $(LLAMACPP_WHEELS); \
	fi
	$(BIN)/pip install --quiet --force-reinstall --only-binary llama-cpp-python \
		--find-links $(LLAMACPP_WHEELS) llama-cpp-python==$(LLAMACPP_VERSION)

# llm-compressor (GPTQ's and AWQ's reference for benchmarks/bench_compress_reference.py) pins
# transformers<=5.17 and compressed-tensors==0.19, older than the bench extra's transformers:
# it gets an environment of its own, with lmforge installed there too. Run the benchmark with
# .venv-refquant/bin/python.
REFQUANT := .venv-refquant
refquant:
	$(PYTHON) -m venv $(REFQUANT)
	$(REFQUANT)/bin/pip install --quiet "$(TORCH)" llmcompressor==0.14.0.1
	$(REFQUANT)/bin/pip install --quiet "$(TORCH)" -e .

demo: setup
	$(BIN)/lmforge demo

chat: setup
	$(BIN)/lmforge chat --model smollm2

test: dev
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/python -m pytest -q
