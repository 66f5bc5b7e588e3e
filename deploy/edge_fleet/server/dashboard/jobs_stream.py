"""``POST /api/v1/jobs/stream``: send a job and stream its answer back as server-sent events.

Events: ``job`` (its id, at once), ``chunk`` (a piece of text, as the box streams it),
then one ``result`` (the box's result) or ``error`` (no result: why).  The job is recorded
in the jobs table and the audit log like one of ``POST /api/v1/jobs``.
"""

from __future__ import annotations

import json
import queue
import threading
import time
from collections.abc import Iterator
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import StreamingResponse

from ..api.jobs import record_job
from ..auth import Operator
from ..schemas import JobIn
from ..store import Store

router = APIRouter(prefix="/api/v1", tags=["jobs"])
_lock = threading.Lock()


def _submitter(app: Any) -> Any:
    from ...submit import Submitter

    with _lock:
        if getattr(app.state, "stream_submitter", None) is None:
            app.state.stream_submitter = Submitter(app.state.link.options)
        return app.state.stream_submitter


def _event(kind: str, data: dict[str, Any]) -> str:
    return f"event: {kind}\ndata: {json.dumps(data)}\n\n"


@router.post("/jobs/stream", response_class=StreamingResponse)
def stream_job(request: Request, who: Operator, body: JobIn) -> StreamingResponse:
    """Send a job to a device or a group's queue; the answer streams back (``text/event-stream``)."""
    from ...submit import JobFailed

    app = request.app
    job_id, topic, job = record_job(app, who.name, body, stream=True)
    store: Store = app.state.store
    target = f"device {body.device}" if body.device else f"group {body.group}"
    replies: queue.Queue[tuple[str, dict[str, Any]]] = queue.Queue()

    def work() -> None:
        try:
            result = _submitter(app).run(
                topic, job, timeout=body.timeout,
                on_chunk=lambda c: replies.put(("chunk", {"seq": c.seq, "text": c.text})),
            )  # fmt: skip
            store.db.execute(
                "UPDATE jobs SET state = ?, result = ?, finished = ? WHERE id = ?",
                (result.status, result.model_dump_json(), time.time(), job_id),
            )
            replies.put(("result", json.loads(result.model_dump_json())))
        except JobFailed as exc:
            store.db.execute(
                "UPDATE jobs SET state = 'failed', error = ?, finished = ? WHERE id = ?",
                (str(exc), time.time(), job_id),
            )
            replies.put(("error", {"message": str(exc)}))
        except Exception as exc:  # the stream must end with a word, never hang
            replies.put(("error", {"message": f"the server failed sending the job: {exc}"}))
            raise

    threading.Thread(target=work, name=f"job-{job_id}", daemon=True).start()

    def events() -> Iterator[str]:
        yield _event("job", {"id": job_id, "target": target})
        while True:
            try:
                kind, data = replies.get(timeout=body.timeout + 15)
            except queue.Empty:
                yield _event("error", {"message": f"no result within {body.timeout + 15:.0f} s"})
                return
            yield _event(kind, data)
            if kind != "chunk":
                return

    return StreamingResponse(
        events(),
        media_type="text/event-stream",
        headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no"},
    )
