"""The composition root's public surface, in process."""

from __future__ import annotations

from pathlib import Path

import pytest

import agent.daemon
from agent.config import AgentConfig
from agent.daemon import Agent
from edge_contract.errors import StorageError
from tests.support.disk import read_only


def _config(state_dir: Path, model: Path) -> AgentConfig:
    return AgentConfig(
        device_id="box-1", state_dir=state_dir, model={"path": str(model)}, mqtt={"allow_plaintext": True}
    )


def test_the_package_exports_the_agent() -> None:
    assert agent.daemon.__all__ == ["Agent"]
    assert "worker" in (agent.daemon.__doc__ or "") and "edge-agent-worker" in (agent.daemon.__doc__ or "")


def test_an_unwritable_state_dir_stops_the_agent_before_the_model_loads(
    tmp_path: Path, phi3_dir: Path
) -> None:
    loaded: list[object] = []
    state = tmp_path / "state"
    state.mkdir()
    with read_only(state), pytest.raises(StorageError, match="not writable"):
        Agent(_config(state, phi3_dir), updater_factory=lambda *a, **k: loaded.append(a))  # type: ignore[arg-type,func-returns-value]
    assert loaded == []
    # Positive control: writable, the same configuration builds an agent (not started).
    built = Agent(_config(state, phi3_dir))
    assert built.updater.serving.ref.name == "phi3-int4" and built.store_moved is None
    built.store.close()
