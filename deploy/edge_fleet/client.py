"""The command line as a client of ``edge-fleet server``: JSON over HTTP with a Bearer token.

With ``server = "http://HOST:PORT"`` in the profile (or ``EDGE_FLEET_SERVER``) and a token
(``token`` / ``EDGE_FLEET_TOKEN``), ``rollout``, ``devices``, ``history`` and ``audit`` ask the
server instead of driving the broker themselves.  Only the standard library is used, so the
operator's machine needs no server packages.
"""

from __future__ import annotations

import json
import urllib.error
import urllib.parse
import urllib.request
from typing import Any

from .errors import ServerError
from .profile import load_profile


class ServerClient:
    """Calls of the server's ``/api/v1``."""

    def __init__(self, base: str, token: str | None, *, timeout: float = 30.0) -> None:
        self.base = base.rstrip("/")
        self.token = token
        self.timeout = timeout

    def call(self, method: str, path: str, body: Any = None, **query: Any) -> Any:
        """One request; the decoded JSON answer, or a ``ServerError`` saying what went wrong."""
        url = self.base + urllib.parse.quote(path, safe="/@:=,!")
        params = {k: v for k, v in query.items() if v is not None}
        if params:
            url += "?" + urllib.parse.urlencode(params)
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(url, data=data, method=method)
        request.add_header("Accept", "application/json")
        if data is not None:
            request.add_header("Content-Type", "application/json")
        if self.token:
            request.add_header("Authorization", f"Bearer {self.token}")
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as answer:
                return json.loads(answer.read() or b"null")
        except urllib.error.HTTPError as exc:
            raise ServerError(_refusal(exc, method, path)) from None
        except (urllib.error.URLError, OSError) as exc:
            reason = getattr(exc, "reason", exc)
            raise ServerError(
                f"cannot reach the fleet server at {self.base}: {reason} (is `edge-fleet server` running? "
                "check server in the profile or EDGE_FLEET_SERVER)"
            ) from None


def _refusal(exc: urllib.error.HTTPError, method: str, path: str) -> str:
    try:
        detail = json.loads(exc.read()).get("detail")
    except (ValueError, AttributeError):
        detail = None
    if isinstance(detail, list):  # a validation error: where and what
        detail = "; ".join(f"{'.'.join(map(str, d.get('loc', [])))}: {d.get('msg')}" for d in detail)
    text = f"the server refused {method} {path}: {exc.code} {detail or exc.reason}"
    if exc.code == 401:
        text += " (give a token: token in the profile or EDGE_FLEET_TOKEN; an admin makes one with `edge-fleet server token create`)"
    return text


def server_client() -> ServerClient | None:
    """The client of the profile's server, or None (lab mode: commands drive the broker themselves)."""
    profile = load_profile()
    if not profile.server:
        return None
    return ServerClient(profile.server, profile.token)
