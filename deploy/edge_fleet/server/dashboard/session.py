"""Browser sessions: sign in with an API token, get a cookie; ``auth.require`` accepts either.

The cookie (``efs_session``) is HttpOnly, ``SameSite=Strict``, ``Secure`` when the page was
served over HTTPS, and lives 12 hours.  The database keeps only the SHA-256 of the cookie and
of the token it was made from, so a revoked token ends its sessions at the next request.
Every request that changes something (any method but GET, HEAD, OPTIONS) made with the cookie
must carry the session's CSRF token in ``X-CSRF-Token`` (the page reads it from
``GET /api/v1/session``); with a Bearer token no cookie is involved and none is needed.
"""

from __future__ import annotations

import secrets
import time
from typing import Any

from fastapi import APIRouter, HTTPException, Request, Response, status
from pydantic import BaseModel, ConfigDict, Field

from ..sessions import COOKIE, LIFETIME_S, find_session, session_principal
from ..store import Store, hash_token

router = APIRouter(prefix="/api/v1", tags=["session"])


class SignIn(BaseModel):
    """A token of ``edge-fleet server token create``, exchanged for a session cookie."""

    model_config = ConfigDict(extra="forbid", strict=True)
    token: str = Field(min_length=1, max_length=200)


@router.post("/session")
def sign_in(request: Request, response: Response, body: SignIn) -> dict[str, Any]:
    """Sign in: the token's name, role and the session's CSRF token; sets the session cookie."""
    store: Store = request.app.state.store
    principal = store.principal(body.token)
    if principal is None:
        raise HTTPException(
            status.HTTP_401_UNAUTHORIZED,
            "unknown or revoked token: paste one printed by `edge-fleet server token create NAME --role R`",
        )
    cookie, csrf, now = secrets.token_urlsafe(32), secrets.token_urlsafe(24), time.time()
    with store.db.transaction():
        store.db.execute("DELETE FROM dashboard_sessions WHERE expires < ?", (now,))
        store.db.execute(
            "INSERT INTO dashboard_sessions (id_hash, token_hash, csrf, created, expires) VALUES (?,?,?,?,?)",
            (hash_token(cookie), hash_token(body.token), csrf, now, now + LIFETIME_S),
        )
        store.audit(principal.name, "session.sign_in", "dashboard", {})
    response.set_cookie(
        COOKIE, cookie, max_age=int(LIFETIME_S), httponly=True, samesite="strict",
        secure=request.url.scheme == "https", path="/",
    )  # fmt: skip
    return {"name": principal.name, "role": principal.role, "csrf": csrf}


@router.get("/session")
def whoami(request: Request) -> dict[str, Any]:
    """Who is signed in (cookie or Bearer token): name, role, and the CSRF token of a cookie session."""
    store: Store = request.app.state.store
    cookie = request.cookies.get(COOKIE)
    found = find_session(store, cookie) if cookie else None
    if found is not None:
        return {"name": found[0].name, "role": found[0].role, "csrf": found[1]}
    authorization = request.headers.get("Authorization", "")
    scheme, _, token = authorization.partition(" ")
    principal = store.principal(token.strip()) if scheme.lower() == "bearer" else None
    if principal is None:
        raise HTTPException(
            status.HTTP_401_UNAUTHORIZED, "not signed in: POST /api/v1/session with a token (the page's form)"
        )
    return {"name": principal.name, "role": principal.role, "csrf": None}


@router.delete("/session", status_code=204)
def sign_out(request: Request, response: Response) -> Response:
    """End the cookie's session (with its CSRF token)."""
    cookie = request.cookies.get(COOKIE)
    if cookie and session_principal(request) is not None:
        request.app.state.store.db.execute(
            "DELETE FROM dashboard_sessions WHERE id_hash = ?", (hash_token(cookie),)
        )
    response.status_code = 204
    response.delete_cookie(COOKIE, path="/", httponly=True, samesite="strict")
    return response
