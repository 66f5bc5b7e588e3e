"""The rollout controller's decision for one tick, as a pure function.

``evaluate(rollout, targets, observations)`` looks at a rollout's durable state and
what the broker says of its devices right now, and returns the actions to take; the
server's controller (``server.controller``) and the lab mode's (``rollout.Controller``)
apply them, each to its own store.  Nothing here does I/O or reads a clock, so
every rule is tested in milliseconds.

The rules (hawkBit's, with Kubernetes' reconcile style):

* wave 0 is the **canary** set when the rollout has one: any failure there halts;
* a later wave halts when more than ``max_failure_rate`` of its devices failed
  (minus failures an operator accepted by resuming);
* at most ``max_parallel`` devices are updating at once (0: a wave at once);
* a device sent the release that neither converges nor fails within ``timeout``
  seconds counts as ``timed_out`` (offline boxes included); it can still recover;
* outcomes of devices already finished keep being read: a halted rollout whose
  failing devices recovered says so, and continues when its policy says so;
* devices that come to match the rollout's target while it runs join its next wave;
* with ``defer_offline``, devices offline when their wave starts are sent the release
  but not waited for (``deferred``): the rollout then ends ``waiting`` until each reported;
* with ``cumulative`` (the lab mode's rule), the failure rate is over every wave so far.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

RolloutState = Literal["running", "waiting", "halted", "aborted", "done"]
TargetState = Literal["pending", "sent", "deferred", "active", "failed", "timed_out", "canceled"]
FINISHED: tuple[TargetState, ...] = ("active", "failed", "timed_out", "canceled")
FAILED: tuple[TargetState, ...] = ("failed", "timed_out")
#: Targets whose outcome the broker can still change.
OPEN: tuple[TargetState, ...] = ("sent", "deferred", "failed", "timed_out")


@dataclass(frozen=True)
class RolloutView:
    """What the decision needs of a rollout's row."""

    id: str
    state: RolloutState
    wave: int
    waves: int
    canary: bool  # wave 0 is a canary set
    max_failure_rate: float
    max_parallel: int
    timeout: float
    accepted_failures: int
    resume_on_recovery: bool
    reason: str | None = None
    defer_offline: bool = False
    cumulative: bool = False  # the failure rate over every wave so far (else: the current wave's)


@dataclass(frozen=True)
class TargetView:
    """What the decision needs of one target."""

    device: str
    wave: int
    state: TargetState
    sent_at: float | None = None
    detail: str | None = None


@dataclass(frozen=True)
class Observation:
    """What the broker says of one device now: online, and its outcome on the rollout's release."""

    online: bool
    outcome: tuple[Literal["active", "failed"], str | None] | None = None


@dataclass(frozen=True)
class Observations:
    """The world at one tick."""

    now: float
    devices: dict[str, Observation] = field(default_factory=dict)
    matching: tuple[str, ...] | None = None  # devices the target matches now (None: do not add any)


# -- actions --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Mark:
    """Record new target states."""

    changes: dict[str, tuple[TargetState, str | None]]


@dataclass(frozen=True)
class Send:
    """Record and publish the release as these devices' desired state; mark them ``sent`` (those in
    ``deferred``: ``deferred``, not waited for)."""

    devices: tuple[str, ...]
    deferred: tuple[str, ...] = ()


@dataclass(frozen=True)
class Join:
    """Add devices that came to match the target to a wave."""

    devices: tuple[str, ...]
    wave: int


@dataclass(frozen=True)
class Advance:
    """Move to the next wave."""

    wave: int


@dataclass(frozen=True)
class SetState:
    """Change the rollout's state (and its reason)."""

    state: RolloutState
    reason: str | None


@dataclass(frozen=True)
class Event:
    """A line of progress for the operator (kept with the rollout)."""

    text: str


Action = Mark | Send | Join | Advance | SetState | Event


