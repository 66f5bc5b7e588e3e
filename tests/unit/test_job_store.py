"""The durable queue's state machine, on a real SQLite file."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from agent.jobs.store import JobStore, corrupt_copies, open_store
from edge_contract.errors import StorageError
from tests.support.disk import DAMAGES, read_only


def _store(tmp_path: Path, **kw) -> JobStore:  # type: ignore[no-untyped-def]
    return JobStore(tmp_path / "jobs.sqlite3", **kw)


def test_jobs_run_in_arrival_order_and_keep_their_result(tmp_path: Path) -> None:
    store = _store(tmp_path)
    for i in range(3):
        assert store.accept(f"j{i}", "{}", "r/t", b"c", deadline=None) is None
    assert store.queued_count() == 3
    first = store.claim_next()
    assert first is not None and first.id == "j0" and first.state == "running" and first.attempts == 1
    assert store.finish("j0", '{"status":"succeeded"}')
    assert not store.finish("j0", '{"status":"failed"}'), "a job keeps its first result"
    assert store.get("j0").result == '{"status":"succeeded"}'  # type: ignore[union-attr]
    assert [j.id for j in store.undelivered()] == ["j0"]
    store.mark_delivered("j0")
    assert store.undelivered() == []
    assert store.claim_next().id == "j1"  # type: ignore[union-attr]
    assert store.queued_count() == 2


def test_a_known_id_is_not_queued_twice(tmp_path: Path) -> None:
    store = _store(tmp_path)
    store.accept("dup", '{"a":1}', "r/t", None, deadline=None)
    existing = store.accept("dup", '{"a":2}', "r/other", None, deadline=None)
    assert existing is not None and existing.request == '{"a":1}'
    assert store.queued_count() == 1


def test_state_survives_reopening_and_interrupted_jobs_are_requeued(tmp_path: Path) -> None:
    store = _store(tmp_path, max_attempts=2)
    store.accept("a", "{}", "r", b"\x00\x01", deadline=123.0)
    store.accept("b", "{}", "r", None, deadline=None)
    store.claim_next()  # "a" is running when the power goes
    # No close(): a crash leaves the file as the last committed transaction left it.
    again = _store(tmp_path, max_attempts=2)
    assert again.recover() == []
    a = again.get("a")
    assert a is not None and a.state == "queued" and a.correlation == b"\x00\x01" and a.deadline == 123.0
    assert again.claim_next().id == "a"  # type: ignore[union-attr]
    third = _store(tmp_path, max_attempts=2)
    given_up = third.recover()
    assert [j.id for j in given_up] == ["a"], "a job that was interrupted twice is given up"
    assert third.get("a").state == "running"  # type: ignore[union-attr]


def test_prune_forgets_only_old_delivered_results(tmp_path: Path) -> None:
    store = _store(tmp_path)
    for i in range(5):
        store.accept(f"p{i}", "{}", "r", None, deadline=None)
        store.claim_next()
        store.finish(f"p{i}", "{}")
    for i in range(4):
        store.mark_delivered(f"p{i}")
    assert store.prune(keep_s=3600, keep_max=2) == 3
    assert [store.get(f"p{i}") is not None for i in range(5)] == [False, False, False, True, True]


def test_database_is_durable_wal(tmp_path: Path) -> None:
    _store(tmp_path)
    mode = sqlite3.connect(tmp_path / "jobs.sqlite3").execute("PRAGMA journal_mode").fetchone()[0]
    assert mode == "wal"


def test_a_checkpointed_job_goes_back_without_using_an_attempt(tmp_path: Path) -> None:
    store = _store(tmp_path)
    store.accept("c", "{}", "r", None, deadline=None)
    assert store.claim_next().attempts == 1  # type: ignore[union-attr]
    store.requeue("c")
    job = store.get("c")
    assert job is not None and job.state == "queued" and job.attempts == 0


# -- a corrupt or unusable database (open_store) ----------------------------------------------------


def _filled(path: Path) -> Path:
    store, moved = open_store(path)
    assert moved is None
    store.close()
    db = sqlite3.connect(path)  # one transaction: 200 jobs over a dozen pages
    with db:
        db.executemany(
            "INSERT INTO jobs (id, request, reply_topic, received_at, state) VALUES (?, ?, 'r/t', 0, 'queued')",
            [(f"j{i}", "x" * 300) for i in range(200)],
        )
    db.close()
    return path


@pytest.mark.parametrize("damage", DAMAGES)
def test_a_corrupt_database_is_moved_aside_and_the_queue_starts_empty(
    tmp_path: Path,
    damage,
    caplog: pytest.LogCaptureFixture,  # type: ignore[no-untyped-def]
) -> None:
    path = _filled(tmp_path / "jobs.sqlite3")
    damage(path)
    before = path.read_bytes()
    store, moved = open_store(path)
    assert moved is not None and moved.name.startswith("jobs.sqlite3.corrupt-")
    assert moved.read_bytes() == before, "the damaged file is kept as it was, for inspection"
    assert corrupt_copies(path) == [moved]
    assert store.queued_count() == 0
    store.accept("new", "{}", "r/t", None, deadline=None)  # and the fresh queue works
    assert store.claim_next().id == "new"  # type: ignore[union-attr]
    assert any(
        "JOB DATABASE CORRUPT" in r.getMessage() and str(moved) in r.getMessage() for r in caplog.records
    )


def test_an_intact_database_is_kept(tmp_path: Path) -> None:
    path = _filled(tmp_path / "jobs.sqlite3")
    store, moved = open_store(path)
    assert moved is None and store.queued_count() == 200 and corrupt_copies(path) == []


def test_a_read_only_state_dir_is_one_error_naming_the_path_and_the_fix(tmp_path: Path) -> None:
    state = tmp_path / "state"
    state.mkdir()
    with read_only(state), pytest.raises(StorageError) as caught:
        open_store(state / "jobs.sqlite3")
    message = caught.value.message
    assert str(state) in message and "Read-only file system" in message and "writable" in message
    assert "\n" not in message


def test_a_database_path_that_is_a_directory_is_one_error_naming_it(tmp_path: Path) -> None:
    (tmp_path / "jobs.sqlite3").mkdir()
    with pytest.raises(StorageError) as caught:
        open_store(tmp_path / "jobs.sqlite3")
    assert str(tmp_path / "jobs.sqlite3") in caught.value.message and "directory" in caught.value.message
