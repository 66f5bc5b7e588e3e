"""Shared pytest fixtures."""

from __future__ import annotations

from pathlib import Path

import pytest

from agent import Engine
from tests._models import fixture_path


@pytest.fixture(scope="session")
def phi3_dir() -> Path:
    """The Phi-3 int4 fixture: the default model for tests that need any model."""
    return fixture_path("phi3-int4")


@pytest.fixture(scope="session")
def phi3_engine(phi3_dir: Path) -> Engine:
    """One engine on the Phi-3 fixture, shared by the tests of a session."""
    return Engine(phi3_dir)
