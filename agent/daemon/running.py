"""The jobs the worker runs now: one scheduler (``agent.engine.batch.Batcher``) of ``max_batch`` slots.

Every job runs here, alone or beside others: ``max_batch = 1`` is a scheduler
of one slot sized to the job (what ``Engine.generate`` runs), more slots let
jobs claimed while others run join them.  A scheduler lives while it has jobs
and is dropped when the last one ends, so a model swap (which waits for the
worker to be idle) never pulls the model from under a job.

Each job keeps what it had run alone: its own chunks (``JobHooks.on_text``),
cancel and shutdown checkpoint (``JobHooks.should_stop``, polled between its
tokens and prefill chunks), expiry at claim, one stored result or a requeue,
and its count towards the model's probation.  A sampler fault ends its own job
only; a model fault ends every job in the pass.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

from agent.daemon.hooks import PREFILL_ALLOWANCE_S_PER_TOKEN, JobHooks
from agent.daemon.outcome import Models, Outcome, blame
from agent.daemon.results import error_result
from agent.health.telemetry import JobStats
from edge_contract.errors import (
    AgentError,
    ContextOverflowError,
    GenerationError,
    InvalidRequestError,
    ModelError,
)
from edge_contract.protocol import ErrorInfo, JobErrorCode, JobRequest, JobStatus, Result, Usage

if TYPE_CHECKING:
    from agent.engine.batch import Batcher
    from agent.engine.batch_job import BatchJob
    from agent.engine.engine import Completion
    from agent.jobs.store import StoredJob

log = logging.getLogger(__name__)

# With more than one slot a slot holds this many positions at most: a longer job runs alone once
# the batch drains. With one slot, the slot is sized to the job.
_SLOT_TOKENS = 4096
# The batch's key/value block may take this share of the memory available when it starts.
_MEMORY_SHARE = 0.5


class JobHost(Protocol):
    """What the running jobs need from the worker: where outcomes go, signs of life, the job's controls."""

    models: Models
    stats: JobStats
    device_id: str
    beat: float
    quiet_until: float

    def ended(self, job_id: str) -> None: ...
    def publish_chunk(self, topic: str, payload: bytes, correlation: bytes | None) -> object: ...
    def stop_reason(self, job_id: str) -> str | None: ...


@dataclass
class _Running:
    job: StoredJob
    request: JobRequest
    hooks: JobHooks
    handle: BatchJob


