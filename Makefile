# `make demo` and `make test` set everything up on a fresh machine (Python 3.11 + pip).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	touch $@

.PHONY: install demo test lint
install: $(VENV)/.installed

demo: $(VENV)/.installed
	$(VENV)/bin/raysl demo

test: $(VENV)/.installed
	$(PY) -m pytest -q --durations=15

# Format, lint, import layers and type checks (ruff, import-linter, mypy; configured in pyproject.toml).
lint: $(VENV)/.installed
	$(VENV)/bin/ruff format --check raysl tests scripts
	$(VENV)/bin/ruff check raysl tests scripts
	$(VENV)/bin/lint-imports
	$(VENV)/bin/mypy
