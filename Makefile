# kv-agent developer entry points. Every target installs what it needs from this repository's
# own files (Debian packages via apt, Python packages via pip into .venv).
#
#   make test   - install deps, build, run C++ (ctest: unit, model, e2e, redis) and Python tests
#   make demo   - the main job: LoCoMo memory demo on the default model with a local store
#   make gpu-test (on a GPU machine) - CUDA kernels and gpu-labelled tests
#   make fuzz   - libFuzzer targets (clang, ASan+UBSan), FUZZ_SECONDS each (part of make test)

SHELL := /bin/bash
PY_SYS ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
BUILD ?= build
JOBS ?= $(shell nproc)
CMAKE_FLAGS ?=
LOCOMO ?= ../shared/data/locomo/locomo10_dev.json
# Multi-threaded tests run under ThreadSanitizer.
TSAN_TESTS := store_concurrency_test index_concurrency_test disk_thread_test thread_pool_test
space := $(subst ,, )
# ccache (CMakeLists.txt, KVAGENT_CCACHE): paths relative to the checkout, so another clone of the
# same sources hits the same cache entries.
export CCACHE_BASEDIR := $(CURDIR)
export CCACHE_NOHASHDIR := 1

APT_PACKAGES := cmake ninja-build g++ libgtest-dev libgmock-dev libbenchmark-dev libxxhash-dev \
	liburing-dev libsqlite3-dev libhiredis-dev redis-server clang-19 libclang-rt-19-dev ccache

.PHONY: pydev all deps deps-apt deps-py build build-py test test-cpp test-py test-sanitize asan tsan \
	sglang-venv test-engine-sglang vllm-venv test-engine-vllm \
	demo gpu-test lint format clean bench fuzz llama-cpp

all: build

deps: deps-apt deps-py

