"""Browser sessions: a cookie made from an API token (``dashboard/session.py`` signs in); ``auth`` accepts either.

The cookie's rules (lifetime, flags, CSRF) are described in ``dashboard/session.py``.
"""

from __future__ import annotations

import hmac
import time

from fastapi import HTTPException, Request, status

from .store import Principal, Store, hash_token

COOKIE = "efs_session"
CSRF_HEADER = "X-CSRF-Token"
LIFETIME_S = 12 * 3600.0
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})


def find_session(store: Store, cookie: str) -> tuple[Principal, str] | None:
    row = store.db.one(
        "SELECT t.name, t.role, s.csrf FROM dashboard_sessions s JOIN tokens t ON t.hash = s.token_hash "
        "WHERE s.id_hash = ? AND s.expires > ? AND t.revoked IS NULL",
        (hash_token(cookie), time.time()),
    )
    return None if row is None else (Principal(row[0], row[1]), str(row[2]))


def session_principal(request: Request) -> Principal | None:
    """Who the session cookie signs in (None: no cookie or an ended session); a change without the
    session's CSRF token is refused (403)."""
    cookie = request.cookies.get(COOKIE)
    if not cookie:
        return None
    found = find_session(request.app.state.store, cookie)
    if found is None:
        return None
    principal, csrf = found
    if request.method not in SAFE_METHODS and not hmac.compare_digest(
        request.headers.get(CSRF_HEADER, "").encode(), csrf.encode()
    ):
        raise HTTPException(
            status.HTTP_403_FORBIDDEN,
            f"a change made with the dashboard's cookie needs its CSRF token in {CSRF_HEADER} "
            "(GET /api/v1/session gives it; reload the page)",
        )
    return principal
