# The two commands in README.md are `make demo` and `make test`; both set up first.
VENV ?= .venv
PY := $(VENV)/bin/python
# test files run in parallel, each in one worker (engine start-up leaves cores idle); 1: one by one
TEST_WORKERS ?= 2

.PHONY: setup model demo test test-all test-quick clean-venv

setup:
	@VENV=$(VENV) bash scripts/setup.sh

model: setup
	@$(PY) -m vllm_vtensor.models smollm2

demo: setup
	@$(PY) -m vllm_vtensor.demo

test: setup
	@$(PY) -m pytest -ra -n $(TEST_WORKERS) --dist loadfile -m "not slow" tests

test-all: setup
	@$(PY) -m pytest -ra -n $(TEST_WORKERS) --dist loadfile tests

test-quick: setup
	@$(PY) -m pytest -ra -m "not e2e" tests

clean-venv:
	rm -rf $(VENV)
