# The two commands in README.md are `make demo` and `make test`; both set up first.
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: setup model demo test test-quick clean-venv

setup:
	@VENV=$(VENV) bash scripts/setup.sh

model: setup
	@$(PY) -m vllm_vtensor.models smollm2

demo: setup
	@$(PY) -m vllm_vtensor.demo

test: setup
	@$(PY) -m pytest -ra tests

test-quick: setup
	@$(PY) -m pytest -ra -m "not e2e" tests

clean-venv:
	rm -rf $(VENV)
