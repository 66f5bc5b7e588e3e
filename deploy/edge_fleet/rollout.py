"""Staged rollouts: a release goes to a group in waves, and stops by itself when too many fail.

    edge-fleet rollout MANIFEST --group G --waves 1%,10%,50%,100% [--wave-timeout S]
                       [--max-failure-rate R] [--min-devices N] [--defer-offline]
    edge-fleet rollout status [ID] | abort ID | resume ID | rollback ID --key KEY

The group's devices come from the inventory (every device provisioned into or
ever seen in the group, offline ones included) and the broker's retained
statuses; they are split into waves when the rollout starts (online devices
first); devices that join the group later are added to the next wave.  A wave
records and publishes the manifest as each of its devices' own retained desired
state; the next wave starts when every device of the current one reports the
release ``active`` or ``failed``, or when the wave timeout ends (devices silent
by then, offline ones included, count as failures).  With ``--defer-offline``
devices offline when their wave starts are sent the release but not waited
for: they are ``deferred``, and the rollout ends ``waiting`` (not ``done``)
until each has reported.  When failures exceed ``max_failure_rate`` of the
devices in the waves so far the rollout halts.  ``abort`` stops it for good
and withdraws the desired state of devices that had not finished; ``resume``
continues a halted one (the failures seen so far are then accepted);
``rollback ID`` returns the devices that rollout touched to what they ran
before, in waves of its own.

Everything lives in the state file, so the controller can be stopped and
started again at any point: running the same command again continues it (a
lock file keeps two controllers off one rollout).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import sys
import time
from collections.abc import Iterator
from dataclasses import replace
from typing import Any

from edge_contract.manifest import Manifest

from .assignments import Assignments, assign
from .broker import BrokerOptions, FleetError
from .domain.evaluate import (
    Action,
    Advance,
    Join,
    Mark,
    Observation,
    Observations,
    RolloutView,
    Send,
    SetState,
    TargetView,
    evaluate,
)
from .fleet_view import FleetFeed
from .follow import Outcome, outcome
from .inventory import DISCOVERY_MAX_S, Inventory
from .rollout_store import (
    FINISHED,
    OPEN,
    Rollout,
    RolloutState,
    RolloutStore,
    Target,
    TargetState,
    names,
    parse_waves,
    plan_waves,
    rollout_id_of,
    tally,
)

__all__ = ["Controller", "RolloutStore", "controller_lock", "parse_waves", "plan_waves", "rollout_id_of"]

# A line on the wave's progress at most this often while nothing else is said.
_PROGRESS_EVERY_S = 15.0
#: Counts that change print at most this often: a wave of hundreds of boxes finishing one by one
#: reads as a few lines, not one per box.
_PROGRESS_MIN_GAP_S = 3.0


@contextlib.contextmanager
def controller_lock(store: RolloutStore, rollout_id: str) -> Iterator[None]:
    """Only one controller drives a rollout; a crashed one leaves no stale lock (flock dies with it)."""
    name = rollout_id.replace("/", "_").replace("@", "_")
    path = store.path.with_name(f"{store.path.name}.{name}.lock")
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise FleetError(f"rollout {rollout_id} is being driven by another edge-fleet process") from None
        yield
    finally:
        os.close(fd)


class Controller:
    """Drives one rollout until it is done, waiting, halted or aborted."""

    def __init__(self, store: RolloutStore, options: BrokerOptions, *, out: Any = sys.stdout) -> None:
        self.store = store
        self.options = options
        self.out = out
        self.assignments = Assignments(store.db)
        self.inventory = Inventory(store.db)
        self.feed = FleetFeed(options, telemetry=False)
        self.view = self.feed.view
        self._manifests: dict[str | None, Manifest] = {}
        self._payloads: dict[str | None, bytes] = {}

    def close(self) -> None:
        """Disconnect."""
        self.feed.close()

    def say(self, text: str) -> None:
        """Progress for the operator."""
        print(text, file=self.out, flush=True)

    def discover(self) -> None:
        """Take in the retained burst of statuses and model states, and record it in the inventory."""
        self.feed.settle(DISCOVERY_MAX_S)
        self.inventory.observe(self.view.devices.values())

    def online(self, device: str) -> bool:
        """Whether the device's retained status says online right now."""
        found = self.view.devices.get(device)
        return bool(found and found.status and found.status.online)

    def running(self, device: str) -> str | None:
        """``NAME@VERSION`` the device runs, as far as is known."""
        found = self.view.devices.get(device)
        if found is not None:
            state, status = found.model, found.status
            active = state.active if state and state.active else (status.model if status else None)
            if active is not None:
                return f"{active.name}@{active.version}"
        row = self.inventory.get(device)
        return f"{row.model}@{row.version}" if row and row.model else None

    def group_devices(self, group: str) -> list[str]:
        """Devices of ``group`` (the inventory's and the broker's): online ones first, then by id."""
        members = set(self.inventory.members(group))
        members |= {
            d.device_id
            for d in self.view.devices.values()
            if d.status is not None and d.status.group == group
        }
        return sorted(members, key=lambda d: (not self.online(d), d))

    # -- per-target manifests ------------------------------------------------------------------

    def _load(self, rollout: Rollout, digest: str | None) -> tuple[Manifest, bytes]:
        if digest not in self._manifests:
            payload = rollout.manifest if digest is None else self.assignments.manifest(digest)
            if payload is None:
                raise FleetError(f"the state file lost the manifest {digest} of rollout {rollout.id}")
            self._payloads[digest] = payload
            self._manifests[digest] = Manifest.parse(payload)
        return self._manifests[digest], self._payloads[digest]

    def _send(self, rollout: Rollout, devices: list[str], state: TargetState) -> None:
        targets = self.store.targets(rollout.id)
        by_digest: dict[str | None, list[str]] = {}
        for device in devices:
            by_digest.setdefault(targets[device].digest if device in targets else None, []).append(device)
        for digest, group in by_digest.items():
            _manifest, payload = self._load(rollout, digest)
            origin = f"rollout {rollout.id}"
            assign(self.assignments, self.feed.client, self.options.prefix, "device", group, payload, origin)
        # Marked after the broker has them all: a crash in between publishes them again,
        # which is harmless (the same retained message).
        self.store.set_targets(rollout.id, dict.fromkeys(devices, (state, None)))

    def outcome(self, device: str, manifest: Manifest) -> Outcome | None:
        """``active``/``failed`` once the device reports on ``manifest``, else None."""
        return outcome(self.view, device, manifest.name, manifest.version)

    # -- the loop: evaluate (edge_fleet.domain.evaluate) decides, this applies ---------------------

    def _view(self, rollout: Rollout) -> RolloutView:
        return RolloutView(
            id=rollout.id, state=rollout.state, wave=rollout.wave, waves=len(rollout.waves), canary=False,
            max_failure_rate=rollout.max_failure_rate, max_parallel=0, timeout=rollout.wave_timeout,
            accepted_failures=rollout.accepted_failures, resume_on_recovery=False, reason=rollout.reason,
            defer_offline=rollout.defer_offline, cumulative=True,
        )  # fmt: skip

    def _observe(self, rollout: Rollout, targets: dict[str, Target], *, joins: bool) -> Observations:
        devices = {}
        for device, target in targets.items():
            manifest, _payload = self._load(rollout, target.digest)
            devices[device] = Observation(self.online(device), self.outcome(device, manifest))
        matching = None
        if (
            joins and rollout.rollback_of is None
        ):  # a rollback concerns exactly the devices it was planned for
            matching = tuple(
                d.device_id
                for d in self.view.devices.values()
                if d.status is not None and d.status.group == rollout.group
            )
        return Observations(time.time(), devices, matching)

    def _targets(self, rollout: Rollout, targets: dict[str, Target]) -> dict[str, TargetView]:
        sent_at = rollout.wave_started  # a wave sends every device at its start
        return {
            d: TargetView(d, t.wave, t.state, sent_at if t.state == "sent" else None, t.detail)
            for d, t in targets.items()
        }

    def refresh(self, rollout: Rollout) -> int:
        """Read the outcome of targets still open (``sent``, ``deferred``, ``timed_out``) from the
        broker; a ``waiting`` rollout whose deferred devices all reported becomes ``done``.
        Returns how many targets changed."""
        targets = self.store.targets(rollout.id)
        view = self._view(rollout)
        if view.state == "running":
            view = replace(view, state="halted")  # only read outcomes: the controller drives it
        changed = 0
        for action in evaluate(
            view, self._targets(rollout, targets), self._observe(rollout, targets, joins=False)
        ):
            if isinstance(action, Mark):
                changes = {d: c for d, c in action.changes.items() if targets[d].state in OPEN}
                self.store.set_targets(rollout.id, changes, only_from=OPEN)
                changed += len(changes)
            elif isinstance(action, SetState) and action.state == "done" and rollout.state == "waiting":
                self.store.update(rollout.id, only_if=("waiting",), state="done", reason=None)
        return changed

    def run(self, rollout_id: str, poll_s: float = 0.2) -> RolloutState:
        """Drive the rollout; returns its final state (``done``, ``waiting``, ``halted`` or ``aborted``)."""
        last_progress = (0.0, "")
        while True:
            rollout = self.store.get(rollout_id)
            assert rollout is not None
            if rollout.state != "running":
                return rollout.state
            if rollout.wave_started is not None:
                self.feed.pump(poll_s)
            targets = self.store.targets(rollout_id)
            actions = evaluate(
                self._view(rollout),
                self._targets(rollout, targets),
                self._observe(rollout, targets, joins=True),
            )
            for action in actions:
                self._apply(rollout, targets, action)
            if rollout.wave_started is not None and rollout.wave < len(rollout.waves):
                targets = self.store.targets(rollout_id)
                members = [d for d, t in targets.items() if t.wave == rollout.wave]
                last_progress = self._progress(rollout, targets, members, last_progress)

    _LIVE: tuple[TargetState, ...] = ("pending", "sent", "deferred", "failed", "timed_out")

    def _apply(self, rollout: Rollout, targets: dict[str, Target], action: Action) -> None:
        """Do one action of ``evaluate``, saying what the lab mode says."""
        if isinstance(action, Mark):
            self.store.set_targets(rollout.id, action.changes, only_from=self._LIVE)
            # A line per device that did not converge; the converged are counted by the wave's
            # progress and end lines (a line per device was 426 lines for 51 boxes).
            for device, (state, detail) in sorted(action.changes.items()):
                if state != "active":
                    self.say(f"  {device}: {state}" + (f" — {detail}" if detail else ""))
        elif isinstance(action, Send):
            if rollout.wave_started is None:
                wave = rollout.wave
                members = [d for d, t in targets.items() if t.wave == wave]
                listed = names([d + (" (offline)" if not self.online(d) else "") for d in members])
                self.say(
                    f"rollout {rollout.id}: wave {wave + 1}/{len(rollout.waves)} ({rollout.waves[wave]:g}%), "
                    f"{len(members)} devices: {listed}"
                )
            deferred = list(action.deferred)
            sent = [d for d in action.devices if d not in deferred]
            if sent:
                self._send(rollout, sent, "sent")
            if deferred:
                self._send(rollout, deferred, "deferred")
                self.say(f"  deferred (offline; they get the release when they return): {names(deferred)}")
            if rollout.wave_started is None:
                self.store.update(rollout.id, only_if=("running",), wave_started=time.time())
        elif isinstance(action, Join):
            self.store.add_targets(rollout.id, [(d, self.running(d)) for d in action.devices], action.wave)
            self.say(f"  {', '.join(action.devices)} joined {rollout.group}: added to wave {action.wave + 1}")
        elif isinstance(action, Advance):
            self.say(
                f"rollout {rollout.id}: wave {rollout.wave + 1} finished — {tally(self.store.counts(rollout.id))}"
            )
            self.store.update(rollout.id, only_if=("running",), wave=action.wave, wave_started=None)
        elif isinstance(action, SetState):
            self.store.update(rollout.id, only_if=("running",), state=action.state, reason=action.reason)
            counts = tally(self.store.counts(rollout.id))
            if action.state == "halted":
                self.say(f"rollout {rollout.id}: HALTED — {action.reason}")
            elif action.state == "waiting":
                self.say(
                    f"rollout {rollout.id}: NOT DONE — {counts}; {action.reason} "
                    f"(`edge-fleet rollout status {rollout.id}` tracks them)"
                )
            elif action.state == "done":
                self.say(f"rollout {rollout.id}: done — {counts}")

    def _progress(
        self, rollout: Rollout, targets: dict[str, Any], members: list[str], last: tuple[float, str]
    ) -> tuple[float, str]:
        """A line on the wave when its counts change (at most every ``_PROGRESS_MIN_GAP_S``), or every
        ``_PROGRESS_EVERY_S`` seconds."""
        finished = [d for d in members if targets[d].state in FINISHED]
        waiting = [d for d in members if targets[d].state == "sent"]
        text = f"{len(finished)} of {len(members)} finished"
        now = time.time()
        quiet_for = now - last[0]
        if quiet_for < _PROGRESS_MIN_GAP_S or (text == last[1] and quiet_for < _PROGRESS_EVERY_S):
            return last
        if waiting:
            assert rollout.wave_started is not None
            left = max(0.0, rollout.wave_started + rollout.wave_timeout - now)
            self.say(
                f"  wave {rollout.wave + 1}: {text}; waiting for {names(waiting, 8)} ({left:.0f} s left)"
            )
        return now, text

    def withdraw(self, rollout_id: str) -> list[str]:
        """Clear the desired state of targets that had not finished; returns them."""
        targets = self.store.targets(rollout_id)
        unfinished = sorted(d for d, t in targets.items() if t.state in ("sent", "deferred"))
        if unfinished:
            assign(
                self.assignments, self.feed.client, self.options.prefix, "device", unfinished, None,
                f"abort of {rollout_id}",
            )  # fmt: skip
        self.store.set_targets(rollout_id, dict.fromkeys(unfinished, ("canceled", "rollout aborted")))
        return unfinished
