"""Where the committed model fixtures live (built by ``python -m models.fixtures``).

A missing fixture is a failure, never a skip: the tests exist to run them.
"""

from __future__ import annotations

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
