"""The agent daemon: jobs in over MQTT, stored durably, answered by one worker.

Threads and what they own:

* paho's network thread (inside ``MQTTLink``) only queues events;
* the intake loop (``serve``, the main thread) validates each message, stores
  accepted jobs, acknowledges them, handles cancels and publish acks;
* the worker thread runs the engine, one job at a time, and publishes chunks
  and the terminal result.

A job is acknowledged to the broker only after it is committed to the
``JobStore``; its result stays stored until the broker acknowledges it.  So a
``kill -9`` at any moment loses nothing: an unacknowledged job is redelivered,
a stored one is resumed, an unacknowledged result is published again.
"""

from __future__ import annotations

import json
import logging
import queue
import re
import signal
import sqlite3
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from types import FrameType

from pydantic import ValidationError

from agent import __version__
from agent.config import AgentConfig
from agent.errors import ContextOverflowError, GenerationError, InvalidRequestError, ModelError
from agent.health.probe import SystemProbe
from agent.health.sd_notify import Notifier
from agent.health.telemetry import JobStats, ModelInfo, PrefixCacheTelemetry
from agent.jobs.store import JobStore, StoredJob
from agent.link.mqtt import Connected, Message, MQTTLink, Published
from agent.link.tls import CERT_WARN_DAYS, certificate_expiry, days_left
from agent.protocol import (
    CancelRequest,
    Chunk,
    ErrorInfo,
    Health,
    JobErrorCode,
    JobRequest,
    JobStatus,
    ModelState,
    Result,
    Status,
    Topics,
    Usage,
)
from agent.updates.manifest import MAX_MANIFEST_BYTES
from agent.updates.updater import Source, Updater

log = logging.getLogger(__name__)

# Only the head of an oversized or unparsable payload is searched for the job
# id, so a hostile message costs bounded work.
_ID_PATTERN = re.compile(rb'"id"\s*:\s*"([A-Za-z0-9_.:@-]{1,128})"')
_JOB_ID = re.compile(r"[A-Za-z0-9_.:@-]{1,128}")
_ID_SCAN_BYTES = 4096
# Delivered results are kept this long (and at most this many) to answer
# duplicates of a finished job from the store.
_KEEP_RESULTS_S = 7 * 24 * 3600
_KEEP_RESULTS_MAX = 10_000
# A prefill pass gives no sign of life until it ends; on a Pi a long prompt can
# take minutes (Phi-3-mini prefills at roughly 10-40 tok/s there), so the
# watchdog allows this much silence per prompt token before it stops pinging.
_PREFILL_ALLOWANCE_S_PER_TOKEN = 0.2
# Until the broker is reached, ask systemd for this much more start time every
# third of it: a box that boots before its broker must not be killed for that.
_START_EXTENSION_S = 15.0
# Swapping models (unload, load, smoke test) gives no sign of life either;
# loading a 2 GB int4 model from an SD card takes tens of seconds on a Pi.
_MODEL_SWAP_ALLOWANCE_S = 180.0
# After a storage error, wait this long before touching the database again.
_RETRY_S = 1.0
# A cancel request is {"id": "<at most 128 characters>"}: anything much larger is not one.
_CANCEL_MAX_BYTES = 1024
# A response topic is published to as given; it must be a plain topic name.
_MAX_TOPIC_BYTES = 1024
_BAD_REPLY_TOPIC = (
    f"response topic: must be a topic name (no wildcards, no '$' start, at most {_MAX_TOPIC_BYTES} bytes)"
)


