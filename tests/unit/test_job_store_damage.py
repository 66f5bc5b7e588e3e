"""Issue 24: a damaged job database of any kind is moved aside or reported with the right fix, and the
WAL cannot fill a small state_dir."""

from __future__ import annotations

import json
import os
import sqlite3
from pathlib import Path
from typing import Any

import pytest

from agent.jobs.damage import MIN_FREE_BYTES, SCHEMA_VERSION, WAL_LIMIT_BYTES
from agent.jobs.store import NewerStoreError, corrupt_copies, inspect_file, open_store
from edge_contract.errors import StorageError
from tests.support.disk import SmallDisk

WRONG_FIX = "make state_dir writable"


def _with_a_job(path: Path) -> None:
    store, _ = open_store(path)
    store.accept("kept-1", "{}", "edge/replies/x", None, deadline=None)
    store.close()


def test_a_good_database_keeps_its_jobs_and_is_stamped(tmp_path: Path) -> None:
    path = tmp_path / "jobs.sqlite3"
    _with_a_job(path)
    store, moved = open_store(path)  # the control for every case below: nothing moved
    try:
        assert moved is None and store.get("kept-1") is not None
        assert store._db.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
        assert store._db.execute("PRAGMA journal_size_limit").fetchone()[0] == WAL_LIMIT_BYTES
    finally:
        store.close()


def _view(path: Path) -> None:
    db = sqlite3.connect(path)
    db.execute("CREATE TABLE t (x)")
    db.execute("CREATE VIEW jobs AS SELECT x FROM t")
    db.commit()
    db.close()


def _trigger(path: Path) -> None:
    _with_a_job(path)
    db = sqlite3.connect(path)
    db.execute("CREATE TRIGGER t AFTER INSERT ON jobs BEGIN DELETE FROM jobs; END")
    db.commit()
    db.close()


def _fifo(path: Path) -> None:
    os.mkfifo(path)


def _negative_version(path: Path) -> None:
    _with_a_job(path)
    db = sqlite3.connect(path)
    db.execute("PRAGMA user_version = -3")
    db.close()


@pytest.mark.parametrize("damage", [_view, _trigger, _fifo, _negative_version])
def test_a_damaged_database_of_any_kind_is_moved_aside(tmp_path: Path, damage: Any) -> None:
    path = tmp_path / "jobs.sqlite3"
    damage(path)
    problem, _kept = None, None
    try:
        inspect_file(path)  # what doctor sees: "the agent will move it aside"
    except StorageError as exc:
        problem = exc
    assert problem is not None and WRONG_FIX not in problem.message
    store, moved = open_store(path)
    try:
        assert moved is not None and moved in corrupt_copies(path)
        assert store.queued_count() == 0
        store.accept("new-1", "{}", "edge/replies/x", None, deadline=None)  # it works
    finally:
        store.close()


def test_a_newer_agents_database_is_reported_with_the_right_fix(tmp_path: Path) -> None:
    path = tmp_path / "jobs.sqlite3"
    _with_a_job(path)
    db = sqlite3.connect(path)
    db.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    db.close()
    with pytest.raises(NewerStoreError) as caught:
        open_store(path)
    assert "newer edge-agent" in caught.value.message and WRONG_FIX not in caught.value.message
    assert corrupt_copies(path) == [], "kept as it is: the newer agent can still use it"
    with pytest.raises(NewerStoreError):
        inspect_file(path)


def test_a_state_dir_below_the_minimum_free_space_refuses_to_start(tmp_path: Path) -> None:
    disk = SmallDisk(tmp_path / "one-mib", size="1m")
    try:
        assert disk.path.stat().st_dev != tmp_path.stat().st_dev
        with pytest.raises(StorageError, match=f"below the {MIN_FREE_BYTES // 1024} KiB"):
            open_store(disk.path / "jobs.sqlite3")
    finally:
        disk.close()


def test_the_wal_stays_small_through_600_jobs(small_disk: Any) -> None:
    path = small_disk.path / "jobs.sqlite3"
    store, _ = open_store(path)  # 4 MiB: above the minimum (the control of the test above)
    try:
        result = json.dumps({"text": "x" * 1024})
        for i in range(600):
            store.accept(f"job-{i}", json.dumps({"prompt": "y" * 512}), "edge/replies/x", None, deadline=None)
            job = store.claim_next()
            assert job is not None
            store.finish(job.id, result)
            store.mark_delivered(job.id)
            store.prune(keep_s=3600, keep_max=50)
        wal = path.with_name(path.name + "-wal")
        assert wal.stat().st_size <= 2 * WAL_LIMIT_BYTES, "checkpointed and truncated, not megabytes"
    finally:
        store.close()
