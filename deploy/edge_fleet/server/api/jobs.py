"""``/api/v1/jobs``: submit a prompt to a device or to a group's shared queue; read its result.

The server sends the job with MQTT 5 request/response (``edge_fleet.submit``) from a thread
of its own and records the result; ``?wait=true`` answers once the result is in.
"""

from __future__ import annotations

import threading
import time
import uuid
from typing import Any

from fastapi import APIRouter, HTTPException, Request

from edge_contract.protocol import ChatMessage, FleetTopics, JobRequest

from ..auth import Operator, Viewer
from ..schemas import JobIn
from ..store import Store

router = APIRouter(prefix="/api/v1", tags=["jobs"])
_submitter_lock = threading.Lock()


def _job(store: Store, job_id: str) -> dict[str, Any]:
    row = store.db.one(
        "SELECT id, target, state, result, error, actor, created, finished FROM jobs WHERE id = ?", (job_id,)
    )
    if row is None:
        raise HTTPException(404, f"no job {job_id!r}")
    import json

    keys = ("id", "target", "state", "result", "error", "actor", "created", "finished")
    found = dict(zip(keys, row, strict=True))
    found["result"] = json.loads(found["result"]) if found["result"] else None
    return found


def _run(app: Any, job_id: str, topic: str, request: JobRequest, timeout: float) -> None:
    from ...submit import JobFailed, Submitter

    store: Store = app.state.store
    try:
        with _submitter_lock:
            if getattr(app.state, "submitter", None) is None:
                app.state.submitter = Submitter(app.state.link.options)
        result = app.state.submitter.run(topic, request, timeout=timeout)
        store.db.execute(
            "UPDATE jobs SET state = ?, result = ?, finished = ? WHERE id = ?",
            (result.status, result.model_dump_json(), time.time(), job_id),
        )
    except JobFailed as exc:
        store.db.execute(
            "UPDATE jobs SET state = 'failed', error = ?, finished = ? WHERE id = ?",
            (str(exc), time.time(), job_id),
        )


def record_job(app: Any, actor: str, body: JobIn, *, stream: bool) -> tuple[str, str, JobRequest]:
    """Check ``body``, record the job as running (and audit it): its id, topic and request.

    One place for the API's jobs and the dashboard's streamed ones.
    """
    if app.state.link is None:
        raise HTTPException(503, "this server has no broker link (start it with --broker)")
    if (body.device is None) == (body.group is None):
        raise HTTPException(422, "give exactly one of device and group")
    fleet = FleetTopics(app.state.link.prefix)
    topic = fleet.device(body.device).jobs if body.device else fleet.group(str(body.group)).jobs
    job_id = f"srv-{uuid.uuid4().hex[:16]}"
    common: dict[str, Any] = {"id": job_id, "max_tokens": body.max_tokens}
    if stream:
        common["stream"] = True
    job = (
        JobRequest(prompt=body.prompt, **common)
        if body.raw
        else JobRequest(messages=[ChatMessage(role="user", content=body.prompt)], **common)
    )
    store: Store = app.state.store
    target = f"device {body.device}" if body.device else f"group {body.group}"
    detail: dict[str, Any] = {"job": job_id, "stream": True} if stream else {"job": job_id}
    with store.db.transaction():
        store.db.execute(
            "INSERT INTO jobs (id, target, state, request, actor, created) VALUES (?,?,?,?,?,?)",
            (job_id, target, "running", job.model_dump_json(), actor, time.time()),
        )
        store.audit(actor, "job.submit", target, detail)
    return job_id, topic, job


@router.post("/jobs", status_code=202)
def submit_job(request: Request, who: Operator, body: JobIn, wait: bool = False) -> dict[str, Any]:
    """Send a job; answers at once with its id (``wait=true``: with its result)."""
    app = request.app
    job_id, topic, job = record_job(app, who.name, body, stream=False)
    store: Store = app.state.store
    worker = threading.Thread(target=_run, args=(app, job_id, topic, job, body.timeout), daemon=True)
    worker.start()
    if wait:
        worker.join(body.timeout + 15)
    return _job(store, job_id)


@router.get("/jobs/{job_id}")
def get_job(request: Request, _who: Viewer, job_id: str) -> dict[str, Any]:
    """A job: state (running, succeeded, failed, …), result, error."""
    return _job(request.app.state.store, job_id)