class RunningJobs:
    """The scheduler and the jobs in it; owned by the worker thread."""

    def __init__(self, host: JobHost) -> None:
        self._host = host
        self._batcher: Batcher | None = None
        self._jobs: dict[str, _Running] = {}

    @property
    def ids(self) -> list[str]:
        """The jobs running now, oldest first."""
        return list(self._jobs)

    @property
    def idle(self) -> bool:
        """No job runs."""
        return not self._jobs

    @property
    def room(self) -> bool:
        """Whether another job may join now (always when idle)."""
        batcher = self._batcher
        return batcher is None or batcher.active + batcher.queued < batcher.max_batch

    def admit(self, job: StoredJob) -> Outcome | None:
        """Start ``job`` (claimed): it joins the scheduler (None), or ends now (expired, rejected): its outcome."""
        host = self._host
        try:
            request = JobRequest.model_validate_json(job.request)
        except ValueError as exc:  # stored by this agent after validation: only a damaged row gets here
            return Outcome(self._error(job.id, "failed", "internal", f"stored request: {exc}"))
        if job.deadline is not None and job.deadline <= time.time():
            message = "the job expired while it waited in the queue"
            return Outcome(self._error(job.id, "expired", "expired", message))
        hooks = JobHooks(host, job)
        engine = host.models.serving.engine
        try:
            if request.messages is not None:
                ids = engine.prompt_ids(messages=[m.model_dump() for m in request.messages])
            else:
                ids = engine.prompt_ids(request.prompt)
        except InvalidRequestError as exc:
            return Outcome(self._error(job.id, "rejected", exc.code, exc.message))
        except Exception as exc:  # a template that fails to render, a tokenizer fault
            log.exception("job %s: cannot build the prompt", job.id)
            return Outcome(self._error(job.id, "failed", "internal", f"{type(exc).__name__}: {exc}"))
        try:
            seq = engine.sequence(
                ids,
                request.sampling_params(),
                on_text=hooks.streaming(request.stream),
                should_stop=hooks.should_stop,
            )
            batcher = self._batcher or self._open(seq.capacity)
            handle = batcher.submit_sequence(
                seq, on_text=hooks.streaming(request.stream), should_stop=hooks.should_stop
            )
        except Exception as exc:  # a prompt too long or with unknown ids; the slot's memory
            return self.failed(job, request, exc)
        self._batcher = batcher
        # A prefill gives no sign of life until its chunk ends (see the hooks' allowance).
        host.quiet_until = max(host.quiet_until, time.monotonic() + PREFILL_ALLOWANCE_S_PER_TOKEN * len(ids))
        self._jobs[job.id] = _Running(job, request, hooks, handle)
        return None

    def step(self) -> list[tuple[StoredJob, Outcome | None]]:
        """One scheduler step; the jobs that ended and their outcomes (None: checkpointed, requeue it)."""
        batcher, host = self._batcher, self._host
        if batcher is None:
            return []
        ended: list[tuple[StoredJob, Outcome | None]] = []
        try:
            finished = batcher.step()
        except Exception as exc:  # the model failed: every job in the pass fails with it
            for entry in list(self._jobs.values()):
                self._jobs.pop(entry.job.id)
                host.ended(entry.job.id)
                ended.append((entry.job, self.failed(entry.job, entry.request, exc)))
            self._close(keep=False)
            return ended
        host.beat = time.monotonic()
        for handle in finished:
            entry = next(e for e in self._jobs.values() if e.handle is handle)
            ended.append((entry.job, self._end(self._jobs.pop(entry.job.id), handle)))
        if not self._jobs:
            self._close()
        return ended

    def _open(self, capacity: int) -> Batcher:
        import psutil

        from agent.engine.batch import Batcher

        engine = self._host.models.serving.engine
        speculate = engine.options.speculate
        if engine.options.max_batch > 1:
            engine.release_kept()  # measure the memory free without the last one-slot run's buffer
            budget = int(psutil.virtual_memory().available * _MEMORY_SHARE)
            try:
                return Batcher(engine, slot_tokens=_SLOT_TOKENS, budget_bytes=budget, speculate=speculate)
            except AgentError as exc:
                log.warning("batching off for now (%s): one slot", exc.message)
        return Batcher(engine, max_batch=1, slot_tokens=capacity, speculate=speculate)

    def _close(self, *, keep: bool = True) -> None:
        batcher, self._batcher = self._batcher, None
        self._host.quiet_until = 0.0
        if batcher is not None:
            batcher.close(keep=keep)  # one slot: the engine keeps its buffer for the next job
        if batcher is not None and batcher.max_batch > 1:
            self._host.stats.record_batch(batcher.rows, batcher.passes, batcher.max_batch)

    def _end(self, entry: _Running, handle: BatchJob) -> Outcome | None:
        self._host.ended(entry.job.id)
        if entry.hooks.checkpoint:
            return None
        if handle.error is not None:
            return self.failed(entry.job, entry.request, handle.error)
        assert handle.completion is not None  # a job that is done has one or the other
        return self.completed(entry.job, handle.completion)

    # -- outcomes ------------------------------------------------------------------------------------

    def failed(self, job: StoredJob, request: JobRequest, exc: BaseException) -> Outcome:
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
        host = self._host
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
            model=host.models.serving.ref,
            device_id=host.device_id,
            error=ErrorInfo(code="canceled", message="canceled while running")
            if status == "canceled"
            else None,
        )
        if completion.drafted_tokens:
            host.stats.record_speculation(completion.drafted_tokens, completion.accepted_tokens)
        return Outcome(result, "success" if status == "succeeded" else "none")

    def _error(self, job_id: str, status: JobStatus, code: JobErrorCode, message: str) -> Result:
        host = self._host
        return error_result(
            job_id, status, code, message, model=host.models.serving.ref, device_id=host.device_id
        )
