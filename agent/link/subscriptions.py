"""What the agent subscribed to last time, so that a configuration change can leave the rest.

A persistent session keeps every subscription across restarts.  When a box
changes group, its old ``$share/OLD/…`` subscription would stay in the session
and keep drawing the old group's jobs — which the broker then refuses to deliver,
so they are lost.  The link records its filters here and unsubscribes from those
no longer configured.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

log = logging.getLogger(__name__)


class SubscriptionRecord:
    """The filters subscribed to, in a small JSON file (replaced atomically)."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def stale(self, current: list[str]) -> list[str]:
        """Recorded filters that are not in ``current`` (an unreadable record: none)."""
        try:
            recorded = json.loads(self.path.read_text())
        except (OSError, ValueError):
            return []
        if not isinstance(recorded, list):
            return []
        return [t for t in recorded if isinstance(t, str) and t not in current]

    def save(self, current: list[str]) -> None:
        """Record ``current``; a failure is logged (the next connect tries again)."""
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            tmp = self.path.with_suffix(".tmp")
            tmp.write_text(json.dumps(current))
            os.replace(tmp, self.path)
        except OSError as exc:
            log.warning("cannot record the subscriptions in %s: %s", self.path, exc)
