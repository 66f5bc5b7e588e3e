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
from typing import Any

from edge_contract.manifest import Manifest

from .assignments import Assignments, assign
from .broker import BrokerOptions, FleetError
from .fleet_view import FleetFeed
from .follow import outcome
from .inventory import DISCOVERY_MAX_S, Inventory
from .rollout_store import (
    FAILED,
    FINISHED,
    OPEN,
    Rollout,
    RolloutState,
    RolloutStore,
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

    def outcome(self, device: str, manifest: Manifest) -> tuple[TargetState, str | None] | None:
        """``active``/``failed`` once the device reports on ``manifest``, else None."""
        return outcome(self.view, device, manifest.name, manifest.version)

    def refresh(self, rollout: Rollout) -> int:
        """Read the outcome of targets still open (``sent``, ``deferred``, ``timed_out``) from the
        broker; a ``waiting`` rollout whose deferred devices all reported becomes ``done``.
        Returns how many targets changed."""
        changes: dict[str, tuple[TargetState, str | None]] = {}
        for device, target in self.store.targets(rollout.id).items():
            if target.state in OPEN:
                manifest, _payload = self._load(rollout, target.digest)
                outcome = self.outcome(device, manifest)
                if outcome is not None and outcome[0] != target.state:
                    changes[device] = outcome
        self.store.set_targets(rollout.id, changes, only_from=OPEN)
        if rollout.state == "waiting" and not any(
            t.state == "deferred" for t in self.store.targets(rollout.id).values()
        ):
            self.store.update(rollout.id, only_if=("waiting",), state="done", reason=None)
        return len(changes)

    # -- the loop ------------------------------------------------------------------------------

    def run(self, rollout_id: str, poll_s: float = 0.2) -> RolloutState:
        """Drive the rollout; returns its final state (``done``, ``waiting``, ``halted`` or ``aborted``)."""
        rollout = self.store.get(rollout_id)
        assert rollout is not None
        waves = len(rollout.waves)
        last_progress = (0.0, "")
        while True:
            rollout = self.store.get(rollout_id)
            assert rollout is not None
            if rollout.state != "running":
                return rollout.state
            targets = self.store.targets(rollout_id)
            wave = rollout.wave
            if wave >= waves:
                return self._finish(rollout)
            members = [d for d, t in targets.items() if t.wave == wave]
            if rollout.wave_started is None:
                offline = [d for d in members if not self.online(d)]
                listed = names([d + (" (offline)" if d in offline else "") for d in members])
                self.say(
                    f"rollout {rollout_id}: wave {wave + 1}/{waves} ({rollout.waves[wave]:g}%), "
                    f"{len(members)} devices: {listed}"
                )
                pending = [d for d in members if targets[d].state == "pending"]
                deferred = [d for d in pending if d in offline] if rollout.defer_offline else []
                self._send(rollout, [d for d in pending if d not in deferred], "sent")
                if deferred:
                    self._send(rollout, deferred, "deferred")
                    self.say(
                        f"  deferred (offline; they get the release when they return): {names(deferred)}"
                    )
                self.store.update(rollout_id, only_if=("running",), wave_started=time.time())
                continue
            self.feed.pump(poll_s)
            if self._take_in_joined(rollout, targets, wave, waves):
                continue
            changes: dict[str, tuple[TargetState, str | None]] = {}
            for device, target in targets.items():
                if target.wave <= wave and target.state in ("sent", "deferred"):
                    manifest, _payload = self._load(rollout, target.digest)
                    outcome = self.outcome(device, manifest)
                    if outcome is not None:
                        changes[device] = outcome
            assert rollout.wave_started is not None
            timed_out = time.time() > rollout.wave_started + rollout.wave_timeout
            if timed_out:
                for device in members:
                    if targets[device].state == "sent" and device not in changes:
                        why = "offline" if not self.online(device) else "no answer"
                        changes[device] = (
                            "timed_out",
                            f"{why} within the wave timeout of {rollout.wave_timeout:g} s",
                        )
            self.store.set_targets(rollout_id, changes)
            for device, (state, detail) in sorted(changes.items()):
                self.say(f"  {device}: {state}" + (f" — {detail}" if detail else ""))
            targets = self.store.targets(rollout_id)
            last_progress = self._progress(rollout, targets, members, last_progress)
            in_play = [t.state for t in targets.values() if t.wave <= wave]
            failures = sum(1 for s in in_play if s in FAILED) - rollout.accepted_failures
            if failures > rollout.max_failure_rate * len(in_play):
                span = f"wave {wave + 1}" if wave == 0 else f"waves 1-{wave + 1}"
                reason = (
                    f"{failures} of {len(in_play)} devices in {span} failed "
                    f"(limit {rollout.max_failure_rate:.0%})"
                )
                self.store.update(rollout_id, only_if=("running",), state="halted", reason=reason)
                self.say(f"rollout {rollout_id}: HALTED — {reason}")
                return "halted"
            if all(targets[d].state in (*FINISHED, "deferred") for d in members):
                self.say(
                    f"rollout {rollout_id}: wave {wave + 1} finished — {tally(self.store.counts(rollout_id))}"
                )
                self.store.update(rollout_id, only_if=("running",), wave=wave + 1, wave_started=None)

    def _take_in_joined(self, rollout: Rollout, targets: dict[str, Any], wave: int, waves: int) -> bool:
        """Devices that joined the group meanwhile get the release too: with the next wave, or at once
        during the last one.  Returns whether any did."""
        if rollout.rollback_of is not None:  # a rollback concerns exactly the devices it was planned for
            return False
        joined = [
            d.device_id
            for d in self.view.devices.values()
            if d.status is not None and d.status.group == rollout.group and d.device_id not in targets
        ]
        if not joined:
            return False
        into = min(wave + 1, waves - 1)
        self.store.add_targets(rollout.id, [(d, self.running(d)) for d in joined], into)
        if into == wave:
            self._send(rollout, joined, "sent")
        self.say(f"  {', '.join(sorted(joined))} joined {rollout.group}: added to wave {into + 1}")
        return True

    def _progress(
        self, rollout: Rollout, targets: dict[str, Any], members: list[str], last: tuple[float, str]
    ) -> tuple[float, str]:
        """A line on the wave when its counts change, or every ``_PROGRESS_EVERY_S`` seconds."""
        finished = [d for d in members if targets[d].state in FINISHED]
        waiting = [d for d in members if targets[d].state == "sent"]
        text = f"{len(finished)} of {len(members)} finished"
        now = time.time()
        if text == last[1] and now - last[0] < _PROGRESS_EVERY_S:
            return last
        if waiting:
            assert rollout.wave_started is not None
            left = max(0.0, rollout.wave_started + rollout.wave_timeout - now)
            self.say(
                f"  wave {rollout.wave + 1}: {text}; waiting for {names(waiting, 8)} ({left:.0f} s left)"
            )
        return now, text

    def _finish(self, rollout: Rollout) -> RolloutState:
        targets = self.store.targets(rollout.id)
        deferred = sorted(d for d, t in targets.items() if t.state == "deferred")
        if deferred:
            reason = f"{len(deferred)} deferred devices have not reported yet: {names(deferred)}"
            self.store.update(rollout.id, only_if=("running",), state="waiting", reason=reason)
            self.say(
                f"rollout {rollout.id}: NOT DONE — {tally(self.store.counts(rollout.id))}; {reason} "
                f"(`edge-fleet rollout status {rollout.id}` tracks them)"
            )
            return "waiting"
        self.store.update(rollout.id, only_if=("running",), state="done", reason=None)
        self.say(f"rollout {rollout.id}: done — {tally(self.store.counts(rollout.id))}")
        return "done"

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
