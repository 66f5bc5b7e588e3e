"""The one exception of ``edge-fleet`` commands."""

from __future__ import annotations


class FleetError(Exception):
    """An operator command cannot do what was asked (the message says why and what to do)."""
