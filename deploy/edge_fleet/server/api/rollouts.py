"""``/api/v1/rollouts``: create, list, get, abort, resume, roll back; ``…/events`` for progress.

Rollout ids contain slashes (``NAME@VERSION/GROUP``, ``NAME@VERSION/select:TERMS``), so the
action routes end in ``/abort``, ``/resume``, ``/rollback`` and ``/events`` after the id.
"""

from __future__ import annotations

import json
from typing import Any

from fastapi import APIRouter, HTTPException, Request, Response

from ...domain.evaluate import FAILED
from ...errors import FleetError
from ..auth import Operator, Viewer
from ..rollouts_table import Rollout
from ..schemas import RollbackIn, RolloutIn, RolloutOut
from ..service import Conflict, FleetService, NotFound, RolloutRequest

router = APIRouter(prefix="/api/v1", tags=["rollouts"])


def _service(request: Request) -> FleetService:
    service: FleetService = request.app.state.service
    return service


def _errors(exc: FleetError) -> HTTPException:
    code = 404 if isinstance(exc, NotFound) else 409 if isinstance(exc, Conflict) else 422
    return HTTPException(code, str(exc))


def rollout_out(service: FleetService, rollout: Rollout) -> RolloutOut:
    """A rollout with its targets summed up."""
    targets = service.rollouts.targets(rollout.id)
    befores: dict[str, int] = {}
    for t in targets.values():
        if t.state != "pending" and t.before:
            befores[t.before] = befores.get(t.before, 0) + 1
    return RolloutOut(
        id=rollout.id, state=rollout.state, release=rollout.release, selector=rollout.selector,
        group=rollout.group, wave=min(rollout.wave + 1, rollout.wave_count), waves=rollout.wave_count,
        canary=bool(rollout.canary), reason=rollout.reason, targets=service.rollouts.counts(rollout.id),
        waiting_for=sorted(d for d, t in targets.items() if t.state in ("sent", "deferred")),
        failures={d: f"{t.state}: {t.detail}" for d, t in sorted(targets.items()) if t.state in FAILED},
        befores=befores, rollback_of=rollout.rollback_of, created=rollout.created,
        created_by=rollout.created_by, leader=rollout.leader,
    )  # fmt: skip


@router.post("/rollouts", response_model=RolloutOut, status_code=201)
def create_rollout(request: Request, who: Operator, body: RolloutIn, response: Response) -> RolloutOut:
    """Start a rollout (the server drives it); the same manifest and target again returns the existing one (200)."""
    service = _service(request)
    try:
        rollout, new = service.create_rollout(
            RolloutRequest(
                manifest=json.dumps(body.manifest).encode(),
                group=body.group,
                select=body.select,
                waves=body.waves,
                canary=body.canary,
                wave_timeout=body.wave_timeout,
                max_failure_rate=body.max_failure_rate,
                max_parallel=body.max_parallel,
                min_devices=body.min_devices,
                resume_on_recovery=body.resume_on_recovery,
                defer_offline=body.defer_offline,
            ),
            who.name,
        )
    except FleetError as exc:
        raise _errors(exc) from None
    if not new:
        response.status_code = 200
    return rollout_out(service, rollout)


@router.get("/rollouts", response_model=list[RolloutOut])
def list_rollouts(request: Request, _who: Viewer) -> list[RolloutOut]:
    """Every rollout, newest first."""
    service = _service(request)
    return [rollout_out(service, r) for r in service.rollouts.all()]


@router.get("/rollouts/{rollout_id:path}/events")
def rollout_events(request: Request, _who: Viewer, rollout_id: str, after: int = 0) -> dict[str, Any]:
    """Lines of progress after ``after`` (seq), with the rollout's state (what ``--follow`` prints)."""
    service = _service(request)
    try:
        rollout = service.rollout(rollout_id)
    except FleetError as exc:
        raise _errors(exc) from None
    return {
        "state": rollout.state,
        "reason": rollout.reason,
        "events": service.rollouts.events(rollout_id, after),
    }


@router.post("/rollouts/{rollout_id:path}/abort", response_model=RolloutOut)
def abort_rollout(request: Request, who: Operator, rollout_id: str) -> RolloutOut:
    """Stop a rollout for good; devices that had not finished get their desired state withdrawn."""
    service = _service(request)
    try:
        service.abort(rollout_id, who.name)
        return rollout_out(service, service.rollout(rollout_id))
    except FleetError as exc:
        raise _errors(exc) from None


@router.post("/rollouts/{rollout_id:path}/resume", response_model=RolloutOut)
def resume_rollout(request: Request, who: Operator, rollout_id: str) -> RolloutOut:
    """Continue a halted rollout (the failures of its current wave are accepted)."""
    service = _service(request)
    try:
        return rollout_out(service, service.resume(rollout_id, who.name))
    except FleetError as exc:
        raise _errors(exc) from None


@router.post("/rollouts/{rollout_id:path}/rollback", response_model=RolloutOut, status_code=201)
def rollback_rollout(
    request: Request, who: Operator, rollout_id: str, body: RollbackIn, response: Response
) -> RolloutOut:
    """Return the devices the rollout touched to what each ran before (id: ``ID/rollback``)."""
    service = _service(request)
    try:
        rollout, new = service.rollback(
            rollout_id, [json.dumps(m).encode() for m in body.manifests], body.waves, who.name
        )
    except (FleetError, ValueError) as exc:
        raise _errors(exc if isinstance(exc, FleetError) else FleetError(str(exc))) from None
    if not new:
        response.status_code = 200
    return rollout_out(service, rollout)


@router.get("/releases/{release_id}")
def release_manifest(request: Request, _who: Viewer, release_id: str) -> dict[str, Any]:
    """The kept manifest of ``NAME@VERSION`` (to sign a rollback to it)."""
    payload = _service(request).store.release_manifest(release_id)
    if payload is None:
        raise HTTPException(404, f"the server keeps no manifest of {release_id}")
    found: dict[str, Any] = json.loads(payload)
    return found


@router.get("/rollouts/{rollout_id:path}", response_model=RolloutOut)
def get_rollout(request: Request, _who: Viewer, rollout_id: str) -> RolloutOut:
    """One rollout."""
    service = _service(request)
    try:
        return rollout_out(service, service.rollout(rollout_id))
    except FleetError as exc:
        raise _errors(exc) from None
