"""The worker with ``[engine] max_batch`` > 1: up to that many jobs decode together.

``BatchRunner.drain`` starts from one claimed job, keeps claiming queued jobs
while the batch has free slots (never while the box is held, the agent stops,
or a model swap waits), and steps the :class:`~agent.engine.batch.Batcher`
until every job it took is finished.  Each job keeps what it has when it runs
alone: its own chunks (``JobHooks.on_text``), cancel and shutdown checkpoint
(``JobHooks.should_stop``, polled between its tokens), expiry at claim, one
stored result (``Worker.finish``) or a requeue, and its count towards the
model's probation.  A model swap waits until the batch has drained, so a job
always ends on the model it started on.
"""

from __future__ import annotations

import logging
import sqlite3
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

from agent.daemon.hooks import PREFILL_ALLOWANCE_S_PER_TOKEN, JobHooks
from agent.daemon.outcome import Models, Outcome
from agent.health.telemetry import JobStats
from edge_contract.errors import AgentError
from edge_contract.protocol import JobRequest

if TYPE_CHECKING:
    from agent.daemon.faults import StorageFaults
    from agent.engine.batch import Batcher, BatchJob
    from agent.engine.engine import Completion
    from agent.engine.sampling import SamplingParams
    from agent.jobs.store import StoredJob

log = logging.getLogger(__name__)

# A slot holds this many positions at most: a longer job runs alone once the batch drains.
_SLOT_TOKENS = 4096
# The batch's key/value block may take this share of the memory available when it starts.
_MEMORY_SHARE = 0.5


class BatchHost(Protocol):
    """What the batch runner needs from the worker (its public interface)."""

    models: Models
    stats: JobStats
    faults: StorageFaults
    beat: float
    quiet_until: float

    def claim(self) -> StoredJob | None: ...
    def run_alone(self, job: StoredJob) -> None: ...
    def prepare(self, job: StoredJob) -> Outcome | tuple[JobRequest, list[int], SamplingParams]: ...
    def finish(self, job: StoredJob, outcome: Outcome) -> None: ...
    def requeue(self, job: StoredJob) -> None: ...
    def failed(self, job: StoredJob, request: JobRequest, exc: Exception) -> Outcome: ...
    def completed(self, job: StoredJob, completion: Completion) -> Outcome: ...
    def may_claim_more(self) -> bool: ...
    def set_running(self, job_ids: list[str]) -> None: ...
    def forget_cancel(self, job_id: str) -> None: ...
    def publish_chunk(self, topic: str, payload: bytes, correlation: bytes | None) -> object: ...
    def stop_reason(self, job_id: str) -> str | None: ...


@dataclass
class _Running:
    job: StoredJob
    request: JobRequest
    hooks: JobHooks
    handle: BatchJob


class BatchRunner:
    """Runs jobs together on the served engine; one per drain, owned by the worker thread."""

    def __init__(self, worker: BatchHost) -> None:
        self._worker = worker

    def drain(self, first: StoredJob) -> None:
        """Run ``first`` and every job claimed while it runs, until all of them are done."""
        import psutil

        from agent.engine.batch import Batcher

        worker = self._worker
        engine = worker.models.serving.engine
        try:
            batcher = Batcher(
                engine,
                slot_tokens=_SLOT_TOKENS,
                budget_bytes=int(psutil.virtual_memory().available * _MEMORY_SHARE),
            )
        except AgentError as exc:
            log.warning("batching off for now (%s): job %s runs alone", exc.message, first.id)
            worker.run_alone(first)
            return
        running: dict[str, _Running] = {}
        self._start(batcher, first, running)
        try:
            while running:
                self._claim_more(batcher, running)
                worker.set_running(list(running))
                try:
                    finished = batcher.step()
                except Exception as exc:  # the model failed: every job in the pass fails with it
                    for entry in list(running.values()):
                        running.pop(entry.job.id)
                        worker.finish(entry.job, worker.failed(entry.job, entry.request, exc))
                    return
                worker.beat = time.monotonic()
                for handle in finished:
                    entry = next(e for e in running.values() if e.handle is handle)
                    self._end(running.pop(entry.job.id), handle)
        finally:
            worker.quiet_until = 0.0
            worker.set_running([])
            worker.stats.record_batch(batcher.rows, batcher.passes, batcher.max_batch)

    def _claim_more(self, batcher: Batcher, running: dict[str, _Running]) -> None:
        worker = self._worker
        while batcher.active + batcher.queued < batcher.max_batch and worker.may_claim_more():
            try:
                job = worker.claim()
            except sqlite3.Error as exc:
                worker.faults.failed("claiming a job", exc)
                return
            if job is None:
                return
            self._start(batcher, job, running)

    def _start(self, batcher: Batcher, job: StoredJob, running: dict[str, _Running]) -> None:
        worker = self._worker
        prepared = worker.prepare(job)
        if isinstance(prepared, Outcome):
            worker.finish(job, prepared)
            return
        request, ids, params = prepared
        hooks = JobHooks(worker, job)
        try:
            handle = batcher.submit(
                ids, params, on_text=hooks.streaming(request.stream), should_stop=hooks.should_stop
            )
        except Exception as exc:
            worker.finish(job, worker.failed(job, request, exc))
            return
        # A prefill gives no sign of life until it ends (see the worker's allowance).
        allowance = time.monotonic() + PREFILL_ALLOWANCE_S_PER_TOKEN * len(ids)
        worker.quiet_until = max(worker.quiet_until, allowance)
        running[job.id] = _Running(job, request, hooks, handle)

    def _end(self, entry: _Running, handle: BatchJob) -> None:
        worker = self._worker
        worker.forget_cancel(entry.job.id)
        if entry.hooks.checkpoint:
            worker.requeue(entry.job)
        elif handle.error is not None:
            worker.finish(entry.job, worker.failed(entry.job, entry.request, handle.error))
        elif handle.completion is not None:
            worker.finish(entry.job, worker.completed(entry.job, handle.completion))
