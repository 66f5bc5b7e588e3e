"""``edge-agent doctor``'s job store check on real databases, real damage and a real read-only mount."""

from __future__ import annotations

from pathlib import Path

from agent.doctor import check_job_store
from agent.jobs.store import open_store
from tests.support.disk import read_only


def test_an_intact_database_is_ok_with_its_counts(tmp_path: Path) -> None:
    store, _ = open_store(tmp_path / "jobs.sqlite3")
    store.accept("a", "{}", "r/t", None, deadline=None)
    store.close()
    check = check_job_store(tmp_path)
    assert (check.status, check.detail) == ("ok", "1 jobs waiting, 0 results kept")


def test_a_corrupt_database_fails_and_a_moved_aside_one_warns(tmp_path: Path) -> None:
    store, _ = open_store(tmp_path / "jobs.sqlite3")
    store.close()
    (tmp_path / "jobs.sqlite3").write_bytes(b"garbage" * 2000)
    check = check_job_store(tmp_path)
    assert check.status == "fail" and "corrupt" in check.detail and "move it aside" in check.detail
    _store, moved = open_store(tmp_path / "jobs.sqlite3")  # what the agent does at start
    assert moved is not None
    check = check_job_store(tmp_path)
    assert check.status == "warn" and "CORRUPT" in check.detail and str(moved) in check.detail
    moved.unlink()
    assert check_job_store(tmp_path).status == "ok", "deleting the copy clears the warning"


def test_a_read_only_state_dir_fails_naming_it(tmp_path: Path) -> None:
    with read_only(tmp_path):
        check = check_job_store(tmp_path)
    assert check.status == "fail" and str(tmp_path) in check.detail and "Read-only" in check.detail
