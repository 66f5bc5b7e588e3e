"""Bad luck, for real, against a real ``edge-agent run``: a disk that fills up, a corrupt database, read-only state.

Each fault is the real thing: a small tmpfs mounted as state_dir and filled
with dd, a jobs.sqlite3 damaged on disk, a read-only bind mount (the tests run
as root).  The daemon must survive each with nothing lost and no job left
unanswered.
"""

from __future__ import annotations

import json
import sqlite3
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from agent.jobs.store import corrupt_copies
from tests.support.agent import agent_python
from tests.support.disk import DAMAGES, SmallDisk, read_only
from tests.support.models import fixture_path
from tests.support.wait import wait_until

JOBS = "edge/box-1/jobs"
TELEMETRY = "edge/box-1/telemetry"
# How long the disk stays full, in events: jobs sent meanwhile, store errors met meanwhile.
FULL_FLOOD = 500
FULL_ERRORS = 8
pytestmark = pytest.mark.e2e


@pytest.fixture()
def mounts():  # type: ignore[no-untyped-def]
    made: list[SmallDisk] = []

    def mount(path: Path, size: str = "16m") -> SmallDisk:
        disk = SmallDisk(path, size)
        made.append(disk)
        return disk

    yield mount
    for disk in made:
        disk.close()


def _more_sent(sent: list[str], n: int) -> None:
    """Wait until the flood has sent ``n`` more jobs (a stretch counted in jobs, not seconds)."""
    target = len(sent) + n
    wait_until(lambda: len(sent) >= target, timeout=120, what=f"{n} more jobs sent")


def _store_errors(caller) -> int:  # type: ignore[no-untyped-def]
    """The highest job-store error count the agent's telemetry reported so far."""
    counts = [
        json.loads(body)["jobs"]["store_errors"] for t, body, _c in list(caller.raw.queue) if t == TELEMETRY
    ]
    return max(counts, default=0)


def _error_lines(log: str) -> list[str]:
    return [line for line in log.splitlines() if " ERROR " in line or " CRITICAL " in line]


def test_a_disk_that_fills_while_jobs_stream_in_loses_nothing_and_the_agent_lives(
    agents, caller, mounts
) -> None:  # type: ignore[no-untyped-def]
    agent = agents()
    disk = mounts(agent.state_dir)
    agent.start()
    sent: list[str] = []
    stop = threading.Event()

    def flood() -> None:
        while not stop.is_set():
            job_id = f"f-{len(sent)}"
            caller.send(JOBS, {"id": job_id, "prompt": "hi", "max_tokens": 1})
            sent.append(job_id)
            time.sleep(0.004)

    sender = threading.Thread(target=flood)
    sender.start()
    try:
        wait_until(lambda: len(sent) > 50, what="jobs flowing")
        disk.fill()
        wait_until(lambda: "disk is full" in agent.log_text(), what="the agent meeting the full disk")
        _more_sent(sent, FULL_FLOOD)  # jobs keep coming while the disk is full
        assert agent.proc.poll() is None, agent.log_text()[-3000:]
        disk.free()
        wait_until(lambda: "job store works again" in agent.log_text(), what="the agent recovering")
        _more_sent(sent, 50)  # and after it is freed
    finally:
        stop.set()
        sender.join()
    for job_id in sent:
        caller.wait_result(job_id, timeout=120)
    caller.send(JOBS, {"id": "after-full", "prompt": "hi", "max_tokens": 1})
    # "after-full" is the marker and the positive control: sent after every other job was answered,
    # it is answered after any duplicate of theirs (the broker redelivers before it delivers new
    # messages, the agent takes jobs in order, the outbox publishes in order).
    after = caller.wait_result("after-full", timeout=120)
    assert after["status"] == "succeeded", after
    statuses = {job_id: [r["status"] for r in caller.results(job_id)] for job_id in sent}
    assert all(len(s) == 1 for s in statuses.values()), {k: v for k, v in statuses.items() if len(v) != 1}
    assert {s[0] for s in statuses.values()} <= {"succeeded", "rejected"}
    assert agent.proc.poll() is None
    log = agent.log_text()
    assert "Traceback" not in log
    assert len(_error_lines(log)) <= 3, _error_lines(log)[:10]  # summed up, not one line per error
    assert "job store works again" in log


