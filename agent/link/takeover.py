"""Telling a session takeover from a certificate problem or a lost network (pure rules).

mosquitto 2.0.11 over TLS drops the connection it replaces on a takeover without
sending DISCONNECT "Session taken over": the agent only sees the socket close
(paho: "Unspecified error"), as it would for a lost network or a broker crash.
The heuristic, from the broker's behaviour:

1. a certificate the broker does not accept is refused *before* CONNACK; a close
   *after* a successful CONNACK is something else;
2. after a broker crash or a lost network the next attempt fails (nothing
   listens, or nothing answers); after a takeover the broker is there and
   accepts the box again at once.

So: a working connection closed without a reason, followed by a reconnection
that succeeds on its first attempt, is reported as "session taken over by another
connection with this identity" (a second agent, a copy of the certificate on
another box, or an operator's ``edge-fleet revoke``/``move`` settling the session).
When it keeps happening (``FIGHT`` times within ``WINDOW_S``), two connections are
taking the session from each other: a cloned box.
"""

from __future__ import annotations

from dataclasses import dataclass, field

WINDOW_S = 600.0
FIGHT = 3
SILENT = "Unspecified error"


@dataclass
class TakeoverDetector:
    """Fed the link's events in order; says what happened."""

    _silent_drop: bool = False
    _attempt_failed: bool = False
    _takeovers: list[float] = field(default_factory=list)

    def dropped(self, reason: str, *, was_up: bool) -> str | None:
        """The connection closed with ``reason``; returns the words for a reasonless close."""
        self._silent_drop = reason == SILENT and was_up
        self._attempt_failed = False
        if reason != SILENT:
            return None
        if was_up:
            return (
                "the broker closed a working connection without saying why: the network, a broker restart, "
                "or another connection with this identity taking the session (said on reconnection)"
            )
        return (
            "the broker closed it before accepting the login: a certificate it does not accept (another CA, "
            "expired) is dropped this way; `edge-agent doctor` says which"
        )

    def attempt_failed(self) -> None:
        """A (re)connection attempt failed: the broker was away, not taken over."""
        self._attempt_failed = True

    def connected(self, now: float) -> str | None:
        """A connection was accepted; returns the takeover message when that is what the drop was."""
        inferred = self._silent_drop and not self._attempt_failed
        self._silent_drop = self._attempt_failed = False
        if not inferred:
            return None
        self._takeovers = [t for t in self._takeovers if now - t < WINDOW_S] + [now]
        text = (
            "session taken over by another connection with this identity (inferred: the broker dropped a "
            "working connection without a reason and accepted this box again at once): a second agent, a "
            "copy of this certificate on another box, or an operator's `edge-fleet revoke`/`move`"
        )
        if len(self._takeovers) >= FIGHT:
            text += (
                f"; {len(self._takeovers)} times in {WINDOW_S / 60:.0f} min: two connections keep taking "
                "this identity's session from each other — is this certificate on two boxes?"
            )
        return text
