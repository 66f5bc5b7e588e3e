"""Bearer tokens and roles: ``viewer`` < ``operator`` < ``admin``.

``require("operator")`` is a FastAPI dependency: 401 without a token or with an unknown or
revoked one, 403 when the token's role ranks below the one asked for; it returns the
``Principal`` (whose name the audit log records).  Without a Bearer token, the dashboard's
session cookie is accepted in its place (``sessions.py``).  Routers added later (a dashboard, an
OpenAI-compatible gateway) use the same dependency.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Annotated

from fastapi import Depends, HTTPException, Request, status
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from .sessions import session_principal
from .store import ROLES, Principal, Role

_bearer = HTTPBearer(auto_error=False, description="A token of `edge-fleet server token create`.")


def rank(role: Role) -> int:
    """viewer 0, operator 1, admin 2."""
    return ROLES.index(role)


def allows(have: Role, need: Role) -> bool:
    """Whether a token of role ``have`` may do what needs ``need``."""
    return rank(have) >= rank(need)


def require(role: Role) -> Callable[..., Principal]:
    """A dependency that admits tokens of ``role`` or above."""

    def check(
        request: Request, credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)]
    ) -> Principal:
        challenge = {"WWW-Authenticate": "Bearer"}
        if credentials is None or credentials.scheme.lower() != "bearer":
            # The dashboard's session cookie (with its CSRF token for changes) stands for a token.
            principal = session_principal(request)
            if principal is None:
                raise HTTPException(
                    status.HTTP_401_UNAUTHORIZED,
                    "a token is needed: send `Authorization: Bearer TOKEN` (edge-fleet server token create)",
                    headers=challenge,
                )
        else:
            principal = request.app.state.store.principal(credentials.credentials)
        if principal is None:
            raise HTTPException(
                status.HTTP_401_UNAUTHORIZED,
                "unknown or revoked token (ask an admin for a new one)",
                headers=challenge,
            )
        if not allows(principal.role, role):
            raise HTTPException(
                status.HTTP_403_FORBIDDEN,
                f"{principal.name} is a {principal.role}; this needs the {role} role (or above)",
            )
        return principal

    return check


#: The dependencies routes take: ``who: Operator`` admits operators and admins.
Viewer = Annotated[Principal, Depends(require("viewer"))]
Operator = Annotated[Principal, Depends(require("operator"))]
Admin = Annotated[Principal, Depends(require("admin"))]