class Agent:
    """One box's daemon. ``serve`` runs until ``shutdown`` (or SIGTERM/SIGINT)."""

    def __init__(self, config: AgentConfig) -> None:
        self.config = config
        self.topics = Topics(config.mqtt.topic_prefix, config.device_id, config.group)
        config.state_dir.mkdir(parents=True, exist_ok=True)
        self.store = JobStore(config.state_dir / "jobs.sqlite3")
        self._tasks: queue.SimpleQueue[tuple[Callable[[], None], Future[None]]] = queue.SimpleQueue()
        # Loads the active model (or falls back to the previous or configured one).
        self.updater = Updater(config, publish=self._publish_model_state, between_jobs=self._between_jobs)
        subscriptions = [self.topics.jobs, self.topics.cancel, self.topics.model_desired]
        if self.topics.group_model_desired:
            subscriptions.append(self.topics.group_model_desired)
        if self.topics.shared_group_jobs:
            if config.mqtt.protocol == "5":
                subscriptions.append(self.topics.shared_group_jobs)
            else:
                log.warning(
                    "MQTT 3.1.1 has no shared subscriptions: group %s jobs are not served", config.group
                )
        will = (
            self.topics.status,
            Status(online=False, device_id=config.device_id).model_dump_json().encode(),
        )
        # Every other subscription gets the link's default limit (DEFAULT_PAYLOAD_LIMIT).
        limits = {self.topics.jobs: config.jobs.max_payload_bytes, self.topics.cancel: _CANCEL_MAX_BYTES}
        if self.topics.shared_group_jobs:
            limits[self.topics.shared_group_jobs] = config.jobs.max_payload_bytes
        for desired in (self.topics.model_desired, self.topics.group_model_desired):
            if desired:
                limits[desired] = MAX_MANIFEST_BYTES
        self.link = MQTTLink(
            config.mqtt,
            client_id=config.device_id,
            subscriptions=subscriptions,
            will=will,
            # Let the broker drop absurd messages itself; oversized-but-sane ones
            # still arrive (cut to their head) and get a precise "payload_too_large" answer.
            max_packet_bytes=max(4 * config.jobs.max_payload_bytes, 1 << 20),
            on_connect=self._on_connect,
            payload_limits=limits,
        )
        self._stopping = threading.Event()
        self._shutdown_deadline: float | None = None
        self._work = threading.Event()
        self._cancel: set[str] = set()
        self._running: str | None = None
        self._lock = threading.Lock()  # guards _cancel, _running and _pending
        self._pending: dict[int, str] = {}  # result publication mid -> job id
        self._worker = threading.Thread(target=self._work_loop, name="edge-agent-worker", daemon=True)
        self.notifier = Notifier()
        self.probe = SystemProbe(config.state_dir, sysfs=config.telemetry.sysfs_root)
        self.job_stats = JobStats()
        self._health: Health | None = None
        self._ready = False
        self._beat = time.monotonic()  # the worker's last sign of life
        self._quiet_until = 0.0  # the worker may be silent until then (a long prefill)
        self._next_telemetry = 0.0
        self._next_watchdog = 0.0
        self._next_extension = 0.0
        self._retry: list[tuple[float, Message]] = []  # messages to handle again after a storage error
        # The client certificate is loaded once, at start (as the TLS context is): its expiry is fixed.
        tls = config.mqtt.tls
        self._cert_expires_at = None
        if tls is not None and tls.cert is not None:
            expiry = certificate_expiry(tls.cert)
            self._cert_expires_at = expiry.timestamp()
            left = days_left(expiry)
            if left < 0:
                log.error(
                    "the client certificate %s expired on %s: the broker will refuse it", tls.cert, expiry
                )
            elif left < CERT_WARN_DAYS:
                log.warning("the client certificate %s expires on %s: provision a new one", tls.cert, expiry)

    # -- lifecycle ---------------------------------------------------------------

    def serve(self) -> None:
        """Run until shut down: recover, connect, take jobs, answer them."""
        for job in self.store.recover():
            self._finish(
                job,
                self._result(
                    job.id,
                    "failed",
                    error=("interrupted", "the agent stopped during this job too many times"),
                ),
            )
        self._worker.start()
        self.link.start()
        self.updater.start()
        self._work.set()
        last_prune = 0.0
        while not self._stopping.is_set():
            try:
                event = self.link.events.get(timeout=0.5)
            except queue.Empty:
                event = None
            if isinstance(event, Message):
                self._on_message(event)
            elif isinstance(event, Published):
                self._on_published(event.mid)
            elif isinstance(event, Connected):
                self._republish_undelivered()
            if time.monotonic() - last_prune > 3600:
                last_prune = time.monotonic()
                self.store.prune(keep_s=_KEEP_RESULTS_S, keep_max=_KEEP_RESULTS_MAX)
            self._tick()
        self.notifier.stopping("finishing the running job, then disconnecting")
        self.updater.stop()
        self._worker.join(timeout=self.config.jobs.shutdown_grace_s + 5)
        self._drain_acks(timeout=3.0)
        offline = Status(online=False, device_id=self.config.device_id).model_dump_json().encode()
        self.link.stop(final=(self.topics.status, offline))
        self.store.close()

    def shutdown(self, grace_s: float | None = None) -> None:
        """Stop taking jobs; let the running one finish within ``grace_s`` (default: from config)."""
        if grace_s is None:
            grace_s = self.config.jobs.shutdown_grace_s
        self._shutdown_deadline = time.monotonic() + grace_s
        self._stopping.set()
        self._work.set()

    # -- supervision: systemd notify, watchdog, telemetry ---------------------------

    def _tick(self) -> None:
        """Called from the intake loop at least twice a second."""
        now = time.monotonic()
        if self._retry:
            due = [m for t, m in self._retry if t <= now]
            self._retry = [(t, m) for t, m in self._retry if t > now]
            for msg in due:
                self._on_message(msg)
        if not self._ready:
            if self.link.connected.is_set():
                self._ready = True
                self.notifier.ready(self._status_line())
            elif now >= self._next_extension:
                self._next_extension = now + _START_EXTENSION_S / 3
                self.notifier.extend_timeout(_START_EXTENSION_S)
        interval = self.notifier.watchdog_interval_s
        if interval is not None and now >= self._next_watchdog and self._healthy_loops(now, 2 * interval):
            self._next_watchdog = now + interval
            self.notifier.watchdog()
        if now >= self._next_telemetry:
            self._next_telemetry = now + self.config.telemetry.interval_s
            self._publish_telemetry()

    def _healthy_loops(self, now: float, patience_s: float) -> bool:
        """The worker showed life recently (or is in a long prefill) and paho's thread runs."""
        worker_ok = now - self._beat < patience_s or now < self._quiet_until
        return worker_ok and self._worker.is_alive() and self.link.alive

    def _publish_telemetry(self) -> None:
        with self._lock:
            backlog = len(self._pending)
        serving = self.updater.serving
        message = self.probe.telemetry(
            device_id=self.config.device_id,
            interval_s=self.config.telemetry.interval_s,
            thresholds=self.config.health,
            jobs=self.job_stats.snapshot_and_reset(self.store.queued_count()),
            model=ModelInfo(
                name=serving.ref.name,
                version=serving.ref.version,
                precision=serving.precision,
                prefix_cache=PrefixCacheTelemetry.of(serving.engine.prefix_cache_stats()),
            ),
            backlog=backlog,
            previous=self._health,
            cert_expires_at=self._cert_expires_at,
        )
        changed = message.health != self._health
        self._health = message.health
        if changed and message.health is not None:
            level = logging.WARNING if message.health.verdict == "degraded" else logging.INFO
            log.log(level, "health: %s %s", message.health.verdict, ", ".join(message.health.reasons))
        self.link.publish(self.topics.telemetry, message.model_dump_json().encode(), qos=0)
        if changed and self._ready:
            self._publish_status()
        self.notifier.status(self._status_line())

    def _shedding(self) -> bool:
        return self._health is not None and self._health.overloaded

    def _status_line(self) -> str:
        with self._lock:
            running = self._running
        health: str = self._health.verdict if self._health is not None else "unknown"
        if self._health is not None and self._health.reasons:
            health += " (" + ", ".join(self._health.reasons) + ")"
        link = "connected" if self.link.connected.is_set() else "broker unreachable"
        return (
            f"serving {self.updater.serving.ref.name}: {'1 running' if running else 'idle'}, "
            f"{self.store.queued_count()} queued, health {health}, {link}"
        )

    def install_signal_handlers(self) -> None:
        """SIGTERM and SIGINT start a clean shutdown."""

        def handler(signum: int, _frame: FrameType | None) -> None:
            log.info("signal %s: shutting down", signum)
            self.shutdown()

        signal.signal(signal.SIGTERM, handler)
        signal.signal(signal.SIGINT, handler)

    # -- intake (main thread) ------------------------------------------------------

    def _on_message(self, msg: Message) -> None:
        log.debug("message on %s (%d bytes, mid %d)", msg.topic, len(msg.payload), msg.mid)
        try:
            if msg.topic == self.topics.cancel:
                self._on_cancel(msg)
            elif msg.topic in (self.topics.model_desired, self.topics.group_model_desired):
                source: Source = "device" if msg.topic == self.topics.model_desired else "group"
                if msg.truncated:
                    self.updater.refuse_unread(
                        f"manifest is {msg.size} bytes; the limit is {MAX_MANIFEST_BYTES}"
                    )
                else:
                    self.updater.offer(source, msg.payload)
            else:
                self._on_job(msg)
        except sqlite3.Error as exc:
            # Storage trouble (a stalled or full SD card): not acknowledging means
            # the broker still holds the job; try again shortly.
            log.error("cannot store a message from %s (%s); retrying in %.0f s", msg.topic, exc, _RETRY_S)
            self._retry.append((time.monotonic() + _RETRY_S, msg))
            return
        except Exception:  # a bug triggered by one odd message must not stop the intake
            log.exception("unexpected error handling a message on %s", msg.topic)
        self.link.ack(msg)

    def _on_job(self, msg: Message) -> None:
        limit = self.config.jobs.max_payload_bytes
        if msg.truncated or len(msg.payload) > limit:
            size = max(msg.size, len(msg.payload))
            self._reject_unreadable(
                msg, "payload_too_large", f"payload is {size} bytes; the limit is {limit}"
            )
            return
        try:
            data = json.loads(msg.payload)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            self._reject_unreadable(msg, "invalid_json", f"payload is not valid JSON: {exc}")
            return
        job_id = data.get("id") if isinstance(data, dict) else None
        if not isinstance(job_id, str) or not _JOB_ID.fullmatch(job_id):
            log.warning("dropping a job without a readable id on %s", msg.topic)
            return
        reply = self._reply_topic(msg, job_id)
        if msg.response_topic is not None and reply != msg.response_topic:
            self._reply_now(job_id, reply, msg.correlation, "rejected", "invalid_request", _BAD_REPLY_TOPIC)
            return
        try:
            request = JobRequest.model_validate(data)
        except ValidationError as exc:
            self._reply_now(job_id, reply, msg.correlation, "rejected", "invalid_request", _describe(exc))
            return
        known = self.store.get(job_id)
        if known is not None:
            if known.state == "done" and known.result is not None:
                log.info("duplicate of finished job %s: re-sending its result", job_id)
                self._publish_result(known.id, known.reply_topic, known.correlation, known.result)
            return
        now = time.time()
        deadline = request.deadline(now)
        if deadline is not None and deadline <= now:
            self._reply_now(
                job_id, reply, msg.correlation, "expired", "expired", "the job expired before it arrived"
            )
            return
        if request.max_tokens > self.config.jobs.max_tokens_limit:
            self._reply_now(
                job_id,
                reply,
                msg.correlation,
                "rejected",
                "invalid_request",
                f"max_tokens: {request.max_tokens} exceeds this agent's limit of {self.config.jobs.max_tokens_limit}",
            )
            return
        if self._shedding() and self.config.health.shed_load == "reject":
            assert self._health is not None
            reasons = ", ".join(self._health.reasons)
            self._reply_now(
                job_id,
                reply,
                msg.correlation,
                "rejected",
                "overloaded",
                f"the box is shedding load ({reasons}); retry later or elsewhere",
            )
            return
        if self.store.queued_count() >= self.config.jobs.max_queue:
            self._reply_now(
                job_id,
                reply,
                msg.correlation,
                "rejected",
                "busy",
                f"the queue is full ({self.config.jobs.max_queue} jobs)",
            )
            return
        self.store.accept(
            job_id,
            request.model_dump_json(exclude_none=True),
            reply,
            msg.correlation,
            deadline=deadline,
            received_at=now,
        )
        self._work.set()

    def _on_cancel(self, msg: Message) -> None:
        if msg.truncated:
            log.warning("ignoring a cancel request of %d bytes", msg.size)
            return
        try:
            cancel = CancelRequest.model_validate_json(msg.payload[:_ID_SCAN_BYTES])
        except ValidationError as exc:
            log.warning("ignoring an invalid cancel request: %s", _describe(exc))
            return
        job = self.store.get(cancel.id)
        if job is None or job.state == "done":
            return
        with self._lock:
            self._cancel.add(cancel.id)
            running = self._running == cancel.id
        if not running and job.state == "queued":
            with self._lock:
                self._cancel.discard(cancel.id)
            self._finish(
                job, self._result(job.id, "canceled", error=("canceled", "canceled before it started"))
            )

    def _on_published(self, mid: int) -> None:
        with self._lock:
            job_id = self._pending.pop(mid, None)
        if job_id is not None:
            self.store.mark_delivered(job_id)

    def _republish_undelivered(self) -> None:
        with self._lock:
            in_flight = set(self._pending.values())
        for job in self.store.undelivered():
            if job.id not in in_flight and job.result is not None:
                self._publish_result(job.id, job.reply_topic, job.correlation, job.result)

    def _reject_unreadable(self, msg: Message, code: JobErrorCode, message: str) -> None:
        found = _ID_PATTERN.search(msg.payload[:_ID_SCAN_BYTES])
        if found is None:
            log.warning("dropping a message on %s with no readable id: %s", msg.topic, message)
            return
        job_id = found.group(1).decode()
        reply = self._reply_topic(msg, job_id)
        self._reply_now(job_id, reply, msg.correlation, "rejected", code, message)

    def _reply_topic(self, msg: Message, job_id: str) -> str:
        """Where to answer: the caller's response topic if it is a valid topic name, else the default."""
        topic = msg.response_topic
        if topic is not None and _publishable(topic):
            return topic
        return self.topics.result(job_id)

    def _reply_now(
        self,
        job_id: str,
        reply: str,
        correlation: bytes | None,
        status: JobStatus,
        code: JobErrorCode,
        message: str,
    ) -> None:
        """Answer a job that was never accepted (nothing is stored: a retry may succeed)."""
        log.info("job %s %s: %s", job_id, status, message)
        self.job_stats.record(status)
        result = self._result(job_id, status, error=(code, message))
        self.link.publish(reply, result.model_dump_json(exclude_none=True).encode(), correlation=correlation)

    # -- worker thread ---------------------------------------------------------------

    def _work_loop(self) -> None:
        while True:
            self._work.wait(timeout=1.0)
            self._work.clear()
            self._beat = time.monotonic()
            while not self._stopping.is_set():
                self._run_tasks()
                if self._shedding() and self.config.health.shed_load == "queue":
                    break  # jobs wait in the queue until the box recovers
                try:
                    job = self.store.claim_next()
                    if job is None:
                        break
                    self._run(job)
                except sqlite3.Error as exc:  # a stalled disk: no heartbeat until it recovers
                    log.error("job store error in the worker: %s; retrying in %.0f s", exc, _RETRY_S)
                    time.sleep(_RETRY_S)
            if self._stopping.is_set():
                return

    def _run(self, job: StoredJob) -> None:
        with self._lock:
            self._running = job.id
        try:
            result = self._execute(job)
        except Exception as exc:  # the engine failing must not take the daemon down
            log.exception("job %s failed", job.id)
            result = self._result(job.id, "failed", error=("internal", f"{type(exc).__name__}: {exc}"))
        # Jobs the model itself ran (not refused or expired before) count towards an update's probation.
        ran_engine = result is not None and result.status in ("succeeded", "failed")
        with self._lock:
            self._running = None
            self._cancel.discard(job.id)
        if result is None:  # checkpointed at shutdown: it runs again after the restart
            self.store.requeue(job.id)
            return
        self._finish(job, result)
        if ran_engine:
            self.updater.job_finished(
                result.status == "succeeded", result.error.message if result.error else None
            )

    def _execute(self, job: StoredJob) -> Result | None:
        request = JobRequest.model_validate_json(job.request)
        engine = self.updater.serving.engine
        if job.deadline is not None and job.deadline <= time.time():
            return self._result(
                job.id, "expired", error=("expired", "the job expired while it waited in the queue")
            )
        try:
            if request.messages is not None:
                ids = engine.prompt_ids(messages=[m.model_dump() for m in request.messages])
            else:
                ids = engine.prompt_ids(request.prompt)
            params = request.sampling_params()
        except InvalidRequestError as exc:
            return self._result(job.id, "rejected", error=(exc.code, exc.message))
        seq = 0

        def on_text(text: str) -> None:
            nonlocal seq
            chunk = Chunk(id=job.id, seq=seq, text=text)
            self.link.publish(job.reply_topic, chunk.model_dump_json().encode(), correlation=job.correlation)
            seq += 1

        checkpoint = False

        def should_stop() -> bool:
            nonlocal checkpoint
            self._beat = time.monotonic()
            if self._shutdown_deadline is not None and time.monotonic() > self._shutdown_deadline:
                checkpoint = True
                return True
            with self._lock:
                return job.id in self._cancel

        self._quiet_until = time.monotonic() + _PREFILL_ALLOWANCE_S_PER_TOKEN * len(ids)
        try:
            completion = engine.generate(
                ids, params, on_text=on_text if request.stream else None, should_stop=should_stop
            )
        except (ContextOverflowError, InvalidRequestError) as exc:
            return self._result(job.id, "rejected", error=(exc.code, exc.message))
        except (ModelError, GenerationError) as exc:
            return self._result(job.id, "failed", error=(exc.code, exc.message))
        if checkpoint:
            return None
        status: JobStatus = "canceled" if completion.finish_reason == "canceled" else "succeeded"
        return Result(
            id=job.id,
            status=status,
            text=completion.text,
            finish_reason=completion.finish_reason,
            usage=Usage(
                prompt_tokens=completion.prompt_tokens,
                completion_tokens=completion.completion_tokens,
                cached_tokens=completion.cached_tokens,
            ),
            timings=completion.timings,
            model=self.updater.serving.ref,
            error=ErrorInfo(code="canceled", message="canceled while running")
            if status == "canceled"
            else None,
        )

    def _between_jobs(self, task: Callable[[], None]) -> Future[None]:
        """Have the worker run ``task`` before it starts its next job (the model swaps this way)."""
        future: Future[None] = Future()
        self._tasks.put((task, future))
        self._work.set()
        return future

    def _run_tasks(self) -> None:
        while True:
            try:
                task, future = self._tasks.get_nowait()
            except queue.Empty:
                return
            if not future.set_running_or_notify_cancel():
                continue
            self._quiet_until = time.monotonic() + _MODEL_SWAP_ALLOWANCE_S
            try:
                task()
            except BaseException as exc:  # handed to the waiting updater, which reports it
                future.set_exception(exc)
            else:
                future.set_result(None)
            self._beat = time.monotonic()
            self._quiet_until = 0.0

    # -- results ---------------------------------------------------------------------------

    def _result(self, job_id: str, status: JobStatus, *, error: tuple[JobErrorCode, str]) -> Result:
        return Result(
            id=job_id,
            status=status,
            model=self.updater.serving.ref,
            error=ErrorInfo(code=error[0], message=error[1]),
        )

    def _finish(self, job: StoredJob, result: Result) -> None:
        payload = result.model_dump_json(exclude_none=True)
        if self.store.finish(job.id, payload):
            self.job_stats.record(
                result.status,
                latency_s=time.time() - job.received_at,
                decode_tok_s=result.timings.decode_tokens_per_s if result.timings else None,
            )
            self._publish_result(job.id, job.reply_topic, job.correlation, payload)

    def _publish_result(self, job_id: str, reply: str, correlation: bytes | None, payload: str) -> None:
        with self._lock:  # held across publish so the ack cannot overtake the bookkeeping
            mid = self.link.publish(reply, payload.encode(), correlation=correlation)
            self._pending[mid] = job_id

    def _drain_acks(self, timeout: float) -> None:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            with self._lock:
                if not self._pending:
                    return
            try:
                event = self.link.events.get(timeout=0.1)
            except queue.Empty:
                continue
            if isinstance(event, Published):
                self._on_published(event.mid)

    def _on_connect(self) -> None:
        self._publish_status()
        self._publish_model_state(self.updater.state())

    def _publish_model_state(self, state: ModelState) -> None:
        """Retained model state; the status carries the model too, so it follows a switch."""
        self.link.publish(self.topics.model_state, state.model_dump_json().encode(), retain=True)
        if self._ready:
            self._publish_status()

    def _publish_status(self) -> None:
        status = Status(
            online=True,
            device_id=self.config.device_id,
            group=self.config.group,
            agent_version=__version__,
            model=self.updater.serving.ref,
            capabilities=["generate", "stream", "chat", "cancel"],
            health=self._health,
        )
        self.link.publish(self.topics.status, status.model_dump_json().encode(), retain=True)


def _publishable(topic: str) -> bool:
    """A topic name the agent may publish to: no wildcards, NUL, system ('$') level, or excess length."""
    return (
        0 < len(topic.encode()) <= _MAX_TOPIC_BYTES
        and not topic.startswith("$")
        and not any(ch in topic for ch in "+#\0")
    )


def _describe(exc: ValidationError) -> str:
    """A short, precise message naming each invalid field."""
    parts = []
    for err in exc.errors()[:5]:
        where = ".".join(str(p) for p in err["loc"]) or "request"
        parts.append(f"{where}: {err['msg']}")
    return "; ".join(parts)
