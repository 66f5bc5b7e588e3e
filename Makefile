# Two commands for a fresh machine:
#   make demo   set up, then generate text with the bundled demo model
#   make test   set up, then lint, type-check and run the whole test suite
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin

.PHONY: setup demo test lint bench

$(BIN)/edge-agent: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e ".[dev]"
	touch $@

setup: $(BIN)/edge-agent

demo: setup
	$(BIN)/edge-agent generate models/demo "The edge agent" --max-tokens 80

lint: setup
	$(BIN)/ruff check agent tests models bench
	$(BIN)/ruff format --check agent tests models bench
	$(BIN)/mypy

test: lint
	$(BIN)/pytest -q

bench: setup
	$(BIN)/pip install -q -e ".[models]"
	$(BIN)/python bench/engine_bench.py
