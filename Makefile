# Two commands for a fresh machine:
#   make demo   set up, then run a broker, the agent on the demo model, and one streamed job
#   make test   set up, then lint, type-check and run the whole test suite
#   make test-arm64  tests on an emulated aarch64 (Raspberry Pi 5) CPython; CI runs it after make test
#   make test-avx2   the engine's exactness tests on an emulated AVX2-only x86-64 CPU; CI runs it too
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin

.PHONY: setup demo test test-arm64 test-avx2 lint check-wheels bench

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

# The exactness tests (batched = solo, prefix hit = cold, the one-row probe) run by the host's
# venv python under qemu-x86_64 as a Haswell: onnxruntime takes its AVX2 kernels (needs
# qemu-user-static; see docs/engine.md).
test-avx2: setup
	HOST_PYTHON=$(BIN)/python bash .ci/x86_avx2_emulated.sh

bench: setup
	$(BIN)/pip install -q -e ".[models]"
	$(BIN)/python bench/engine_bench.py
