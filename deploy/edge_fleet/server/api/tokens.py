"""``/api/v1/tokens``: admins make, list and revoke API tokens (a new token is shown once)."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, HTTPException, Request

from ...errors import FleetError
from ..auth import Admin
from ..schemas import TokenIn
from ..store import Store

router = APIRouter(prefix="/api/v1", tags=["tokens"])


@router.get("/tokens")
def list_tokens(request: Request, _who: Admin) -> list[dict[str, Any]]:
    """Every token: name, role, created, by whom, revoked (never the secret)."""
    store: Store = request.app.state.store
    return store.tokens()


@router.post("/tokens", status_code=201)
def create_token(request: Request, who: Admin, body: TokenIn) -> dict[str, str]:
    """A new token for ``name`` with ``role``: ``{"name", "role", "token"}`` (the token is not kept)."""
    store: Store = request.app.state.store
    try:
        token = store.create_token(body.name, body.role, who.name)
    except FleetError as exc:
        raise HTTPException(409, str(exc)) from None
    return {"name": body.name, "role": body.role, "token": token}


@router.delete("/tokens/{name}")
def revoke_token(request: Request, who: Admin, name: str) -> dict[str, str]:
    """Revoke ``name``'s token (at once: its next request gets 401)."""
    store: Store = request.app.state.store
    try:
        store.revoke_token(name, who.name)
    except FleetError as exc:
        raise HTTPException(404, str(exc)) from None
    return {"name": name, "state": "revoked"}
