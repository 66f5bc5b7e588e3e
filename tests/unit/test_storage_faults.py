"""Storage errors are counted, logged at most once per interval with the count, and the recovery said once."""

from __future__ import annotations

import logging
import sqlite3

import pytest

from agent.daemon.faults import Backoff, StorageFaults


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
    backoff = Backoff(first_s=0.05, max_s=2.0)
    delays = [backoff.next() for _ in range(8)]
    assert delays == [0.05, 0.1, 0.2, 0.4, 0.8, 1.6, 2.0, 2.0]
    backoff.reset()
    assert backoff.next() == 0.05
