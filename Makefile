# Two commands for a fresh machine:
#   make demo   set up, then run a broker, the agent on the demo model, and one streamed job
#   make test   set up, then lint, type-check and run the whole test suite
#   make test-arm64  tests on an emulated aarch64 (Raspberry Pi 5) CPython; CI runs it after make test
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin

.PHONY: setup demo test test-arm64 lint check-wheels bench

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
	PYTHONPATH=deploy $(BIN)/lint-imports

# Every runtime dependency must install on a 64-bit Arm box from wheels alone.
check-wheels: setup
	$(BIN)/python deploy/check_wheels.py

test: lint check-wheels
	$(BIN)/pytest -q

# The runtime dependencies installed from aarch64 wheels alone and imported, the engine's
# parity tests and a daemon smoke test, all run by an aarch64 CPython under qemu-user
# (needs qemu-user-static; the environment is cached under .cache/arm64/).
test-arm64: setup
	HOST_PYTHON=$(BIN)/python bash .ci/arm64_emulated.sh

bench: setup
	$(BIN)/pip install -q -e ".[models]"
	$(BIN)/python bench/engine_bench.py