def _names(devices: list[str], limit: int = 8) -> str:
    shown = ", ".join(devices[:limit])
    return shown + (f" … and {len(devices) - limit} more" if len(devices) > limit else "")


def failures_allowed(rollout: RolloutView, wave: int, size: int) -> int:
    """How many failures ``wave`` (of ``size`` devices) tolerates before the rollout halts."""
    if rollout.canary and wave == 0:
        return 0
    return math.floor(rollout.max_failure_rate * size + 1e-9)


def _refresh(targets: dict[str, TargetView], obs: Observations) -> dict[str, tuple[TargetState, str | None]]:
    changes: dict[str, tuple[TargetState, str | None]] = {}
    for device, target in targets.items():
        seen = obs.devices.get(device)
        if target.state in OPEN and seen is not None and seen.outcome is not None:
            state, detail = seen.outcome
            if state != target.state or (state == "failed" and detail != target.detail):
                changes[device] = (state, detail)
    return changes


def _applied(
    targets: dict[str, TargetView], changes: dict[str, tuple[TargetState, str | None]]
) -> dict[str, TargetView]:
    out = dict(targets)
    for device, (state, detail) in changes.items():
        t = out[device]
        out[device] = TargetView(t.device, t.wave, state, t.sent_at, detail)
    return out


def _failures(rollout: RolloutView, targets: dict[str, TargetView]) -> tuple[int, int, list[str]]:
    """(devices in play, failures beyond those accepted, failed devices) for the threshold."""
    if rollout.cumulative:
        members = [t for t in targets.values() if t.wave <= rollout.wave]
    else:
        members = [t for t in targets.values() if t.wave == rollout.wave]
    failed = sorted(t.device for t in members if t.state in FAILED)
    return len(members), len(failed) - rollout.accepted_failures, failed


def _halt_reason(rollout: RolloutView, size: int, failures: int, failed: list[str]) -> str:
    wave = rollout.wave
    if rollout.cumulative:
        span = f"wave {wave + 1}" if wave == 0 else f"waves 1-{wave + 1}"
        return f"{failures} of {size} devices in {span} failed (limit {rollout.max_failure_rate:.0%})"
    what = "canary" if rollout.canary and wave == 0 else f"wave {wave + 1}"
    limit = "any failure" if rollout.canary and wave == 0 else f"limit {rollout.max_failure_rate:.0%}"
    return f"{failures} of {size} devices of the {what} failed ({limit}): {_names(failed)}"


def evaluate(rollout: RolloutView, targets: dict[str, TargetView], obs: Observations) -> list[Action]:
    """The actions of one tick (empty: nothing to do)."""
    if rollout.state in ("aborted", "done"):
        changes = _refresh(targets, obs)  # late outcomes are still recorded
        return [Mark(changes)] if changes else []
    actions: list[Action] = []
    changes = _refresh(targets, obs)
    if changes:
        actions.append(Mark(changes))
        for device, (state, detail) in sorted(changes.items()):
            recovered = targets[device].state in FAILED and state == "active"
            actions.append(
                Event(
                    f"{device}: {state}"
                    + (" (recovered)" if recovered else "")
                    + (f" — {detail}" if detail else "")
                )
            )
    targets = _applied(targets, changes)
    if rollout.state == "halted":
        return actions + _recovery(rollout, targets, bool(changes))
    if rollout.state == "waiting":
        if not any(t.state == "deferred" for t in targets.values()):
            actions += [SetState("done", None), Event("done: every deferred device reported")]
        return actions
    return actions + _running(rollout, targets, obs)


def _recovery(rollout: RolloutView, targets: dict[str, TargetView], changed: bool) -> list[Action]:
    size, failures, _failed = _failures(rollout, targets)
    if not changed or failures > failures_allowed(rollout, rollout.wave, size):
        return []
    text = f"the failing devices of wave {rollout.wave + 1} recovered ({failures} failures left)"
    if rollout.resume_on_recovery:
        return [Event(text + ": continuing (resume_on_recovery)"), SetState("running", None)]
    return [Event(text + f": resume to continue (edge-fleet rollout resume {rollout.id})"),
            SetState("halted", f"{rollout.reason or 'halted'}; since recovered: resume to continue")]  # fmt: skip


