"""``/api/v1/deployments`` and ``/api/v1/reconcile``: desired state set at once, and published again."""

from __future__ import annotations

import json

from fastapi import APIRouter, HTTPException, Request

from ...errors import FleetError
from ..auth import Operator
from ..schemas import DeployIn
from ..service import Conflict, Deployments

router = APIRouter(prefix="/api/v1", tags=["deployments"])


@router.post("/deployments", status_code=201)
def deploy(request: Request, who: Operator, body: DeployIn) -> dict[str, object]:
    """Record, then publish (retained), a release (or nothing) as a device's or a group's desired state."""
    if (body.device is None) == (body.group is None):
        raise HTTPException(422, "give exactly one of device and group")
    kind, target = ("device", body.device) if body.device else ("group", body.group)
    assert target is not None
    payload = None if body.manifest is None else json.dumps(body.manifest).encode()
    try:
        return Deployments(request.app.state.service).deploy(kind, target, payload, body.override, who.name)
    except FleetError as exc:
        raise HTTPException(409 if isinstance(exc, Conflict) else 422, str(exc)) from None


@router.post("/reconcile")
def reconcile(request: Request, who: Operator) -> dict[str, int]:
    """Publish every recorded desired state again (after the broker lost its retained messages)."""
    try:
        return Deployments(request.app.state.service).reconcile(who.name)
    except FleetError as exc:
        raise HTTPException(422, str(exc)) from None
