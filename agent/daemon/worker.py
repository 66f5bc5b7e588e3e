"""The worker: claims queued jobs and runs them through one scheduler, alone or several together.

Owned by the ``edge-agent-worker`` thread, which also runs the updater's
between-job tasks (a model swap happens only while no job runs, so a job always
ends on the model it started on).  Every job runs through the engine's scheduler
(``daemon.running``): one slot when ``[engine] max_batch = 1``, more otherwise;
there is no other path.  Other threads talk to the worker through one command
queue (a job was queued, cancel a job, forget a cancel, run a task between jobs,
stop); the worker reads it between scheduler steps and between a job's tokens
and prefill chunks.  Its heartbeat out is ``beat`` (and ``quiet_until`` during a
long prefill or a model swap), read by the supervisor's watchdog.

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
from dataclasses import dataclass

from agent.daemon.faults import StorageFaults, storage_backoff
from agent.daemon.outcome import Models, Outcome
from agent.daemon.replies import Sender
from agent.daemon.results import error_result, log_job
from agent.daemon.running import RunningJobs
from agent.health.telemetry import JobStats
from agent.jobs.store import JobStore, StoredJob
from edge_contract.protocol import JobErrorCode, JobStatus, Result

log = logging.getLogger(__name__)

# Swapping models (unload, load, smoke test) gives no sign of life either;
# loading a 2 GB int4 model from an SD card takes tens of seconds on a Pi.
_MODEL_SWAP_ALLOWANCE_S = 180.0


@dataclass(frozen=True)
class _Command:
    """One message to the worker thread: ``wake``, ``cancel``/``forget`` (a job id), ``task``, ``stop``."""

    kind: str
    job_id: str = ""
    task: tuple[Callable[[], None], Future[None]] | None = None
    deadline: float = 0.0


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
        self._commands: queue.SimpleQueue[_Command] = queue.SimpleQueue()
        # The worker thread's own state, changed only by the commands it reads:
        self._stopping = False
        self._deadline: float | None = None  # monotonic time past which running jobs are checkpointed
        self._cancel: set[str] = set()
        self._tasks: list[tuple[Callable[[], None], Future[None]]] = []
        self._jobs = RunningJobs(self)
        self._running_lock = threading.Lock()  # ``running`` is read by other threads
        self._running: str | None = None
        self._unfinished: list[tuple[StoredJob, Outcome]] = []  # results the store did not take yet
        self._recovered = False
        self._backoff = storage_backoff()
        self.beat = time.monotonic()  # last sign of life
        self.quiet_until = 0.0  # may be silent until then (a long prefill, a model swap)

    # -- control (any thread): commands --------------------------------------------------------

    def start(self) -> None:
        """Start the thread."""
        self._thread.start()
        self.wake()

    def wake(self) -> None:
        """A job was queued (or something else changed): look at the queue now."""
        self._commands.put(_Command("wake"))

    def stop(self, grace_s: float) -> None:
        """Start no new job; checkpoint the running ones if they are not done within ``grace_s``."""
        self._commands.put(_Command("stop", deadline=time.monotonic() + grace_s))

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
        """The ids of the jobs running now (comma-separated), or None."""
        with self._running_lock:
            return self._running

    def between_jobs(self, task: Callable[[], None]) -> Future[None]:
        """Have the worker run ``task`` once no job runs, before it starts another (the model swaps this way)."""
        future: Future[None] = Future()
        self._commands.put(_Command("task", task=(task, future)))
        return future

    def cancel(self, job_id: str) -> bool:
        """Cancel a queued or running job (intake thread). False when it is neither.

        Raises ``sqlite3.Error`` when the store fails (the intake retries the request).
        """
        job = self.store.get(job_id)
        if job is None or job.state == "done":
            return False
        # First the command: should the worker claim the job before the store below finishes it,
        # the job is canceled at its first token.
        self._commands.put(_Command("cancel", job_id))
        if job.state == "queued":
            result = self._error(job.id, "canceled", "canceled", "canceled before it started")
            if self.store.finish(job.id, result.model_dump_json(exclude_none=True), only_queued=True):
                self._commands.put(_Command("forget", job_id))  # it never reaches the worker
                self._published(job, Outcome(result))
        return True

    def _read_commands(self, wait_s: float = 0.0) -> None:
        """Apply the commands queued so far (worker thread); wait up to ``wait_s`` for the first."""
        try:
            command = self._commands.get(timeout=wait_s) if wait_s > 0 else self._commands.get_nowait()
        except queue.Empty:
            return
        while True:
            if command.kind == "cancel":
                self._cancel.add(command.job_id)
            elif command.kind == "forget":
                self._cancel.discard(command.job_id)
            elif command.kind == "task" and command.task is not None:
                self._tasks.append(command.task)
            elif command.kind == "stop":
                self._stopping, self._deadline = True, command.deadline
            try:
                command = self._commands.get_nowait()
            except queue.Empty:
                return

    # -- for the running jobs' hooks (worker thread) ---------------------------------------------

    def publish_chunk(self, topic: str, payload: bytes, correlation: bytes | None) -> object:
        """Publish one streamed chunk of a running job."""
        return self._publish_chunk(topic, payload, correlation)

    def stop_reason(self, job_id: str) -> str | None:
        """Why the running ``job_id`` must stop now: ``"checkpoint"``, ``"cancel"`` or None (a sign of life)."""
        self.beat = time.monotonic()
        self._read_commands()
        if self._deadline is not None and time.monotonic() > self._deadline:
            return "checkpoint"
        return "cancel" if job_id in self._cancel else None

    def ended(self, job_id: str) -> None:
        """``job_id`` left the scheduler: a cancel asked for it is moot."""
        self._cancel.discard(job_id)

    # -- the thread ------------------------------------------------------------------------------

    def _loop(self) -> None:
        while True:
            self._read_commands(wait_s=1.0)
            self.beat = time.monotonic()
            while not self._stopping:
                try:
                    if not self.step():
                        break
                except Exception:  # a bug must not end the worker: log it, pause, go on
                    log.exception("unexpected error in the worker")
                    self._read_commands(wait_s=1.0)
                self.beat = time.monotonic()
            if self._stopping:
                self._drain()  # running jobs end (or are checkpointed at the deadline)
                return

    def step(self) -> bool:
        """Tasks, pending bookkeeping, then claim a job and run the scheduler until no job runs.

        Jobs queued meanwhile join while the scheduler has a free slot. False: nothing to do until woken.
        """
        self._read_commands()
        self._run_tasks()
        doing = "recovering interrupted jobs"
        try:
            if not self._recovered:
                self._recover()
            while self._unfinished:
                doing = "storing a finished job's result"
                self._finish_now(*self._unfinished[0])
                self._unfinished.pop(0)
            if self._hold() or self._stopping:
                self.models.serving.engine.release_kept()  # overloaded (low memory): hold no spare KV
                return False  # jobs wait in the queue until the box recovers (or the next start)
            doing = "claiming a job"
            job = self.claim()
        except sqlite3.Error as exc:
            self._pause(doing, exc)
            return True
        self._backoff.reset()
        if job is None:
            return False
        self._ended([(job, self._jobs.admit(job))])
        self._drain()
        return True

    def _drain(self) -> None:
        """Step the scheduler until no job runs, admitting queued jobs while there is room."""
        jobs = self._jobs
        while not jobs.idle:
            self._read_commands()
            while jobs.room and not jobs.idle and self._may_claim_more():
                try:
                    job = self.claim()
                except sqlite3.Error as exc:
                    self.faults.failed("claiming a job", exc)
                    break
                if job is None:
                    break
                self._ended([(job, jobs.admit(job))])
            self._set_running(jobs.ids)
            self._ended(jobs.step())
        self._set_running([])

    def _ended(self, ended: list[tuple[StoredJob, Outcome | None]]) -> None:
        """Finish the jobs that ended, requeue those checkpointed (a job admitted runs: no outcome yet)."""
        for job, outcome in ended:
            if outcome is not None:
                self.finish(job, outcome)
            elif job.id not in self._jobs.ids:
                self.requeue(job)

    def _may_claim_more(self) -> bool:
        return not self._stopping and not self._tasks and not self._hold()

    def _set_running(self, job_ids: list[str]) -> None:
        with self._running_lock:
            self._running = ", ".join(job_ids) or None

    def _pause(self, what: str, exc: sqlite3.Error) -> None:
        """Storage failed: count it, wait a little (alive: the watchdog keeps being fed)."""
        self.faults.failed(what, exc)
        self._read_commands(wait_s=self._backoff.next_delay())
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
        """Run ``job`` (claimed) through the scheduler by itself; its outcome, None when checkpointed.

        The outcome is returned, not stored: the caller finishes (or requeues) the job.
        """
        outcome = self._jobs.admit(job)
        try:
            while not self._jobs.idle:
                self._read_commands()
                self._set_running(self._jobs.ids)
                ended = self._jobs.step()
                if ended:
                    outcome = ended[0][1]
        finally:
            self._set_running([])
        return outcome

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

    def _error(self, job_id: str, status: JobStatus, code: JobErrorCode, message: str) -> Result:
        return error_result(
            job_id, status, code, message, model=self.models.serving.ref, device_id=self.device_id
        )

    def _run_tasks(self) -> None:
        while self._tasks:
            task, future = self._tasks.pop(0)
            if not future.set_running_or_notify_cancel():
                continue
            self.models.serving.engine.release_kept()  # a model swap: the old model's kept KV goes first
            self.quiet_until = time.monotonic() + _MODEL_SWAP_ALLOWANCE_S
            try:
                task()
            except BaseException as exc:  # handed to the waiting updater, which reports it
                future.set_exception(exc)
            else:
                future.set_result(None)
            self.beat = time.monotonic()
            self.quiet_until = 0.0
