# `make demo` and `make test` set everything up on a fresh machine (Python 3.11 + pip).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	touch $@

.PHONY: install demo test test-fast lint
install: $(VENV)/.installed

demo: $(VENV)/.installed
	$(VENV)/bin/raysl demo

# Every tier (tests/unit, tests/integration, tests/drills) in two pytest-xdist workers: the
# integration tier runs in one, the drills in the other, slowest first, and whichever worker is
# free takes the next drill, then the unit tests (tests/conftest.py), so both end together.
# The log, each test named as it starts and the 30 slowest at the end, is also kept in
# test-durations.txt; the exit code is pytest's.
test: SHELL := /bin/bash
test: .SHELLFLAGS := -o pipefail -c
test: $(VENV)/.installed
	$(PY) -m pytest -n 2 -v --durations=30 2>&1 | tee test-durations.txt

# The unit tier alone: one process, no Ray, a few minutes.
test-fast: $(VENV)/.installed
	$(PY) -m pytest -q tests/unit

# Format, lint, import layers and type checks (ruff, import-linter, mypy; configured in pyproject.toml).
lint: $(VENV)/.installed
	$(VENV)/bin/ruff format --check raysl tests scripts
	$(VENV)/bin/ruff check raysl tests scripts
	$(VENV)/bin/lint-imports
	$(VENV)/bin/mypy
