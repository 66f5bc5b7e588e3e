# Two commands for a fresh machine:
#   make demo   set up, then run a broker, the agent on the demo model, and one streamed job
#   make test   set up, then lint, type-check and run the whole test suite
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin

.PHONY: setup demo test lint check-wheels bench

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

# Every runtime dependency must install on a 64-bit Arm box from wheels alone.
check-wheels: setup
	$(BIN)/python deploy/check_wheels.py

test: lint check-wheels
	$(BIN)/pytest -q

bench: setup
	$(BIN)/pip install -q -e ".[models]"
	$(BIN)/python bench/engine_bench.py
