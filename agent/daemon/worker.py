"""The worker: claim the oldest queued job, run it on the served model, finish it, one at a time.

Owned by the ``edge-agent-worker`` thread, which also runs the updater's
between-job tasks (a model swap happens only here, so a job always ends on the
model it started on).  The intake thread may ``cancel`` a job and ``wake`` the
worker; the supervisor reads ``beat`` and ``quiet_until`` for the watchdog.

Its interface, for whoever schedules more than one job at a time:

* ``claim()`` marks the oldest queued job running and returns it (or None);
* ``run(job)`` runs it and returns an ``Outcome`` (None: checkpointed at
  shutdown, to be requeued);
* ``finish(job, outcome)`` stores the result, publishes it through the
  outbox, counts it and reports it to the model's probation;
* ``requeue(job)`` puts it back as if it had not started.

Storage errors never end the thread: a claim that fails is retried with
backoff; a result that cannot be stored is kept in memory and stored (then
published) as soon as the disk takes writes again, before any new job starts.
If the process dies meanwhile the job is still ``running`` in the database and
runs again after the restart: late, never lost.
"""

from __future__ import annotations

import logging
import queue
import sqlite3
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from typing import TYPE_CHECKING

from agent.daemon.batching import BatchRunner
from agent.daemon.faults import StorageFaults, storage_backoff
from agent.daemon.hooks import PREFILL_ALLOWANCE_S_PER_TOKEN, JobHooks
from agent.daemon.outcome import Models, Outcome, blame
from agent.daemon.replies import Sender
from agent.daemon.results import error_result, log_job
from agent.health.telemetry import JobStats
from agent.jobs.store import JobStore, StoredJob
from edge_contract.errors import ContextOverflowError, GenerationError, InvalidRequestError, ModelError
from edge_contract.protocol import ErrorInfo, JobErrorCode, JobRequest, JobStatus, Result, Usage

if TYPE_CHECKING:
    from agent.engine.engine import Completion
    from agent.engine.sampling import SamplingParams

log = logging.getLogger(__name__)

# Swapping models (unload, load, smoke test) gives no sign of life either;
# loading a 2 GB int4 model from an SD card takes tens of seconds on a Pi.
_MODEL_SWAP_ALLOWANCE_S = 180.0


