"""``/api/v1/audit``: the append-only log of every change (admins), and assignment history."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, HTTPException, Request

from ...domain import selector as sel
from ...errors import FleetError
from ..auth import Admin, Viewer
from ..store import Store

router = APIRouter(prefix="/api/v1", tags=["audit"])


@router.get("/audit")
def audit_log(request: Request, _who: Admin, after: int = 0, limit: int = 1000) -> list[dict[str, Any]]:
    """Changes after ``after`` (seq), oldest first: seq, at, actor, action, target, detail."""
    store: Store = request.app.state.store
    return [e.as_json() for e in store.audit_log(after=after, limit=min(limit, 10_000))]


@router.get("/history/{target}")
def history(request: Request, _who: Viewer, target: str) -> list[dict[str, Any]]:
    """Every desired-state assignment of a device (and of its group), of a group, or of the devices a
    selector matches (``region=north``), oldest first."""
    store: Store = request.app.state.store
    if "=" in target or "!" in target:
        try:
            devices = request.app.state.service.matching(sel.parse(target))
        except FleetError as exc:
            raise HTTPException(422, str(exc)) from None
        rows = store.history(target, devices)
    else:
        rows = store.history(target)
    if not rows:
        raise HTTPException(404, f"no assignment of {target!r} is recorded")
    return rows