# Installs missing Debian packages (apt-get update only when something is missing).
deps-apt:
	@missing=""; for p in $(APT_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
	  echo "apt: installing$$missing"; \
	  SUDO=$$( [ $$(id -u) -eq 0 ] && echo "" || echo sudo ); \
	  $$SUDO apt-get update -q && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -q $$missing; \
	fi

$(VENV)/.deps-stamp: pyproject.toml requirements-dev.txt
	test -x $(PY) || $(PY_SYS) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q -r requirements-dev.txt
	touch $@

deps-py: $(VENV)/.deps-stamp

# llama.cpp's static libraries for the llama.cpp engine, built once from the llama-cpp-python
# sdist's vendored sources into build-deps/ (CMake's KVAGENT_LLAMA_CPP=AUTO picks them up).
llama-cpp: deps-apt deps-py
	scripts/build_llama_cpp.sh $(PY)

# C++ library, tests and benchmarks.
build: deps-apt llama-cpp
	cmake -S . -B $(BUILD) -G Ninja -DCMAKE_BUILD_TYPE=RelWithDebInfo $(CMAKE_FLAGS)
	cmake --build $(BUILD) -j $(JOBS)

# The Python package with its nanobind extension, installed editable into .venv.
build-py: deps-apt deps-py llama-cpp
	$(PIP) install -q --no-build-isolation --no-deps -e .

test-cpp: build
	ctest --test-dir $(BUILD) -L 'unit|model|e2e|redis' --output-on-failure -j $(JOBS)

test-py: build-py
	$(PY) -m pytest -m "not gpu" -q

# ASan+UBSan over the unit suite, TSan over the concurrency tests.
asan: deps-apt
	cmake -S . -B build-asan -G Ninja -DCMAKE_BUILD_TYPE=Debug -DKVAGENT_SANITIZE=address -DKVAGENT_CUDA=OFF -DKVAGENT_BUILD_BENCH=OFF -DKVAGENT_LLAMA_CPP=OFF
	cmake --build build-asan -j $(JOBS)
	ASAN_OPTIONS=detect_leaks=1 ctest --test-dir build-asan -L unit --output-on-failure -j $(JOBS)

tsan: deps-apt
	cmake -S . -B build-tsan -G Ninja -DCMAKE_BUILD_TYPE=RelWithDebInfo -DKVAGENT_SANITIZE=thread -DKVAGENT_CUDA=OFF -DKVAGENT_BUILD_BENCH=OFF -DKVAGENT_LLAMA_CPP=OFF
	cmake --build build-tsan -j $(JOBS) --target $(TSAN_TESTS)
	TSAN_OPTIONS=halt_on_error=1 ctest --test-dir build-tsan -L unit -R '$(subst $(space),|,$(TSAN_TESTS))' --output-on-failure

test-sanitize: asan tsan

# libFuzzer targets (tests/fuzz), built with clang under ASan+UBSan, each run FUZZ_SECONDS.
# clang 19: Debian 12's default clang 14 rejects __builtin_cpu_supports("f16c") (src/index).
FUZZ_SECONDS ?= 12
fuzz: deps-apt
	cmake -S . -B build-fuzz -G Ninja -DCMAKE_BUILD_TYPE=RelWithDebInfo -DCMAKE_C_COMPILER=clang-19 -DCMAKE_CXX_COMPILER=clang++-19 \
	  -DKVAGENT_FUZZ=ON -DKVAGENT_SANITIZE=address -DKVAGENT_CUDA=OFF -DKVAGENT_BUILD_TESTS=OFF -DKVAGENT_BUILD_BENCH=OFF -DKVAGENT_LLAMA_CPP=OFF $(CMAKE_FLAGS)
	cmake --build build-fuzz -j $(JOBS) --target fuzz_targets
	tests/fuzz/run_fuzz.sh build-fuzz $(FUZZ_SECONDS)

test: test-cpp test-py test-sanitize test-engine-vllm test-engine-sglang fuzz

# vLLM (community CPU build from PyPI) in its own venv: it pins torch 2.13.0+cpu and
# transformers<5.20 (docs/engine-vllm.md). It pulls CUDA builds of torchvision, torchaudio and
# torchcodec that break `import vllm` on CPU: removed after the install.
VLLM_VENV ?= .venv-vllm
VLLM_PY := $(VLLM_VENV)/bin/python

$(VLLM_VENV)/.deps-stamp: requirements-vllm.txt constraints-vllm.txt
	test -x $(VLLM_PY) || $(PY_SYS) -m venv $(VLLM_VENV)
	$(VLLM_PY) -m pip install -q -r requirements-vllm.txt -c constraints-vllm.txt
	$(VLLM_PY) -m pip uninstall -q -y torchvision torchaudio torchcodec
	touch $@

# This package in the vLLM venv: a wheel built by .venv's build tools (same CPython ABI; the
# extension build in build/{wheel_tag} is the one build-py made, so nothing recompiles).
vllm-venv: build-py $(VLLM_VENV)/.deps-stamp
	rm -rf .whl/vllm
	$(PIP) wheel -q --no-build-isolation --no-deps -w .whl/vllm .
	$(VLLM_PY) -m pip install -q --no-deps --force-reinstall .whl/vllm/kv_agent-*.whl

test-engine-vllm: vllm-venv
	$(VLLM_PY) -m pytest -m engine -q tests/python/test_engine_vllm*.py

# SGLang 0.5.23 in its own venv (its torch/transformers pins differ from .venv's): the minimal set
# from requirements-sglang.txt + sglang without its CUDA-only dependencies. This package comes
# from the source tree (a .pth file) with the extension build-py made for the same interpreter
# (linked next to the sources, as pydev does), so nothing is compiled twice.
# SGLang's server cannot start without its CUDA kernels: docs/engine-sglang.md.
SGLANG_VENV ?= .venv-sglang
SGLANG_PY := $(SGLANG_VENV)/bin/python
SGLANG_VERSION := 0.5.23

$(SGLANG_VENV)/.deps-stamp: requirements-sglang.txt
	test -x $(SGLANG_PY) || $(PY_SYS) -m venv $(SGLANG_VENV)
	$(SGLANG_PY) -m pip install -q -r requirements-sglang.txt
	$(SGLANG_PY) -m pip install -q --no-deps sglang==$(SGLANG_VERSION)
	touch $@

sglang-venv: build-py $(SGLANG_VENV)/.deps-stamp
	echo "$(CURDIR)/python" > $$($(SGLANG_PY) -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')/kv_agent_src.pth
	ln -sf $$($(PY) -c 'import os, kv_agent._core as c; print(os.path.realpath(c.__file__))') python/kv_agent/

test-engine-sglang: sglang-venv
	$(SGLANG_PY) -m pytest -m engine -q tests/python/test_engine_sglang_storage.py tests/python/test_engine_sglang.py

# In-tree development build of the extension without pip: build-py/ + a symlink in
# python/kv_agent, used with PYTHONPATH=python (several work trees can share one venv).
# PYDEV_CUDA=ON builds the CUDA bindings in (kv_agent.cuda, Store.get_device; needs nvcc).
PYDEV_CUDA ?= OFF
pydev: deps-apt llama-cpp
	cmake -S . -B build-py -G Ninja -DKVAGENT_BUILD_PYTHON=ON -DKVAGENT_BUILD_TESTS=OFF -DKVAGENT_BUILD_BENCH=OFF \
	  -DKVAGENT_CUDA=$(PYDEV_CUDA) -DPython_EXECUTABLE=$(abspath $(PY))
	cmake --build build-py -j $(JOBS)
	cd python/kv_agent && ln -sf ../../build-py/bindings/$$(cd ../../build-py/bindings && ls _core*.so) .

demo: build-py
	$(PY) -m kv_agent.cli demo --locomo $(LOCOMO)

gpu-test:
	cmake -S . -B build-gpu -G Ninja -DKVAGENT_CUDA=ON
	cmake --build build-gpu -j $(JOBS)
	ctest --test-dir build-gpu -L gpu --output-on-failure

bench: build
	@for b in $(BUILD)/bench/*_bench; do echo "== $$b"; $$b; done

lint: deps-py
	$(VENV)/bin/ruff check python tests/python bench
	clang-format --dry-run --Werror $$(git ls-files '*.h' '*.cc' '*.cu' '*.cuh')

format: deps-py
	$(VENV)/bin/ruff format python tests/python bench
	clang-format -i $$(git ls-files '*.h' '*.cc' '*.cu' '*.cuh')

clean:
	rm -rf $(BUILD) build-asan build-tsan build-gpu build-fuzz
