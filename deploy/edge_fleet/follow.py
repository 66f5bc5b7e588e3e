"""Following devices as they converge on a release: per-device outcomes and progress lines."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Literal

from .fleet_view import FleetFeed, FleetView

Outcome = tuple[Literal["active", "failed"], str | None]


def outcome(view: FleetView, device: str, name: str, version: str) -> Outcome | None:
    """``active`` or ``failed`` (with the reason) once ``device`` reports on ``name@version``, else None."""
    found = view.devices.get(device)
    state = found.model if found else None
    if state is None:
        return None
    if state.active and (state.active.name, state.active.version) == (name, version):
        return "active", None
    update = state.update
    mine = update is not None and (update.name, update.version) == (name, version)
    if mine and update is not None and update.phase in ("failed", "rolled_back"):
        why = f"{update.error.code}: {update.error.message}" if update.error else "no reason given"
        return "failed", why + (
            " (it went live, then the box rolled back)" if update.phase == "rolled_back" else ""
        )
    return None


def _phase(view: FleetView, device: str, name: str, version: str) -> str:
    found = view.devices.get(device)
    if found is None or (found.status is None and found.model is None):
        return "not seen on the broker"
    if found.status is not None and not found.status.online:
        return "offline: it converges when it returns"
    update = found.model.update if found.model else None
    if update is None or (update.name, update.version) != (name, version):
        return "online, not started yet"
    text: str = update.phase
    if update.progress is not None and update.phase == "downloading":
        text += f" {update.progress:.0%}"
    return text


def follow(
    feed: FleetFeed,
    devices: list[str],
    name: str,
    version: str,
    timeout: float,
    say: Callable[[str], None],
) -> dict[str, Outcome | None]:
    """Wait until every device is ``active`` on ``name@version`` or failed, or ``timeout``; say each
    device's phase as it changes.  Returns each device's outcome (None: unfinished)."""
    shown: dict[str, str] = {}
    results: dict[str, Outcome | None] = dict.fromkeys(devices)
    end = time.monotonic() + timeout
    while True:
        feed.pump(0.2)
        for device in devices:
            if results[device] is not None:
                continue
            found = outcome(feed.view, device, name, version)
            if found is not None:
                results[device] = found
                say(f"  {device}: {found[0]}" + (f" — {found[1]}" if found[1] else f" {name}@{version}"))
                continue
            phase = _phase(feed.view, device, name, version)
            if shown.get(device) != phase:
                shown[device] = phase
                say(f"  {device}: {phase}")
        if all(r is not None for r in results.values()) or time.monotonic() > end:
            return results
