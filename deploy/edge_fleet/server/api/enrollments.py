"""``/api/v1/enrollments``: boxes waiting for an operator's approval (claims made with
``--approve manual``, ``docs/identity.md``), approved or rejected here as with ``edge-fleet approve``.

Only a server started beside the fleet CA (``edge-fleet server --enroll-ca DIR``) has the queue:
signing needs the CA key.  Every decision is in the audit log.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fastapi import APIRouter, HTTPException, Request
from pydantic import BaseModel, ConfigDict, Field

from ... import approval
from ...broker import BrokerOptions
from ...errors import FleetError
from ..auth import Operator, Viewer
from ..store import Store

router = APIRouter(prefix="/api/v1", tags=["enrollments"])


@dataclass(frozen=True)
class EnrollmentDesk:
    """What the API needs to decide: the CA folder, the operators' listener and the devices' (admin)."""

    ca_dir: Path
    options: BrokerOptions
    admin: BrokerOptions


class PendingOut(BaseModel):
    """One box waiting: its name, its claim, its key's fingerprint (compare it with the box's)."""

    name: str
    claim: str
    fingerprint: str
    since: float


class RejectIn(BaseModel):
    """Why the enrollment is refused (told to the box)."""

    model_config = ConfigDict(extra="forbid")

    reason: str | None = Field(None, max_length=200, pattern=r"^[^\x00-\x1f\x7f]*$")


class DecisionOut(BaseModel):
    """What happened: ``enrolled``, ``rejected``, or the reason the approval failed."""

    name: str
    claim: str
    outcome: str


def _desk(request: Request) -> EnrollmentDesk:
    desk: EnrollmentDesk | None = getattr(request.app.state, "enroll", None)
    if desk is None:
        raise HTTPException(
            404,
            "this server has no enrollment queue: start it beside the fleet CA with --enroll-ca DIR, "
            "or use `edge-fleet enroll pending` / `approve` / `reject` there",
        )
    return desk


@router.get("/enrollments", response_model=list[PendingOut])
def pending(request: Request, _who: Viewer) -> list[PendingOut]:
    """Every enrollment waiting for approval, oldest first."""
    return [PendingOut(**row) for row in approval.rows(_desk(request).ca_dir)]


def _decided(request: Request, who: Any, action: str, name: str, detail: dict[str, Any]) -> None:
    store: Store = request.app.state.store
    with store.db.transaction():
        store.audit(who.name, action, name, detail)


@router.post("/enrollments/{name}/approve", response_model=DecisionOut)
def approve(request: Request, who: Operator, name: str) -> DecisionOut:
    """Sign the box's certificate (the claim's checks run again), register it, push its group and
    labels; the box, waiting, receives it."""
    from ...enroll import approve_pending

    desk = _desk(request)
    try:
        entry, answer = approve_pending(desk.ca_dir, name, desk.options, desk.admin)
    except FleetError as exc:
        raise HTTPException(404 if "waiting" in str(exc) else 502, str(exc)) from exc
    outcome = "enrolled" if answer.cert is not None else f"refused: {answer.error}"
    _decided(request, who, "enrollment.approve", name,
             {"claim": entry.claim, "fingerprint": entry.fingerprint, "outcome": outcome})  # fmt: skip
    if answer.cert is None:
        raise HTTPException(409, f"{name}: {answer.error}")
    return DecisionOut(name=name, claim=entry.claim, outcome=outcome)


@router.post("/enrollments/{name}/reject", response_model=DecisionOut)
def reject(request: Request, who: Operator, name: str, body: RejectIn) -> DecisionOut:
    """Refuse the enrollment; the box exits with the reason and what to do."""
    from ...enroll import reject_pending

    desk = _desk(request)
    try:
        entry = reject_pending(desk.ca_dir, name, body.reason, desk.options)
    except FleetError as exc:
        raise HTTPException(404 if "waiting" in str(exc) else 502, str(exc)) from exc
    _decided(request, who, "enrollment.reject", name,
             {"claim": entry.claim, "fingerprint": entry.fingerprint, "reason": body.reason})  # fmt: skip
    return DecisionOut(name=name, claim=entry.claim, outcome="rejected")
