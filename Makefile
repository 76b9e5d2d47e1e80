# seal-jax: the two commands of the README.
#   make demo   creates .venv, installs, fetches and converts the bundled CPU model, runs the main job
#   make test   creates .venv (with the test extra) if needed and runs the test suite
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
export HF_HOME := $(CURDIR)/.cache/hf
export HF_DATASETS_CACHE := $(CURDIR)/.cache/hf/datasets
export TOKENIZERS_PARALLELISM := false
# CPU work: with the [aot] compilers installed (the test extra), JAX would otherwise probe for a TPU and a GPU first
JAX_PLATFORMS ?= cpu
export JAX_PLATFORMS

.PHONY: demo test fetch bench lint clean

$(VENV)/bin/python:
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip

# Runtime install (demo). Re-runs when pyproject.toml changes.
$(VENV)/.installed: $(VENV)/bin/python pyproject.toml
	$(PY) -m pip install --quiet -e .
	touch $@

# Test install: torch first and pinned, so pip takes the CPU build and not a multi-GB CUDA one.
$(VENV)/.installed-test: $(VENV)/.installed
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e '.[test]'
	touch $@

fetch: $(VENV)/.installed
	$(VENV)/bin/seal-jax fetch smollm2-135m-instruct

demo: fetch
	$(VENV)/bin/seal-jax demo

# Two pytest-xdist workers (most tests are single-threaded compiles), each test file whole in one worker (its
# module fixtures built once) and the files that compile for TPUs all in the same one (libtpu: one process at
# a time): tests/conftest.py, pytest_xdist_make_scheduler.
# TEST_WORKERS=0 runs every test in this process.
TEST_WORKERS ?= 2
test: $(VENV)/.installed-test
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile

bench: $(VENV)/.installed-test fetch
	$(VENV)/bin/seal-jax bench --out bench-results/bench.json

lint: $(VENV)/.installed-test
	$(VENV)/bin/ruff check seal_jax tests

clean:
	rm -rf $(VENV) .cache .pytest_cache
