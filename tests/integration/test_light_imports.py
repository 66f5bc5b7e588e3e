"""The wire contract is a light leaf: what runs no model loads no onnxruntime, numpy or tokenizers.

Each check imports in a fresh interpreter (``sys.modules`` of this one holds whatever
earlier tests loaded).  Not part of the emulated aarch64 run: it starts subprocesses, and
nothing may fork inside the emulator (see .ci/arm64_emulated.sh).
"""

from __future__ import annotations

import subprocess
import sys

import pytest

pytestmark = pytest.mark.e2e

#: What running a model needs; a command or module that runs none must not pay for loading them.
HEAVY = ("onnxruntime", "numpy", "tokenizers")


def _loaded_after(code: str) -> set[str]:
    """Top-level modules in ``sys.modules`` after a fresh interpreter runs ``code``."""
    probe = f"{code}\nimport sys\nprint(' '.join(sorted({{m.split('.')[0] for m in sys.modules}})))"
    proc = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stderr
    return set(proc.stdout.split())


@pytest.mark.parametrize(
    "module",
    [
        "agent",
        "edge_contract.protocol",
        "agent.config",
        "edge_contract.errors",
        "edge_fleet",
        "edge_fleet.cli",
    ],
)
def test_light_modules_load_no_model_runtime(module: str) -> None:
    loaded = _loaded_after(f"import {module}")
    assert module.split(".")[0] in loaded
    assert not loaded & set(HEAVY), f"importing {module} loads {sorted(loaded & set(HEAVY))}"


def test_the_light_names_re_exported_by_agent_load_no_model_runtime() -> None:
    loaded = _loaded_after("from agent import EngineOptions, SamplingParams, Timings")
    assert not loaded & set(HEAVY), sorted(loaded & set(HEAVY))


def test_the_probe_sees_the_model_runtime_when_it_is_loaded() -> None:
    """Positive control: the same probe notices onnxruntime and numpy when the engine is imported."""
    assert set(HEAVY) <= _loaded_after("import agent.engine.engine")


@pytest.mark.parametrize(
    "argv", [["--help"], ["watch", "--help"], ["release", "--help"], ["submit", "--help"]]
)
def test_edge_fleet_commands_that_run_no_model_load_no_model_runtime(argv: list[str]) -> None:
    """``edge-fleet --help`` and friends: the operator's tool starts without onnxruntime."""
    loaded = _loaded_after(
        "import contextlib, io\nfrom edge_fleet.cli import main\n"
        f"with contextlib.redirect_stdout(io.StringIO()), contextlib.suppress(SystemExit): main({argv!r})"
    )
    assert "edge_fleet" in loaded and not loaded & set(HEAVY), sorted(loaded & set(HEAVY))


def test_config_and_protocol_do_not_import_engine_or_telemetry() -> None:
    # The config composes each package's options module (agent.engine.options, ...) and nothing else of them.
    probe = "import agent.config, edge_contract.protocol, sys\nprint(' '.join(m for m in sys.modules if m.startswith(('agent.', 'edge_contract.'))))"
    proc = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    loaded = set(proc.stdout.split())
    assert {
        "agent.config",
        "edge_contract.protocol",
        "edge_contract.errors",
        "agent.engine.options",
    } <= loaded, "positive control"
    beyond_options = {
        m for m in loaded if m.startswith(("agent.engine.", "agent.health.")) and not m.endswith(".options")
    }
    assert not beyond_options, sorted(loaded)
