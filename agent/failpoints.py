"""Crash injection for tests: ``kill -9`` the agent at a named point of its work.

``EDGE_AGENT_FAILPOINTS=name[,name…]`` makes ``hit(name)`` kill the process
with SIGKILL — no cleanup, no flush, exactly what a power cut leaves.  The
update tests use it to prove that a crash at every phase restarts into a
working model.  Unset (always, in production) it costs one dict lookup.
"""

from __future__ import annotations

import logging
import os
import signal

log = logging.getLogger(__name__)

_ARMED = frozenset(filter(None, os.environ.get("EDGE_AGENT_FAILPOINTS", "").split(",")))


def hit(name: str) -> None:
    """Die here, now, if the failpoint ``name`` is armed."""
    if name in _ARMED:
        log.critical("failpoint %s: killing the process", name)
        for handler in logging.getLogger().handlers:
            handler.flush()
        os.kill(os.getpid(), signal.SIGKILL)
