"""The outbox: a result is pending until the broker acknowledges it, and sent again after a reconnect."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from agent.daemon.faults import StorageFaults
from agent.daemon.outbox import Outbox
from agent.jobs.store import JobStore
from tests.support.parts import RecordingLink


def _done(store: JobStore, job_id: str) -> str:
    store.accept(job_id, "{}", f"edge/replies/{job_id}", b"k", deadline=None)
    store.claim_next()
    payload = f'{{"id": "{job_id}"}}'
    assert store.finish(job_id, payload)
    return payload


def test_a_result_is_delivered_only_when_acknowledged(tmp_path: Path) -> None:
    store, link = JobStore(tmp_path / "jobs.sqlite3"), RecordingLink()
    outbox = Outbox(link, store, StorageFaults())
    ack = outbox.send_result("o-1", "edge/replies/o-1", b"k", _done(store, "o-1"))
    assert outbox.backlog == 1 and not ack.done()
    assert [j.id for j in store.undelivered()] == ["o-1"]
    outbox.acked(999)  # some other publication (a chunk): nothing changes
    assert outbox.backlog == 1 and not ack.done()
    outbox.acked(1)
    assert ack.done() and outbox.backlog == 0
    assert store.undelivered() == []


def test_after_a_reconnect_every_unacknowledged_result_is_sent_again_once(tmp_path: Path) -> None:
    store, link = JobStore(tmp_path / "jobs.sqlite3"), RecordingLink()
    outbox = Outbox(link, store, StorageFaults())
    first = _done(store, "o-1")
    _done(store, "o-2")  # stored, never published (the agent died before)
    outbox.send_result("o-1", "edge/replies/o-1", b"k", first)
    outbox.reconnected()
    assert [p.topic for p in link.sent] == ["edge/replies/o-1", "edge/replies/o-2"], "o-1 is still in flight"
    assert link.sent[1].correlation == b"k"
    outbox.acked(1)
    outbox.acked(2)
    outbox.reconnected()
    assert len(link.sent) == 2, "acknowledged results are not sent again"


def test_an_ack_the_full_disk_cannot_note_is_noted_when_space_returns(small_disk: Any) -> None:
    store, link, faults = JobStore(small_disk.path / "jobs.sqlite3"), RecordingLink(), StorageFaults()
    outbox = Outbox(link, store, faults)
    # Enough writes first that the disk-full moment finds no room left in the WAL.
    outbox.send_result("o-1", "edge/replies/o-1", None, _done(store, "o-1"))
    small_disk.fill()
    outbox.acked(1)
    assert faults.failing, "the store could not take note"
    outbox.reconnected()  # reading works on a full disk: o-1 is not re-sent while its ack is pending
    assert len(link.sent) == 1
    small_disk.free()
    outbox.retry(now=float("inf"))
    assert not faults.failing
    assert store.undelivered() == []