def test_a_disk_that_fills_while_jobs_run_leaves_no_job_stuck(agents, caller, mounts) -> None:  # type: ignore[no-untyped-def]
    agent = agents(fixture_path("llama-long"), jobs={"max_tokens_limit": 4000})
    disk = mounts(agent.state_dir)
    caller.subscribe(TELEMETRY)
    agent.start()
    ids = [f"r-{i}" for i in range(20)]
    for job_id in ids:
        caller.send(JOBS, {"id": job_id, "prompt": "hello", "max_tokens": 100})
    wait_until(lambda: caller.results("r-0"), what="the first result")
    disk.fill()
    wait_until(lambda: "disk is full" in agent.log_text(), timeout=60, what="the agent meeting the full disk")
    # The disk stays full across several failed writes (results kept for a retry, retries backing off).
    wait_until(lambda: _store_errors(caller) >= FULL_ERRORS, timeout=60, what=f"{FULL_ERRORS} store errors")
    disk.free()
    results = {job_id: caller.wait_result(job_id, timeout=120) for job_id in ids}
    assert all(r["status"] == "succeeded" for r in results.values())
    caller.send(JOBS, {"id": "r-marker", "prompt": "hello", "max_tokens": 1})  # after any duplicate
    assert caller.wait_result("r-marker", timeout=120)["status"] == "succeeded"
    assert all(len(caller.results(job_id)) == 1 for job_id in ids)
    assert agent.proc.poll() is None
    assert agent.terminate() == 0
    db = sqlite3.connect(agent.state_dir / "jobs.sqlite3")
    assert db.execute("SELECT COUNT(*) FROM jobs WHERE state != 'done'").fetchone() == (0,)
    db.close()
    log = agent.log_text()
    assert "Traceback" not in log and len(_error_lines(log)) <= 3, _error_lines(log)[:10]


@pytest.mark.parametrize("damage", DAMAGES)
def test_a_corrupt_job_database_is_moved_aside_and_the_agent_serves(
    agents, caller, damage: Callable[[Path], None]
) -> None:  # type: ignore[no-untyped-def]
    agent = agents()
    agent.start()
    for i in range(30):
        caller.send(JOBS, {"id": f"old-{i}", "prompt": "hi", "max_tokens": 1})
    caller.wait_result("old-29")
    assert agent.terminate() == 0
    db = agent.state_dir / "jobs.sqlite3"
    connection = sqlite3.connect(db)
    connection.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    connection.close()
    damage(db)
    caller.subscribe("edge/box-1/telemetry")
    caller.subscribe("edge/box-1/status")
    agent.start()
    caller.send(JOBS, {"id": "new-1", "prompt": "hi", "max_tokens": 3})
    assert caller.wait_result("new-1")["status"] == "succeeded"
    moved = corrupt_copies(agent.state_dir / "jobs.sqlite3")
    assert len(moved) == 1
    log = agent.log_text()
    assert "JOB DATABASE CORRUPT" in log and moved[0].name in log and "Traceback" not in log

    def published(topic: str, check: Callable[[dict], bool]) -> bool:  # type: ignore[type-arg]
        return any(t == topic and check(json.loads(p)) for t, p, _ in list(caller.raw.queue))

    wait_until(
        lambda: published("edge/box-1/telemetry", lambda m: m["jobs"]["store_resets"] == 1), what="counter"
    )
    wait_until(
        lambda: published(
            "edge/box-1/status", lambda s: "storage" in ((s.get("health") or {}).get("reasons") or [])
        ),
        what="the status saying so",
    )


def _run_once(config: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*agent_python(), "-m", "agent.cli", "run", "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_a_read_only_state_dir_is_one_line_naming_the_path_and_the_fix(agents) -> None:  # type: ignore[no-untyped-def]
    agent = agents()
    agent.state_dir.mkdir(parents=True)
    with read_only(agent.state_dir):
        proc = _run_once(agent.config)
    assert proc.returncode == 1
    lines = proc.stderr.strip().splitlines()
    assert "Traceback" not in proc.stderr
    assert lines[-1].startswith("edge-agent: error: state_dir ") and str(agent.state_dir) in lines[-1]
    assert "Read-only file system" in lines[-1] and "writable" in lines[-1]
    # Positive control: the same config starts once the directory is writable again.
    agent.start()
    assert agent.proc.poll() is None


def test_a_database_path_that_is_a_directory_is_one_line_naming_it(agents) -> None:  # type: ignore[no-untyped-def]
    agent = agents()
    (agent.state_dir / "jobs.sqlite3").mkdir(parents=True)
    proc = _run_once(agent.config)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert f"{agent.state_dir / 'jobs.sqlite3'} is a directory" in last
