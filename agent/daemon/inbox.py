"""The intake thread: every event from the link, handled; every decision of ``intake`` carried out.

Owned by the main thread (``Agent.serve``).  A job is acknowledged to the
broker only after it is committed to the store; when the store fails, the
message is not acknowledged and is handled again after a backoff (the broker
still holds it, so a crash meanwhile loses nothing).  No exception from a
message, the store or the link leaves ``handle``: a bug triggered by one odd
message is logged with its traceback and the message acknowledged, so it
cannot come back forever.

The HTTP API (``agent.daemon.http``) is a second job source: its request threads
call ``submit`` and ``cancel``, which run the same admission (``intake.admit``)
and carry out the decision the same way.  One lock makes admission one step at
a time whichever transport a job came by, so the queue bound holds.
"""

from __future__ import annotations

import logging
import sqlite3
import threading
import time
from collections.abc import Callable, Mapping
from typing import Literal, Protocol

from agent.config import AgentConfig
from agent.daemon import intake
from agent.daemon.faults import StorageFaults, storage_backoff
from agent.daemon.intake import Decision, KnownJob, Rules
from agent.daemon.outbox import Outbox
from agent.daemon.replies import Sender
from agent.daemon.results import error_result, log_job
from agent.daemon.worker import Worker
from agent.health.telemetry import JobStats
from agent.jobs.store import JobStore
from agent.link.mqtt import Connected, Event, Message, Published
from edge_contract.manifest import MAX_MANIFEST_BYTES
from edge_contract.protocol import FleetTopics, ModelRef, Topics

log = logging.getLogger(__name__)


def rules_for(config: AgentConfig, topics: Topics) -> Rules:
    """The admission rules a configuration sets (response topics under ``{prefix}/replies/`` by default)."""
    return Rules(
        topics=topics,
        reply_prefix=config.jobs.reply_topic_prefix or FleetTopics(config.mqtt.topic_prefix).replies_prefix,
        max_payload_bytes=config.jobs.max_payload_bytes,
        max_tokens_limit=config.jobs.max_tokens_limit,
        max_queue=config.jobs.max_queue,
        max_manifest_bytes=MAX_MANIFEST_BYTES,
    )


class Updates(Protocol):
    """What the intake hands model updates to (the ``Updater``)."""

    def offer(self, source: Literal["device", "group"], payload: bytes) -> None: ...
    def refuse_unread(self, reason: str) -> None: ...


class _StoreView:
    """The read-only view admission consults, over the store and the supervisor."""

    def __init__(self, store: JobStore, shedding: Callable[[], list[str] | None]) -> None:
        self._store = store
        self.shedding = shedding

    def queued(self) -> int:
        return self._store.queued_count()

    def known(self, job_id: str) -> KnownJob | None:
        return self._store.get(job_id)