def _running(rollout: RolloutView, targets: dict[str, TargetView], obs: Observations) -> list[Action]:
    actions: list[Action] = []
    wave = rollout.wave
    if wave >= rollout.waves:
        return _finish(targets)
    # Devices that came to match the target join the next wave (or this one, if it is the last).
    if obs.matching is not None:
        joined = tuple(sorted(d for d in obs.matching if d not in targets))
        if joined:
            into = min(wave + 1, rollout.waves - 1)
            actions += [Join(joined, into), Event(f"{_names(list(joined))} joined: added to wave {into + 1}")]
            targets = {**targets, **{d: TargetView(d, into, "pending") for d in joined}}
    # Timeouts.
    timeouts: dict[str, tuple[TargetState, str | None]] = {}
    for t in targets.values():
        if (
            t.wave == wave
            and t.state == "sent"
            and t.sent_at is not None
            and obs.now > t.sent_at + rollout.timeout
        ):
            seen = obs.devices.get(t.device)
            why = "offline" if seen is None or not seen.online else "no answer"
            timeouts[t.device] = ("timed_out", f"{why} within the wave timeout of {rollout.timeout:g} s")
    if timeouts:
        actions.append(Mark(timeouts))
        actions += [Event(f"{d}: timed_out — {why}") for d, (_s, why) in sorted(timeouts.items())]
        targets = _applied(targets, timeouts)
    # Thresholds.
    size, failures, failed = _failures(rollout, targets)
    if failures > failures_allowed(rollout, wave, size):
        reason = _halt_reason(rollout, size, failures, failed)
        return [*actions, SetState("halted", reason), Event(f"HALTED — {reason}")]
    # Sends, at most max_parallel in flight; offline devices deferred when the rollout says so.
    members = sorted((t for t in targets.values() if t.wave == wave), key=lambda t: t.device)
    pending = [t.device for t in members if t.state == "pending"]
    if pending:
        online = [d for d in pending if (o := obs.devices.get(d)) is not None and o.online]
        ordered = online + [d for d in pending if d not in online]
        if rollout.max_parallel > 0:
            in_flight = sum(1 for t in members if t.state == "sent")
            ordered = ordered[: max(0, rollout.max_parallel - in_flight)]
        if ordered:
            if all(t.state == "pending" for t in members):
                what = "canary" if rollout.canary and wave == 0 else f"wave {wave + 1}/{rollout.waves}"
                actions.append(
                    Event(f"{what}: {len(members)} devices: {_names([t.device for t in members])}")
                )
            deferred = tuple(d for d in ordered if d not in online) if rollout.defer_offline else ()
            actions.append(Send(tuple(ordered), deferred))
        return actions
    # The wave is through when every member finished (deferred ones are not waited for).
    if all(t.state in FINISHED or t.state == "deferred" for t in members):
        counts: dict[str, int] = {}
        for t in members:
            counts[t.state] = counts.get(t.state, 0) + 1
        tally = ", ".join(f"{n} {s}" for s, n in sorted(counts.items()))
        actions += [Event(f"wave {wave + 1} finished — {tally}"), Advance(wave + 1)]
        if wave + 1 >= rollout.waves:
            actions += _finish(targets)
    return actions


def _finish(targets: dict[str, TargetView]) -> list[Action]:
    """``done``, or ``waiting`` while deferred devices have not reported."""
    deferred = sorted(t.device for t in targets.values() if t.state == "deferred")
    if deferred:
        reason = f"{len(deferred)} deferred devices have not reported yet: {_names(deferred, 12)}"
        return [SetState("waiting", reason), Event(f"NOT DONE — {reason}")]
    return [SetState("done", None), Event("done")]
