"""Where a request goes: pure functions of the fleet's state, no I/O (unit-tested in milliseconds).

The ``model`` a client names is a *target*:

- ``NAME`` (or Ollama's ``NAME:latest``): any online box serving the model ``NAME``;
- ``group:GROUP``: any online box of the group, whatever it serves;
- ``device:DEVICE``: that box only.

``choose`` orders the candidates: online boxes matching the target, boxes that shed load
(``hot``, ``low_memory``) left out; healthy before degraded, boxes that refused recently
(busy, overloaded) after the others; then the least loaded (jobs the gateway has in flight
there plus the queue depth of its last telemetry, while fresh); then the one given a job
least recently; then the device id.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

TargetKind = Literal["model", "group", "device"]
GROUP = "group:"
DEVICE = "device:"
#: Telemetry older than this many intervals no longer counts for the queue depth.
_STALE_INTERVALS = 3.0


@dataclass(frozen=True)
class Target:
    """What a request's ``model`` names."""

    kind: TargetKind
    name: str

    @property
    def label(self) -> str:
        """As a client writes it."""
        return self.name if self.kind == "model" else f"{self.kind}:{self.name}"


def parse_target(model: str) -> Target:
    """``group:G``, ``device:D`` or a model name (Ollama's ``:latest`` tag dropped)."""
    name = model.removesuffix(":latest")
    if name.startswith(GROUP):
        return Target("group", name.removeprefix(GROUP))
    if name.startswith(DEVICE):
        return Target("device", name.removeprefix(DEVICE))
    return Target("model", name)


@dataclass(frozen=True)
class Candidate:
    """One box, as the gateway sees it when a request arrives."""

    device_id: str
    online: bool
    group: str | None = None
    model: str | None = None  # the served model's name
    healthy: bool = True  # health verdict ok (or not reported)
    shedding: bool = False  # degraded for a reason that makes it refuse jobs (hot, low_memory)
    queue_depth: int | None = None  # of its last telemetry
    telemetry_age_s: float | None = None
    telemetry_interval_s: float | None = None
    in_flight: int = 0  # the gateway's jobs on it now
    refused_until: float = 0.0  # monotonic time until which a recent refusal counts against it
    last_assigned: float = 0.0  # monotonic time of the last job the gateway gave it


def matches(target: Target, box: Candidate) -> bool:
    """Whether ``box`` is one the target names (online or not)."""
    if target.kind == "device":
        return box.device_id == target.name
    if target.kind == "group":
        return box.group == target.name
    return box.model == target.name


def load(box: Candidate) -> int:
    """Jobs in flight through the gateway plus the queue depth its telemetry reported, while fresh."""
    queued = 0
    if box.queue_depth is not None and box.telemetry_age_s is not None:
        interval = box.telemetry_interval_s or 10.0
        if box.telemetry_age_s <= _STALE_INTERVALS * interval:
            queued = box.queue_depth
    return box.in_flight + queued


def choose(
    target: Target, boxes: list[Candidate], *, now: float, exclude: frozenset[str] = frozenset()
) -> list[str]:
    """The device ids to try for ``target``, best first (empty: none can take it now)."""
    usable = [
        b for b in boxes if b.online and not b.shedding and b.device_id not in exclude and matches(target, b)
    ]
    usable.sort(key=lambda b: (not b.healthy, b.refused_until > now, load(b), b.last_assigned, b.device_id))
    return [b.device_id for b in usable]


def why_none(target: Target, boxes: list[Candidate], exclude: frozenset[str] = frozenset()) -> str:
    """Why ``choose`` found no box: for the error message (it names what to do)."""
    named = [b for b in boxes if matches(target, b)]
    if not named:
        what = {"model": "serves the model", "group": "is in the group", "device": "is called"}[target.kind]
        return (
            f"no box {what} {target.name!r}: GET /v1/models lists what can be asked for "
            "(model names, group:GROUP, device:DEVICE)"
        )
    online = [b for b in named if b.online]
    if not online:
        return f"{target.label}: every box of it is offline ({len(named)} known); retry when one is back"
    if all(b.shedding for b in online):
        return f"{target.label}: every online box sheds load (too hot or short of memory); retry later"
    return (
        f"{target.label}: every box of it refused or failed this request ({len(exclude)} tried); retry later"
    )
