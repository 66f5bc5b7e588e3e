# Two commands for a fresh machine:
#   make demo   set up, then run a broker, the agent on the demo model, and one streamed job
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
	$(BIN)/python -m edge_fleet.quickstart "Is the device hot?"

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

test: lint
	$(BIN)/pytest -q

bench: setup
	$(BIN)/pip install -q -e ".[models]"
	$(BIN)/python bench/engine_bench.py
