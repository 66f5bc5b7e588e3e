"""The exceptions of ``edge-fleet``: one tree, rooted at ``FleetError``."""

from __future__ import annotations


class FleetError(Exception):
    """An operator command cannot do what was asked (the message says why and what to do)."""


class StoreError(FleetError):
    """The server's database refused or failed (the message names the database and the fix)."""


class ServerError(FleetError):
    """The fleet server could not be reached, or refused a request (the message says why)."""
