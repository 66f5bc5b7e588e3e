"""The control loop: every tick it records what the broker said, then, for each rollout this
server holds the lease of, asks ``evaluate`` what to do and does it; now and then it checks
that the broker still holds every recorded desired state (continuous reconcile).

Applying a ``Send`` records the assignment, publishes the very same signed manifest (retained)
and then marks the targets ``sent``: after a ``kill -9`` in between, the next tick publishes
the identical message again, which a box that already has it ignores.  Nothing a box sees is
ever a new release because of a restart.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field

from edge_contract.manifest import Manifest

from ..domain import selector as sel
from ..domain.evaluate import (
    Action,
    Advance,
    Event,
    Join,
    Mark,
    Observation,
    Observations,
    Send,
    SetState,
    TargetState,
    evaluate,
)
from .broker_link import BrokerLink
from .rollouts_table import ACTIVE, Rollout, RolloutsTable
from .service import FleetService

log = logging.getLogger("edge_fleet.server")
_RECONCILE_EVERY_S = 30.0
_MATCH_EVERY_S = 5.0


@dataclass
class ControllerStats:
    """What the loop did (for /healthz and /metrics)."""

    ticks: int = 0
    leading: set[str] = field(default_factory=set)
    republished: int = 0
    last_error: str | None = None


class Controller:
    """Drives every active rollout this server leads; ``run`` loops until ``stop``."""

    def __init__(
        self, service: FleetService, link: BrokerLink, server_id: str, *, tick_s: float = 0.5
    ) -> None:
        self.service = service
        self.store = service.store
        self.rollouts: RolloutsTable = service.rollouts
        self.link = link
        self.server_id = server_id
        self.tick_s = tick_s
        self.stats = ControllerStats()
        self._stop = threading.Event()
        self._manifests: dict[str, Manifest] = {}
        self._next_reconcile = 0.0
        self._reconciled_for = -1.0
        self._matches: dict[str, tuple[float, tuple[str, ...]]] = {}

    def stop(self) -> None:
        """End ``run`` after the current tick."""
        self._stop.set()

    def run(self) -> None:
        """Tick until stopped; an error in one tick is logged and the loop goes on."""
        while not self._stop.is_set():
            try:
                self.tick()
                self.stats.last_error = None
            except Exception as exc:  # one bad tick must not stop every rollout
                self.stats.last_error = str(exc)
                log.exception("controller tick failed")
            self._stop.wait(self.tick_s)
        self.rollouts.release_leases(self.server_id)

    def tick(self) -> None:
        """One pass."""
        self.stats.ticks += 1
        seen = self.link.take_seen()
        if seen:
            self.store.observe(seen)
        now = time.time()
        leading = set()
        for rollout in self.rollouts.all(ACTIVE):
            if self.rollouts.lease(rollout.id, self.server_id, now):
                leading.add(rollout.id)
                self.step(rollout, now)
        self.stats.leading = leading
        # Soon after every (re)connection, then every _RECONCILE_EVERY_S.
        fresh = self.link.connected_at != self._reconciled_for
        if self.link.desired_settled() and (fresh or time.monotonic() >= self._next_reconcile):
            self._reconciled_for = self.link.connected_at
            self._next_reconcile = time.monotonic() + _RECONCILE_EVERY_S
            self.reconcile()

    def _manifest(self, digest: str) -> Manifest:
        if digest not in self._manifests:
            payload = self.store.manifest(digest)
            if payload is None:
                raise RuntimeError(f"the database lost the manifest {digest}")
            self._manifests[digest] = Manifest.parse(payload)
        return self._manifests[digest]

    def _matching(self, rollout: Rollout) -> tuple[str, ...]:
        """The devices the rollout's selector matches now (read again every ``_MATCH_EVERY_S``: joining
        a rollout is not urgent, and the whole inventory is read for it)."""
        at, found = self._matches.get(rollout.id, (0.0, ()))
        if time.monotonic() - at > _MATCH_EVERY_S:
            found = tuple(self.service.matching(sel.parse(rollout.selector)))
            self._matches[rollout.id] = (time.monotonic(), found)
        return found

    def step(self, rollout: Rollout, now: float) -> None:
        """Evaluate one rollout and apply the actions."""
        targets = self.rollouts.targets(rollout.id)
        devices = {}
        for device, target in targets.items():
            manifest = self._manifest(target.digest or rollout.digest)
            devices[device] = Observation(
                online=self.link.online(device),
                outcome=self.link.outcome(device, manifest.name, manifest.version),
            )
        matching = None
        if rollout.rollback_of is None and rollout.state == "running":
            matching = self._matching(rollout)
        actions = evaluate(
            rollout.view(), {d: t.view() for d, t in targets.items()}, Observations(now, devices, matching)
        )
        self.apply(rollout, actions, now)

    def apply(self, rollout: Rollout, actions: list[Action], now: float) -> None:
        """Do what ``evaluate`` decided, in order."""
        targets = self.rollouts.targets(rollout.id)
        for action in actions:
            if isinstance(action, Mark):
                self.rollouts.mark(rollout.id, action.changes)
            elif isinstance(action, Send):
                own = {d: targets[d].digest if d in targets else None for d in action.devices}
                self._send(rollout, list(action.devices), own, now, deferred=set(action.deferred))
            elif isinstance(action, Join):
                self.rollouts.join(
                    rollout.id, [(d, self.service.running(d)) for d in action.devices], action.wave
                )
            elif isinstance(action, Advance):
                self.rollouts.update(rollout.id, only_if=("running",), wave=action.wave, accepted_failures=0)
            elif isinstance(action, SetState):
                self.rollouts.update(
                    rollout.id, only_if=(rollout.state,), state=action.state, reason=action.reason
                )
            elif isinstance(action, Event):
                self.rollouts.event(rollout.id, action.text)

    def _send(
        self,
        rollout: Rollout,
        devices: list[str],
        own: dict[str, str | None],
        now: float,
        *,
        deferred: set[str],
    ) -> None:
        by_digest: dict[str, list[str]] = {}
        for device in devices:
            by_digest.setdefault(own.get(device) or rollout.digest, []).append(device)
        for digest, group in by_digest.items():
            payload = self.store.manifest(digest)
            assert payload is not None
            self.store.record_assignment("device", group, digest, f"rollout {rollout.id}", rollout.created_by)
            self.link.publish_desired(group, payload)
        states: dict[str, tuple[TargetState, str | None]] = {
            d: ("deferred" if d in deferred else "sent", None) for d in devices
        }
        self.rollouts.mark(rollout.id, states, sent_at=now)

    def reconcile(self) -> int:
        """Publish again every recorded desired state (device or group) the broker does not hold, or
        holds another of; returns how many."""
        stale = []
        for a in self.store.current_assignments():
            if a["digest"] is not None and self.link.desired(a["kind"], a["target"]) != a["release"]:
                payload = self.store.manifest(a["digest"])
                if payload is not None:
                    stale.append((a["kind"], a["target"], payload))
        if stale:
            self.link.publish_assignments(stale)
            self.stats.republished += len(stale)
            log.warning("reconcile: published %d desired states again (the broker had lost them)", len(stale))
        return len(stale)
