"""Storage errors are counted, logged at most once per interval with the count, and the recovery said once."""

from __future__ import annotations

import logging
import sqlite3
from pathlib import Path

import pytest

from agent.config import AgentConfig
from agent.daemon import Agent
from agent.daemon.faults import StorageFaults, storage_backoff
from edge_contract.errors import StorageError


def test_a_burst_of_errors_gives_one_line_then_one_summary_per_interval(
    caplog: pytest.LogCaptureFixture,
) -> None:
    now = [0.0]
    faults = StorageFaults(clock=lambda: now[0], log_every_s=30.0)
    full = sqlite3.OperationalError("database or disk is full")
    with caplog.at_level(logging.WARNING, logger="agent.daemon.faults"):
        for _ in range(300):  # 15 s of errors every 50 ms
            faults.failed("claiming a job", full)
            now[0] += 0.05
        assert [r.levelname for r in caplog.records] == ["ERROR"], "one line for the first error"
        assert "database or disk is full" in caplog.records[0].getMessage()
        for _ in range(400):  # 20 s more: one summary
            faults.failed("claiming a job", full)
            now[0] += 0.05
        assert len(caplog.records) == 2 and "errors in the last" in caplog.records[1].getMessage()
        assert faults.failing and faults.total == 700
        faults.ok()
        faults.ok()
        assert len(caplog.records) == 3 and "works again after" in caplog.records[2].getMessage()
        assert "700 errors" in caplog.records[2].getMessage()
    assert not faults.failing and faults.total == 700


def test_flapping_storage_does_not_flood_the_log(caplog: pytest.LogCaptureFixture) -> None:
    now = [0.0]
    faults = StorageFaults(clock=lambda: now[0], log_every_s=30.0)
    with caplog.at_level(logging.WARNING, logger="agent.daemon.faults"):
        for _ in range(100):  # a write fails, the next one succeeds, for 10 s
            faults.failed("storing", sqlite3.OperationalError("disk I/O error"))
            faults.ok()
            now[0] += 0.1
    assert len(caplog.records) == 2, [r.getMessage() for r in caplog.records]


def test_backoff_doubles_to_a_cap_and_resets() -> None:
    backoff = storage_backoff()
    delays = [backoff.next_delay() for _ in range(8)]
    assert delays == [0.05, 0.1, 0.2, 0.4, 0.8, 1.6, 2.0, 2.0]
    backoff.reset()
    assert backoff.next_delay() == 0.05


def _real_corruption_error(tmp_path: Path) -> sqlite3.DatabaseError:
    bad = tmp_path / "not-a-db"
    bad.write_bytes(b"garbage" * 1000)
    db = sqlite3.connect(bad)
    try:
        db.execute("SELECT * FROM sqlite_master").fetchall()
    except sqlite3.DatabaseError as exc:
        return exc
    finally:
        db.close()
    raise AssertionError("SQLite read garbage as a database")


def test_corruption_at_run_time_is_flagged_but_a_full_disk_is_not(tmp_path: Path) -> None:
    faults = StorageFaults()
    faults.failed("claiming a job", sqlite3.OperationalError("database or disk is full"))
    assert faults.corrupt is None, "positive control below: a full disk is no corruption"
    faults.failed("claiming a job", _real_corruption_error(tmp_path))
    assert faults.corrupt is not None and "not a database" in faults.corrupt


def test_an_agent_whose_database_breaks_while_running_stops_with_one_error(
    tmp_path: Path, phi3_dir: Path
) -> None:
    config = AgentConfig(
        device_id="box-1",
        state_dir=tmp_path / "state",
        model={"path": str(phi3_dir)},
        mqtt={
            "allow_plaintext": True,
            "port": 9,
        },  # nothing listens: the agent keeps trying in the background
    )
    agent = Agent(config)
    agent.faults.failed("claiming a job", _real_corruption_error(tmp_path))
    with pytest.raises(StorageError, match="became corrupt") as caught:
        agent.serve()
    assert str(config.state_dir / "jobs.sqlite3") in caught.value.message
    # The next start moves nothing aside here (the file itself is intact): it simply serves again.
    again = Agent(config)
    assert again.store_moved is None and not again.faults.corrupt
    again.store.close()
