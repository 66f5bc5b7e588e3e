"""Issue 24: the job database cannot fill a small state_dir — below the documented minimum the agent
does not start (saying why), above it the WAL stays small and every job is answered."""

from __future__ import annotations

from typing import Any

import pytest

from agent.jobs.damage import MIN_FREE_BYTES
from tests.daemon.test_faults import mounts  # noqa: F401 (the fixture)

pytestmark = pytest.mark.e2e

JOBS = "edge/box-1/jobs"


def test_a_one_mib_state_dir_is_refused_at_start_with_the_numbers(agents: Any, mounts: Any) -> None:  # noqa: F811
    agent = agents()
    mounts(agent.state_dir, size="1m")
    agent.start(wait_online=False)
    assert agent.proc is not None and agent.proc.wait(timeout=120) == 1
    log = agent.log_text()
    assert f"below the {MIN_FREE_BYTES // 1024} KiB the job database needs" in log, log[-2000:]
    assert "make state_dir writable" not in log


def test_six_hundred_jobs_on_a_four_mib_state_dir_are_all_answered(
    agents: Any,
    caller: Any,
    mounts: Any,  # noqa: F811
) -> None:
    agent = agents()
    mounts(agent.state_dir, size="4m")  # above the minimum (the control of the test above)
    agent.start()
    statuses: list[str] = []
    for batch in range(12):  # in batches of 50: under the queue limit
        jobs = [f"small-{batch}-{i}" for i in range(50)]
        for job_id in jobs:
            caller.send(JOBS, {"id": job_id, "prompt": "hi " * 50, "max_tokens": 2})
        statuses += [caller.wait_result(job_id, timeout=300)["status"] for job_id in jobs]
    assert statuses.count("succeeded") == 600, {s: statuses.count(s) for s in set(statuses)}
    wal = agent.state_dir / "jobs.sqlite3-wal"
    assert wal.stat().st_size <= 512 * 1024, "checkpointed and truncated"
