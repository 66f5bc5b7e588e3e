"""Results on their way to the broker: an ack future per message id, re-published after reconnects.

A terminal result is stored with its job before it is published (the worker's
``finish``), and the job is marked ``delivered`` only when the broker
acknowledges the publication.  Until then the result is pending here; after a
reconnect (perhaps to another broker, which holds no session for the agent)
every stored result not yet acknowledged is published again.

No thread of its own.  The worker publishes results (``send_result``); the
intake thread feeds it the broker's acknowledgements (``acked``) and
reconnections (``reconnected``) and calls ``retry`` from its tick, which
finishes bookkeeping a storage error interrupted.  One lock guards the
pending table, held across each publication so that an acknowledgement can
never be processed before its message id is recorded.
"""

from __future__ import annotations

import logging
import sqlite3
import threading
import time
from concurrent.futures import Future
from typing import Protocol

from agent.daemon.faults import StorageFaults, storage_backoff
from agent.daemon.replies import is_local
from agent.jobs.store import JobStore
from edge_contract.errors import LinkError

log = logging.getLogger(__name__)


class Publisher(Protocol):
    """What the outbox needs of the MQTT link."""

    def publish(
        self,
        topic: str,
        payload: bytes,
        *,
        qos: int = 1,
        retain: bool = False,
        correlation: bytes | None = None,
    ) -> int: ...


class Outbox:
    """Pending results by message id; see the module docstring for who calls what."""

    def __init__(self, link: Publisher, store: JobStore, faults: StorageFaults) -> None:
        self._link = link
        self._store = store
        self._faults = faults
        self._lock = threading.Lock()
        self._pending: dict[int, tuple[str, Future[None]]] = {}  # mid -> (job id, its ack)
        self._unmarked: set[str] = set()  # acknowledged, but the store did not take note yet
        self._republish = False  # a reconnect whose re-publication a storage error interrupted
        self._backoff = storage_backoff()
        self._retry_at = 0.0

    @property
    def backlog(self) -> int:
        """Results published and not acknowledged yet."""
        with self._lock:
            return len(self._pending)

    def send_result(
        self, job_id: str, reply_topic: str, correlation: bytes | None, payload: str
    ) -> Future[None]:
        """Publish a stored result; the future completes when the broker acknowledges it."""
        ack: Future[None] = Future()
        with self._lock:
            try:
                mid = self._link.publish(reply_topic, payload.encode(), correlation=correlation)
            except LinkError as exc:
                # Stored and undelivered: it goes out again at the next reconnect.
                log.warning(
                    "result of job %s not published now (%s); it is re-sent on reconnect", job_id, exc
                )
                return ack
            self._pending[mid] = (job_id, ack)
        return ack

    def send_reply(self, reply_topic: str, correlation: bytes | None, payload: str) -> None:
        """Publish an answer that is not stored (a job turned away at once): fire and forget."""
        try:
            self._link.publish(reply_topic, payload.encode(), correlation=correlation)
        except LinkError as exc:
            log.warning("reply to %s not published: %s", reply_topic, exc)

    def acked(self, mid: int) -> None:
        """The broker acknowledged publication ``mid`` (intake thread)."""
        with self._lock:
            entry = self._pending.pop(mid, None)
        if entry is None:
            return  # a chunk, a status or a reply that is not stored
        job_id, ack = entry
        ack.set_result(None)
        self._unmarked.add(job_id)
        self._mark()

    def reconnected(self) -> None:
        """A (re)connection completed: publish again every stored result not acknowledged (intake thread)."""
        self._republish = True
        self._resend()

    def retry(self, now: float | None = None) -> None:
        """Finish what a storage error interrupted, once its backoff has passed (intake thread's tick)."""
        if not (self._unmarked or self._republish):
            return
        if (now if now is not None else time.monotonic()) < self._retry_at:
            return
        self._mark()
        if self._republish:
            self._resend()

    def _mark(self) -> None:
        for job_id in sorted(self._unmarked):
            try:
                self._store.mark_delivered(job_id)
            except sqlite3.Error as exc:
                self._failed("noting a delivered result", exc)
                return
            self._unmarked.discard(job_id)
            self._succeeded()

    def _resend(self) -> None:
        try:
            undelivered = self._store.undelivered()
        except sqlite3.Error as exc:
            self._failed("reading results to re-publish", exc)
            return
        self._backoff.reset()
        self._republish = False
        with self._lock:
            in_flight = {job_id for job_id, _ack in self._pending.values()}
        for job in undelivered:
            if is_local(job.reply_topic):  # an HTTP job's: its client took it or is gone, never the broker's
                continue
            if job.id not in in_flight and job.id not in self._unmarked and job.result is not None:
                self.send_result(job.id, job.reply_topic, job.correlation, job.result)

    def _failed(self, what: str, exc: sqlite3.Error) -> None:
        self._faults.failed(what, exc)
        self._retry_at = time.monotonic() + self._backoff.next_delay()

    def _succeeded(self) -> None:
        self._faults.ok()
        self._backoff.reset()
