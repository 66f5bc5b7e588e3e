"""Where the committed model fixtures live (built by ``python -m models.fixtures``).

A missing fixture is a failure, never a skip: the tests exist to run them.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from agent.engine.model_folder import MODEL_FAMILIES

ROOT = Path(__file__).resolve().parents[2]
FIXTURES = ROOT / "models" / "fixtures"
FAMILIES = MODEL_FAMILIES
PRECISIONS = ("int8", "int4")
ALL_FIXTURES = [f"{family}-{precision}" for family in FAMILIES for precision in PRECISIONS]


def fixture_path(name: str) -> Path:
    """Path of a committed fixture model; fails loudly when it is absent."""
    path = FIXTURES / name
    if not (path / "genai_config.json").is_file():
        pytest.fail(f"model fixture {path} is missing: run `python -m models.fixtures`")
    return path


def convert_fixture(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, *flags: str) -> Path:
    """``models.convert`` run with ``flags``, the builder stood in for by its output (the phi3-int4 fixture).

    The real builder is a subprocess needing the "models" extra; what follows it is what is tested.
    """
    import shutil

    from models import convert

    def build(hf_dir: Path, out_dir: Path, precision: str, options: object, *, quiet: bool) -> list[Path]:
        shutil.copytree(fixture_path("phi3-int4"), out_dir, dirs_exist_ok=True)
        return sorted(out_dir.iterdir())

    monkeypatch.setattr(convert.builder, "build", build)
    monkeypatch.setattr(convert.builder, "describe", lambda _out: "")
    hf = tmp_path / "hf"
    hf.mkdir()
    for name in ("config.json", "model.safetensors", "tokenizer.json"):
        (hf / name).write_text("{}")
    out = tmp_path / "out"
    assert convert.main([str(hf), str(out), "--precision", "int4", *flags]) == 0
    return out


def rewritten_fixture(name: str, tmp_path: Path, rewrite: Callable[[Path], int], suffix: str) -> Path:
    """A copy of fixture ``name`` under ``tmp_path`` after ``rewrite`` (which must change something)."""
    import shutil

    folder = tmp_path / f"{name}-{suffix}"
    shutil.copytree(fixture_path(name), folder)
    assert rewrite(folder) > 0
    return folder