class Inbox:
    """Handles link events on the intake thread; see the module docstring."""

    def __init__(
        self,
        rules: Rules,
        *,
        store: JobStore,
        outbox: Outbox,
        worker: Worker,
        updater: Updates,
        ack: Callable[[Message], None],
        shedding: Callable[[], list[str] | None],
        model: Callable[[], ModelRef],
        device_id: str,
        stats: JobStats,
        faults: StorageFaults,
        replies: Sender | None = None,
        pushed: Mapping[str, Callable[[bytes], None]] | None = None,
    ) -> None:
        """``replies``: where answers go (``Replies``, routing HTTP jobs' to the HTTP server); default the outbox.
        ``pushed``: topics the fleet pushes to the box (its membership, a renewed certificate),
        each with where its messages go."""
        self.rules = rules
        self._pushed = dict(pushed or {})
        self.store = store
        self.outbox = outbox
        self.replies: Sender = replies if replies is not None else outbox
        self.worker = worker
        self.updater = updater
        self._ack = ack
        self._view = _StoreView(store, shedding)
        self._model = model
        self.device_id = device_id
        self.stats = stats
        self.faults = faults
        self._retry: list[tuple[float, Message]] = []  # messages to handle again after a storage error
        self._backoff = storage_backoff(first_s=0.2)
        self._admitting = threading.Lock()  # one admission at a time, from any transport

    def handle(self, event: Event | None) -> None:
        """One event from the link (None: none came); then any message whose retry is due."""
        try:
            if isinstance(event, Message):
                self.on_message(event)
            elif isinstance(event, Published):
                self.outbox.acked(event.mid)
            elif isinstance(event, Connected):
                self.outbox.reconnected()
        except Exception:  # never let one event end the intake loop
            log.exception("unexpected error handling %s", type(event).__name__)
        if self._retry:
            now = time.monotonic()
            due = [m for t, m in self._retry if t <= now]
            self._retry = [(t, m) for t, m in self._retry if t > now]
            for msg in due:
                self.on_message(msg)

    @property
    def waiting(self) -> int:
        """Messages held back by a storage error, to be handled again."""
        return len(self._retry)

    def on_message(self, msg: Message) -> None:
        """Decide, carry out, acknowledge; after a storage error, retry later unacknowledged."""
        log.debug("message on %s (%d bytes, mid %d)", msg.topic, len(msg.payload), msg.mid)
        handler = self._pushed.get(msg.topic)
        if handler is not None:
            if not msg.truncated:
                try:
                    handler(msg.payload)
                except Exception:  # a bug applying it must not stop the intake
                    log.exception("unexpected error applying the message on %s", msg.topic)
            self._ack(msg)
            return
        try:
            with self._admitting:
                decision = intake.decide(msg, self._view, self.rules, time.time())
                self.carry_out(decision)
        except sqlite3.Error as exc:
            # A stalled or full SD card: not acknowledging means the broker still holds the job.
            self.faults.failed(f"handling a message on {msg.topic}", exc)
            self._retry.append((time.monotonic() + self._backoff.next_delay(), msg))
            return
        except Exception:  # a bug triggered by one odd message must not stop the intake
            log.exception("unexpected error handling a message on %s", msg.topic)
        else:
            if isinstance(decision, intake.Accept | intake.Cancel):  # a write went through
                self.faults.ok()
            self._backoff.reset()
        self._ack(msg)

    def submit(self, submission: intake.Submission) -> Decision:
        """Admit a job a local transport parsed itself (any thread), and carry the decision out.

        Raises ``sqlite3.Error`` when the store fails: nothing was stored, the
        transport tells its client to retry.
        """
        try:
            with self._admitting:
                decision = intake.admit(submission, self._view, self.rules, time.time())
                self.carry_out(decision)
        except sqlite3.Error as exc:
            self.faults.failed(f"admitting local job {submission.job_id}", exc)
            raise
        if isinstance(decision, intake.Accept):
            self.faults.ok()
        return decision

    def cancel(self, job_id: str) -> None:
        """Cancel a job of a local transport whose client went away (any thread; raises ``sqlite3.Error``)."""
        with self._admitting:
            self.carry_out(intake.Cancel(job_id))

    def carry_out(self, decision: Decision) -> None:
        """Do what admission decided (raises ``sqlite3.Error`` when the store fails)."""
        if isinstance(decision, intake.Accept):
            self.store.accept(
                decision.job_id,
                decision.request.model_dump_json(exclude_none=True),
                decision.reply_topic,
                decision.correlation,
                deadline=decision.deadline,
                received_at=decision.received_at,
            )
            self.worker.wake()
        elif isinstance(decision, intake.Reply):
            result = error_result(
                decision.job_id,
                decision.status,
                decision.code,
                decision.message,
                model=self._model(),
                device_id=self.device_id,
            )
            self.stats.record(decision.status)
            log_job(result, None)
            payload = result.model_dump_json(exclude_none=True)
            self.replies.send_reply(decision.reply_topic, decision.correlation, payload)
        elif isinstance(decision, intake.Resend):
            log.info("duplicate of finished job %s: re-sending its result", decision.job_id)
            self.replies.send_reply(decision.reply_topic, decision.correlation, decision.result)
        elif isinstance(decision, intake.Drop):
            log.warning("dropping %s", decision.reason)
        elif isinstance(decision, intake.Ignore):
            log.info("ignoring a repeat: %s", decision.reason)
        elif isinstance(decision, intake.Cancel):
            self.worker.cancel(decision.job_id)
        elif isinstance(decision, intake.Manifest):
            self.updater.offer(decision.source, decision.payload)
        else:
            self.updater.refuse_unread(decision.reason)
