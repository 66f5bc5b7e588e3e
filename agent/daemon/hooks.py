"""What a running job hands the engine: its streaming and its stop test, and how long a prefill may be silent.

Shared by the worker (a job run alone) and the batch runner (jobs run
together), neither of which imports the other for it.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Protocol

from agent.jobs.store import StoredJob
from edge_contract.errors import LinkError
from edge_contract.protocol import Chunk

log = logging.getLogger(__name__)

# A prefill pass gives no sign of life until it ends; on a Pi a long prompt can
# take minutes (Phi-3-mini prefills at roughly 10-40 tok/s there), so the
# watchdog allows this much silence per prompt token before it stops pinging.
PREFILL_ALLOWANCE_S_PER_TOKEN = 0.2


class JobControls(Protocol):
    """What the hooks need from whoever runs jobs (the worker)."""

    def publish_chunk(self, topic: str, payload: bytes, correlation: bytes | None) -> object:
        """Publish one streamed chunk (raises ``LinkError`` when the link fails)."""

    def stop_reason(self, job_id: str) -> str | None:
        """``"checkpoint"`` (shutdown), ``"cancel"``, or None to go on; also a sign of life."""


class JobHooks:
    """One running job's streaming and stop test, handed to the engine."""

    def __init__(self, controls: JobControls, job: StoredJob) -> None:
        self._controls = controls
        self._job = job
        self.seq = 0
        self.checkpoint = False  # stopped for shutdown: requeue, do not finish

    def on_text(self, text: str) -> None:
        """Publish one chunk of the job's text."""
        job = self._job
        chunk = Chunk(id=job.id, seq=self.seq, text=text)
        try:
            self._controls.publish_chunk(job.reply_topic, chunk.model_dump_json().encode(), job.correlation)
        except LinkError as exc:  # the stream has a gap; the result still carries the whole text
            log.warning("job %s: chunk %d not published: %s", job.id, self.seq, exc)
        self.seq += 1

    def should_stop(self) -> bool:
        """True when the job was canceled or the agent must stop now (a checkpoint)."""
        reason = self._controls.stop_reason(self._job.id)
        if reason == "checkpoint":
            self.checkpoint = True
        return reason is not None

    def streaming(self, stream: bool) -> Callable[[str], None] | None:
        """``on_text`` when the request asked for a stream, else None."""
        return self.on_text if stream else None
