"""Where a job's replies go: the seam between the queue and the transports.

Every job has a *reply address*, stored with it in the queue (the ``reply_topic``
column).  For an MQTT job it is a topic; for a job that came over the HTTP API
(``agent.daemon.http``) it is ``http:<job id>``, a local address that no topic can
take (the intake refuses response topics starting with it).  The worker streams
chunks and hands results to ``Replies`` without knowing the transport;
``Replies`` routes each by its address: local ones to the sink attached for
them (the HTTP server's waiting requests), the others to the MQTT outbox.

A local result is handed over at once and marked delivered: nobody can
acknowledge it later, and after a restart its client is gone anyway (the agent
cancels queued HTTP jobs at start, see ``agent.daemon.http.server.cancel_orphans``).
The outbox never re-publishes a local result to the broker.
"""

from __future__ import annotations

import logging
import sqlite3
from concurrent.futures import Future
from typing import TYPE_CHECKING, Protocol

from agent.daemon.results import error_result

if TYPE_CHECKING:
    from agent.daemon.faults import StorageFaults
    from agent.health.telemetry import JobStats
    from agent.jobs.store import JobStore
    from edge_contract.protocol import ModelRef

log = logging.getLogger(__name__)

#: The scheme of local reply addresses: ``http:<job id>``.
LOCAL_SCHEME = "http:"


def is_local(address: str) -> bool:
    """Whether ``address`` is a local reply address (the HTTP API's), not an MQTT topic."""
    return address.startswith(LOCAL_SCHEME)


def local_address(job_id: str) -> str:
    """The reply address of an HTTP job."""
    return LOCAL_SCHEME + job_id


class ReplySink(Protocol):
    """A transport that takes the replies of its own jobs (payloads are the wire models' JSON)."""

    def chunk(self, address: str, payload: bytes) -> None:
        """A streamed ``Chunk``."""
        ...

    def result(self, address: str, payload: str) -> None:
        """The terminal ``Result`` (stored in the queue before it is handed over)."""
        ...


class Sender(Protocol):
    """What the worker and the intake send results and replies through (``Outbox`` or ``Replies``)."""

    def send_result(
        self, job_id: str, reply_topic: str, correlation: bytes | None, payload: str
    ) -> Future[None]: ...

    def send_reply(self, reply_topic: str, correlation: bytes | None, payload: str) -> None: ...


class ChunkPublisher(Protocol):
    def __call__(self, topic: str, payload: bytes, correlation: bytes | None) -> object: ...


class Replies:
    """Routes replies by address: local ones to the attached sink, the others to MQTT. Thread-safe."""

    def __init__(
        self, mqtt: Sender, publish_chunk: ChunkPublisher, store: JobStore, faults: StorageFaults
    ) -> None:
        self._mqtt = mqtt
        self._publish_chunk = publish_chunk
        self._store = store
        self._faults = faults
        self._local: ReplySink | None = None

    def attach(self, sink: ReplySink) -> None:
        """Send local replies to ``sink`` (the HTTP server)."""
        self._local = sink

    def publish_chunk(self, topic: str, payload: bytes, correlation: bytes | None) -> object:
        """Stream one chunk (the worker's ``publish_chunk``)."""
        if not is_local(topic):
            return self._publish_chunk(topic, payload, correlation)
        if self._local is not None:
            try:
                self._local.chunk(topic, payload)
            except Exception:  # a fault of the HTTP side must not disturb the worker
                log.exception("handing a chunk to the HTTP server failed (%s)", topic)
        return None

    def send_result(
        self, job_id: str, reply_topic: str, correlation: bytes | None, payload: str
    ) -> Future[None]:
        """Send a stored result; the future completes once it is delivered (at once for local ones)."""
        if not is_local(reply_topic):
            return self._mqtt.send_result(job_id, reply_topic, correlation, payload)
        self._deliver(reply_topic, payload)
        try:  # no second fsync on the worker's path: the result itself is stored durably already
            self._store.mark_delivered(job_id, durable=False)
        except sqlite3.Error as exc:  # harmless: the outbox never re-publishes a local result
            self._faults.failed(f"noting the delivery of HTTP job {job_id}", exc)
        done: Future[None] = Future()
        done.set_result(None)
        return done

    def send_reply(self, reply_topic: str, correlation: bytes | None, payload: str) -> None:
        """Send an answer that is not stored (a job turned away at admission)."""
        if is_local(reply_topic):
            self._deliver(reply_topic, payload)
        else:
            self._mqtt.send_reply(reply_topic, correlation, payload)

    def _deliver(self, address: str, payload: str) -> None:
        if self._local is None:
            log.debug("no HTTP server to take the result for %s: dropped", address)
            return
        try:
            self._local.result(address, payload)
        except Exception:  # a fault of the HTTP side must not disturb the worker or the intake
            log.exception("handing a result to the HTTP server failed (%s)", address)


def cancel_local_orphans(
    store: JobStore, *, model: ModelRef | None, device_id: str, stats: JobStats
) -> list[str]:
    """At start: cancel every queued or interrupted HTTP job. Their clients went with the old process.

    An HTTP client waits on its connection; after a restart nobody waits for
    these jobs, so running them would only delay the next request.  Each gets a
    stored ``canceled`` result (marked delivered: nobody can take it).  Returns
    their ids.  Raises ``sqlite3.Error`` when the store fails.
    """
    canceled = []
    for job in store.open_jobs():
        if not is_local(job.reply_topic):
            continue
        result = error_result(
            job.id,
            "canceled",
            "canceled",
            "its HTTP client went away when the agent restarted",
            model=model,
            device_id=device_id,
        )
        if store.finish(job.id, result.model_dump_json(exclude_none=True)):
            store.mark_delivered(job.id)
            stats.record("canceled")
            stats.record_http("canceled")
            canceled.append(job.id)
    if canceled:
        log.info(
            "canceled %d HTTP job(s) left from before the restart: %s", len(canceled), ", ".join(canceled)
        )
    return canceled
