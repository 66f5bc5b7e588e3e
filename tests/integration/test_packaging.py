"""The wheel users install: every module, typed, licensed, one version, and nothing of the repository's.

The wheel is built the way pip builds it (setuptools, the declared backend), without build isolation
so the test runs offline: setuptools>=77 comes with the test extra.
"""

from __future__ import annotations

import email.parser
import importlib.metadata
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

import agent

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parents[2]
SOURCES = {
    "agent": ROOT / "agent",
    "edge_contract": ROOT / "edge_contract",
    "edge_fleet": ROOT / "deploy" / "edge_fleet",
}


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # Built from a copy of what the build reads: setuptools leaves build/ behind, and a stale
    # build/lib would put deleted modules into later wheels.
    tree, out = tmp_path_factory.mktemp("tree"), tmp_path_factory.mktemp("wheel")
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        shutil.copy2(ROOT / name, tree / name)
    for source in SOURCES.values():
        shutil.copytree(source, tree / source.relative_to(ROOT), ignore=shutil.ignore_patterns("__pycache__"))
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "-q",
            "--no-deps",
            "--no-build-isolation",
            "-w",
            str(out),
            str(tree),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    (built,) = out.glob("edge_agent-*.whl")
    return built


def _names(wheel: Path) -> set[str]:
    with zipfile.ZipFile(wheel) as archive:
        return set(archive.namelist())


def _metadata(wheel: Path) -> email.message.Message:
    with zipfile.ZipFile(wheel) as archive:
        (name,) = [n for n in archive.namelist() if n.endswith(".dist-info/METADATA")]
        return email.parser.Parser().parsestr(archive.read(name).decode())


def test_every_module_of_both_packages_is_in_the_wheel(wheel: Path) -> None:
    names = _names(wheel)
    for package, source in SOURCES.items():
        modules = {
            f"{package}/{path.relative_to(source).as_posix()}"
            for path in source.rglob("*.py")
            if "__pycache__" not in path.parts
        }
        assert f"{package}/__init__.py" in modules and len(modules) > 2, "positive control"
        assert modules <= names, f"missing from the wheel: {sorted(modules - names)}"


def test_every_package_is_typed(wheel: Path) -> None:
    assert {"agent/py.typed", "edge_contract/py.typed", "edge_fleet/py.typed"} <= _names(wheel)


def test_the_wheel_holds_no_tests_models_or_benchmarks(wheel: Path) -> None:
    tops = {name.split("/")[0] for name in _names(wheel)}
    assert tops == {"agent", "edge_contract", "edge_fleet", f"edge_agent-{agent.__version__}.dist-info"}, tops


def test_one_version_and_a_license_the_backend_understands(wheel: Path) -> None:
    meta = _metadata(wheel)
    assert meta["Version"] == agent.__version__
    assert wheel.name.startswith(f"edge_agent-{agent.__version__}-")
    assert meta["License-Expression"] == "MIT"
    license_file = f"edge_agent-{agent.__version__}.dist-info/licenses/LICENSE"
    assert license_file in _names(wheel)
    with zipfile.ZipFile(wheel) as archive:
        assert archive.read(license_file) == (ROOT / "LICENSE").read_bytes()


def test_the_installed_version_is_the_package_version() -> None:
    assert importlib.metadata.version("edge-agent") == agent.__version__


def test_development_tools_are_apart_from_what_users_install(wheel: Path) -> None:
    meta = _metadata(wheel)
    requires = meta.get_all("Requires-Dist") or []
    runtime = {r.split(">")[0].split("=")[0].split("[")[0].strip() for r in requires if "extra ==" not in r}
    assert {"onnxruntime", "paho-mqtt", "pydantic"} <= runtime, "positive control"
    assert not runtime & {"pytest", "ruff", "mypy", "hypothesis", "onnx", "onnxruntime-genai", "tqdm"}, (
        runtime
    )
    assert set(meta.get_all("Provides-Extra") or []) >= {"fleet", "test", "dev"}
    fleet = [r for r in requires if 'extra == "fleet"' in r]
    assert fleet and not any(tool in r for r in fleet for tool in ("pytest", "ruff", "mypy")), fleet


def test_console_scripts(wheel: Path) -> None:
    with zipfile.ZipFile(wheel) as archive:
        (name,) = [n for n in archive.namelist() if n.endswith(".dist-info/entry_points.txt")]
        entry_points = archive.read(name).decode()
    assert (
        "edge-agent = agent.cli:main" in entry_points and "edge-fleet = edge_fleet.cli:main" in entry_points
    )


@pytest.fixture(scope="module")
def installed(wheel: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """The environment of an interpreter that imports the packages from the installed wheel."""
    target = tmp_path_factory.mktemp("site")
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(target), str(wheel)],
        check=True,
        timeout=120,
    )
    # PYTHONPATH comes before the editable install's finder: the wheel's copy is imported.
    return {**os.environ, "PYTHONPATH": str(target)}


def test_every_module_imports_from_the_installed_wheel(installed: dict[str, str]) -> None:
    """Before, the wheel held agent/ and edge_fleet/ without their subpackages: deploy/install.sh broke."""
    probe = (
        "import importlib, pkgutil, agent, edge_fleet\n"
        "for package in (agent, edge_fleet):\n"
        "    for m in pkgutil.walk_packages(package.__path__, package.__name__ + '.'):\n"
        "        module = importlib.import_module(m.name)\n"
        f"        assert module.__file__.startswith({installed['PYTHONPATH']!r}), module.__file__\n"
        "        print(m.name)\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", probe],
        capture_output=True,
        text=True,
        env=installed,
        cwd=installed["PYTHONPATH"],  # not the checkout: "-c" puts the working directory on the path
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    imported = set(proc.stdout.split())
    assert {"agent.engine.engine", "agent.jobs.store", "agent.cli", "edge_fleet.cli"} <= imported, imported


def test_the_installed_quickstart_says_where_the_demo_model_is(installed: dict[str, str]) -> None:
    """The demo model ships with a clone, not the wheel: an installed quickstart says so, it does not crash."""
    where = subprocess.run(
        [sys.executable, "-c", "import edge_fleet.quickstart as q; print(q.__file__)"],
        capture_output=True,
        text=True,
        env=installed,
        cwd=installed["PYTHONPATH"],
        check=True,
    )
    assert where.stdout.startswith(installed["PYTHONPATH"]), "the wheel's copy runs, not the source tree's"
    proc = subprocess.run(
        [sys.executable, "-m", "edge_fleet.quickstart"],
        capture_output=True,
        text=True,
        env=installed,
        cwd=installed["PYTHONPATH"],
        timeout=60,
        check=False,
    )
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert "--model DIR" in proc.stderr and "make demo" in proc.stderr


def test_the_wheel_ships_the_dashboards_page(wheel: Path) -> None:
    static = ROOT / "deploy" / "edge_fleet" / "server" / "dashboard" / "static"
    files = {f"edge_fleet/server/dashboard/static/{p.name}" for p in static.iterdir()}
    assert "edge_fleet/server/dashboard/static/index.html" in files and len(files) >= 4  # positive control
    assert files <= _names(wheel), f"missing from the wheel: {sorted(files - _names(wheel))}"
