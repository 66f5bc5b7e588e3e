"""Every runtime dependency of pyproject.toml is installed, and every module of the agent imports.

On the host this guards the dependency list; the emulated aarch64 run
(``.ci/arm64_emulated.sh``) runs it too, and there it proves that the aarch64
wheels installed by ``deploy/check_wheels.py --target`` load and link.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import pkgutil
import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement

import agent
import edge_contract

ROOT = Path(__file__).resolve().parents[2]
RUNTIME = [
    Requirement(r) for r in tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
]
# The box's code: the agent and the contract it is built on.
AGENT_MODULES = sorted(
    [m.name for m in pkgutil.walk_packages(agent.__path__, prefix="agent.")]
    + [m.name for m in pkgutil.walk_packages(edge_contract.__path__, prefix="edge_contract.")]
)


@pytest.mark.parametrize("requirement", RUNTIME, ids=lambda r: r.name)
def test_runtime_dependency_is_installed_in_a_satisfying_version(requirement: Requirement) -> None:
    try:
        version = importlib.metadata.version(requirement.name)
    except importlib.metadata.PackageNotFoundError:
        pytest.fail(f"runtime dependency {requirement} is not installed")
    assert requirement.specifier.contains(version, prereleases=True), f"{requirement.name} {version}"


@pytest.mark.parametrize("module", AGENT_MODULES)
def test_agent_module_imports(module: str) -> None:
    importlib.import_module(module)


def test_the_list_of_agent_modules_is_not_empty() -> None:
    assert "agent.engine.engine" in AGENT_MODULES and "agent.daemon" in AGENT_MODULES
    assert "edge_contract.manifest" in AGENT_MODULES