class Worker:
    """Runs queued jobs on ``models.serving``; see the module docstring."""

    def __init__(
        self,
        store: JobStore,
        outbox: Sender,
        models: Models,
        *,
        device_id: str,
        stats: JobStats,
        faults: StorageFaults,
        publish_chunk: Callable[[str, bytes, bytes | None], object],
        hold: Callable[[], bool] = lambda: False,
    ) -> None:
        """``publish_chunk(topic, payload, correlation)`` streams; ``hold()`` true: start no job now."""
        self.store = store
        self.outbox = outbox
        self.models = models
        self.device_id = device_id
        self.stats = stats
        self.faults = faults
        self._publish_chunk = publish_chunk
        self._hold = hold
        self._thread = threading.Thread(target=self._loop, name="edge-agent-worker", daemon=True)
        self._work = threading.Event()
        self._stopping = threading.Event()
        self._deadline: float | None = None  # monotonic time past which a running job is checkpointed
        self._lock = threading.Lock()  # guards _cancel and _running
        self._cancel: set[str] = set()
        self._running: str | None = None
        self._tasks: queue.SimpleQueue[tuple[Callable[[], None], Future[None]]] = queue.SimpleQueue()
        self._unfinished: list[tuple[StoredJob, Outcome]] = []  # results the store did not take yet
        self._recovered = False
        self._backoff = storage_backoff()
        self.beat = time.monotonic()  # last sign of life
        self.quiet_until = 0.0  # may be silent until then (a long prefill, a model swap)

    # -- control (any thread) ------------------------------------------------------------------

    def start(self) -> None:
        """Start the thread."""
        self._thread.start()
        self._work.set()

    def wake(self) -> None:
        """A job was queued (or something else changed): look at the queue now."""
        self._work.set()

    def stop(self, grace_s: float) -> None:
        """Start no new job; checkpoint the running one if it is not done within ``grace_s``."""
        self._deadline = time.monotonic() + grace_s
        self._stopping.set()
        self._work.set()

    def join(self, timeout: float) -> None:
        """Wait for the thread to end."""
        if self._thread.is_alive():
            self._thread.join(timeout)

    @property
    def alive(self) -> bool:
        """Whether the thread runs."""
        return self._thread.is_alive()

    @property
    def running(self) -> str | None:
        """The id of the job running now."""
        with self._lock:
            return self._running

    def between_jobs(self, task: Callable[[], None]) -> Future[None]:
        """Have the worker run ``task`` before it starts its next job (the model swaps this way)."""
        future: Future[None] = Future()
        self._tasks.put((task, future))
        self._work.set()
        return future

    def cancel(self, job_id: str) -> bool:
        """Cancel a queued or running job (intake thread). False when it is neither.

        Raises ``sqlite3.Error`` when the store fails (the intake retries the request).
        """
        job = self.store.get(job_id)
        if job is None or job.state == "done":
            return False
        with self._lock:
            self._cancel.add(job_id)
        if job.state == "queued":
            result = self._error(job.id, "canceled", "canceled", "canceled before it started")
            if self.store.finish(job.id, result.model_dump_json(exclude_none=True), only_queued=True):
                with self._lock:
                    self._cancel.discard(job_id)
                self._published(job, Outcome(result))
        return True

    # -- for the hooks and the batch runner (worker thread) -------------------------------------

    def publish_chunk(self, topic: str, payload: bytes, correlation: bytes | None) -> object:
        """Publish one streamed chunk of a running job."""
        return self._publish_chunk(topic, payload, correlation)

    def stop_reason(self, job_id: str) -> str | None:
        """Why the running ``job_id`` must stop now: ``"checkpoint"``, ``"cancel"`` or None (a sign of life)."""
        self.beat = time.monotonic()
        if self._deadline is not None and time.monotonic() > self._deadline:
            return "checkpoint"
        with self._lock:
            return "cancel" if job_id in self._cancel else None

    def may_claim_more(self) -> bool:
        """Whether another job may join the running ones (not stopping, no model swap waiting, not held)."""
        return not self._stopping.is_set() and self._tasks.empty() and not self._hold()

    def set_running(self, job_ids: list[str]) -> None:
        """The jobs running now (``running`` reports them)."""
        with self._lock:
            self._running = ", ".join(job_ids) or None

    def forget_cancel(self, job_id: str) -> None:
        """``job_id`` ended: a cancel asked for it is moot."""
        with self._lock:
            self._cancel.discard(job_id)

    # -- the thread ------------------------------------------------------------------------------

    def _loop(self) -> None:
        while True:
            self._work.wait(timeout=1.0)
            self._work.clear()
            self.beat = time.monotonic()
            while not self._stopping.is_set():
                try:
                    if not self.step():
                        break
                except Exception:  # a bug must not end the worker: log it, pause, go on
                    log.exception("unexpected error in the worker")
                    self._stopping.wait(1.0)
                self.beat = time.monotonic()
            if self._stopping.is_set():
                return

    def step(self) -> bool:
        """Do one thing: tasks, pending bookkeeping, then one job. False: nothing to do until woken."""
        self._run_tasks()
        doing = "recovering interrupted jobs"
        try:
            if not self._recovered:
                self._recover()
            while self._unfinished:
                doing = "storing a finished job's result"
                self._finish_now(*self._unfinished[0])
                self._unfinished.pop(0)
            if self._hold():
                return False  # jobs wait in the queue until the box recovers
            doing = "claiming a job"
            job = self.claim()
        except sqlite3.Error as exc:
            self._pause(doing, exc)
            return True
        self._backoff.reset()
        if job is None:
            return False
        if self.models.serving.engine.options.max_batch > 1:
            BatchRunner(self).drain(job)  # this job and others claimed while it runs
        else:
            self.run_alone(job)
        return True

    def _pause(self, what: str, exc: sqlite3.Error) -> None:
        """Storage failed: count it, wait a little (alive: the watchdog keeps being fed)."""
        self.faults.failed(what, exc)
        self._stopping.wait(self._backoff.next_delay())
        self.beat = time.monotonic()

    def _recover(self) -> None:
        for job in self.store.recover():
            result = self._error(
                job.id, "failed", "interrupted", "the agent stopped during this job too many times"
            )
            self.finish(job, Outcome(result))
        self._recovered = True
        self.faults.ok()

    # -- claim, run, finish, requeue ---------------------------------------------------------------

    def claim(self) -> StoredJob | None:
        """The oldest queued job, now marked running (raises ``sqlite3.Error`` when storage fails)."""
        job = self.store.claim_next()
        self.faults.ok()
        return job

    def run(self, job: StoredJob) -> Outcome | None:
        """Run ``job`` on the served model; None when it was checkpointed at shutdown."""
        with self._lock:
            self._running = job.id
        try:
            return self._execute(job)
        finally:
            with self._lock:
                self._running = None
                self._cancel.discard(job.id)

    def run_alone(self, job: StoredJob) -> None:
        """Run ``job`` by itself, then finish it (or requeue it when it was checkpointed)."""
        outcome = self.run(job)
        if outcome is None:
            self.requeue(job)
        else:
            self.finish(job, outcome)

    def finish(self, job: StoredJob, outcome: Outcome) -> None:
        """Store the result and publish it; kept for a retry when the store fails."""
        try:
            self._finish_now(job, outcome)
        except sqlite3.Error as exc:
            self.faults.failed(f"storing the result of job {job.id}", exc)
            self._unfinished.append((job, outcome))

    def requeue(self, job: StoredJob) -> None:
        """Put a job back in the queue as if it had not started (it runs after the restart otherwise)."""
        try:
            self.store.requeue(job.id)
        except sqlite3.Error as exc:  # it is still 'running': the restart requeues it
            self.faults.failed(f"requeueing job {job.id}", exc)

    def _finish_now(self, job: StoredJob, outcome: Outcome) -> None:
        stored = self.store.finish(job.id, outcome.result.model_dump_json(exclude_none=True))
        self.faults.ok()
        if stored:
            self._published(job, outcome)
        if outcome.probation != "none":
            error = outcome.result.error
            try:
                self.models.job_finished(outcome.probation == "success", error.message if error else None)
            except Exception:  # the update record could not be written (a full disk): the job is done
                log.exception("job %s: cannot count it towards the model's probation", job.id)

    def _published(self, job: StoredJob, outcome: Outcome) -> None:
        result = outcome.result
        elapsed = time.time() - job.received_at
        self.stats.record(
            result.status,
            latency_s=elapsed,
            decode_tok_s=result.timings.decode_tokens_per_s if result.timings else None,
        )
        log_job(result, elapsed)
        self.outbox.send_result(
            job.id, job.reply_topic, job.correlation, result.model_dump_json(exclude_none=True)
        )

    # -- running one job -------------------------------------------------------------------------------

    def _execute(self, job: StoredJob) -> Outcome | None:
        prepared = self.prepare(job)
        if isinstance(prepared, Outcome):
            return prepared
        request, ids, params = prepared
        hooks = JobHooks(self, job)
        self.quiet_until = time.monotonic() + PREFILL_ALLOWANCE_S_PER_TOKEN * len(ids)
        try:
            completion = self.models.serving.engine.generate(
                ids, params, on_text=hooks.streaming(request.stream), should_stop=hooks.should_stop
            )
        except Exception as exc:
            return self.failed(job, request, exc)
        finally:
            self.quiet_until = 0.0
        if hooks.checkpoint:
            return None
        return self.completed(job, completion)

    def prepare(self, job: StoredJob) -> Outcome | tuple[JobRequest, list[int], SamplingParams]:
        """The request, prompt ids and sampling parameters of ``job``, or the outcome that ends it now."""
        request = JobRequest.model_validate_json(job.request)
        if job.deadline is not None and job.deadline <= time.time():
            return Outcome(
                self._error(job.id, "expired", "expired", "the job expired while it waited in the queue")
            )
        try:
            engine = self.models.serving.engine
            if request.messages is not None:
                ids = engine.prompt_ids(messages=[m.model_dump() for m in request.messages])
            else:
                ids = engine.prompt_ids(request.prompt)
            return request, ids, request.sampling_params()
        except InvalidRequestError as exc:
            return Outcome(self._error(job.id, "rejected", exc.code, exc.message))
        except Exception as exc:  # a template that fails to render, a tokenizer fault
            log.exception("job %s: cannot build the prompt", job.id)
            return Outcome(self._error(job.id, "failed", "internal", f"{type(exc).__name__}: {exc}"))

    def failed(self, job: StoredJob, request: JobRequest, exc: Exception) -> Outcome:
        """The outcome of a job whose generation raised ``exc``."""
        if isinstance(exc, ContextOverflowError | InvalidRequestError):
            return Outcome(self._error(job.id, "rejected", exc.code, exc.message))
        if isinstance(exc, ModelError | GenerationError):  # the engine says the model failed
            return Outcome(self._error(job.id, "failed", exc.code, exc.message), "failure")
        # the engine failing must not take the daemon down
        log.error("job %s failed", job.id, exc_info=exc)
        result = self._error(job.id, "failed", "internal", f"{type(exc).__name__}: {exc}")
        return Outcome(result, blame(exc, request))

    def completed(self, job: StoredJob, completion: Completion) -> Outcome:
        """The outcome of a job that generated ``completion``."""
        status: JobStatus = "canceled" if completion.finish_reason == "canceled" else "succeeded"
        result = Result(
            id=job.id,
            status=status,
            text=completion.text,
            finish_reason=completion.finish_reason,
            usage=Usage(
                prompt_tokens=completion.prompt_tokens,
                completion_tokens=completion.completion_tokens,
                cached_tokens=completion.cached_tokens,
                drafted_tokens=completion.drafted_tokens or None,
                accepted_tokens=completion.accepted_tokens if completion.drafted_tokens else None,
            ),
            timings=completion.timings,
            model=self.models.serving.ref,
            device_id=self.device_id,
            error=ErrorInfo(code="canceled", message="canceled while running")
            if status == "canceled"
            else None,
        )
        if completion.drafted_tokens:
            self.stats.record_speculation(completion.drafted_tokens, completion.accepted_tokens)
        return Outcome(result, "success" if status == "succeeded" else "none")

    def _error(self, job_id: str, status: JobStatus, code: JobErrorCode, message: str) -> Result:
        return error_result(
            job_id, status, code, message, model=self.models.serving.ref, device_id=self.device_id
        )

    def _run_tasks(self) -> None:
        while True:
            try:
                task, future = self._tasks.get_nowait()
            except queue.Empty:
                return
            if not future.set_running_or_notify_cancel():
                continue
            self.quiet_until = time.monotonic() + _MODEL_SWAP_ALLOWANCE_S
            try:
                task()
            except BaseException as exc:  # handed to the waiting updater, which reports it
                future.set_exception(exc)
            else:
                future.set_result(None)
            self.beat = time.monotonic()
            self.quiet_until = 0.0
