"""Every test gets its own edge-fleet state file and no operator profile (the machine's are never touched)."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(autouse=True)
def _own_fleet_state(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EDGE_FLEET_DB", str(tmp_path / "fleet-state" / "state.sqlite3"))
    monkeypatch.setenv("EDGE_FLEET_PROFILE", str(tmp_path / "fleet-state" / "no-profile.toml"))
    for name in (
        "BROKER",
        "TLS_CA",
        "TLS_CERT",
        "TLS_KEY",
        "PLAINTEXT",
        "PROTOCOL",
        "TOPIC_PREFIX",
        "USERNAME",
    ):
        monkeypatch.delenv(f"EDGE_FLEET_{name}", raising=False)
