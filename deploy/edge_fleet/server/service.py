"""What the API asks of the fleet: start, abort, resume and roll back rollouts.

Each change is recorded with its audit entry in one transaction, before anything is
published.  The rollouts themselves are driven by the controller (``controller``).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from edge_contract.manifest import Manifest

from ..domain import selector as sel
from ..domain.evaluate import FAILED
from ..errors import FleetError
from ..releases import check_deployable
from ..rollout_store import plan_waves, rollout_id_of
from .broker_link import BrokerLink
from .rollouts_table import Rollout, RolloutsTable
from .store import DeviceRecord, Store


def facts_of(device: DeviceRecord) -> dict[str, str | None]:
    """What a box reports of itself, for selectors (``model=phi3-mini``, ``agent_version=0.1.0``)."""
    return {"model": device.model, "version": device.version, "agent_version": device.agent_version}


class NotFound(FleetError):
    """What a request names does not exist."""


class Conflict(FleetError):
    """The request contradicts the state (a rollout with the same id and another release, …)."""


@dataclass(frozen=True)
class RolloutRequest:
    """A new rollout, as the API takes it."""

    manifest: bytes
    group: str | None
    select: str | None
    waves: list[float]
    canary: int
    wave_timeout: float
    max_failure_rate: float
    max_parallel: int
    min_devices: int
    resume_on_recovery: bool
    defer_offline: bool = False


def selector_rollout_id(manifest: Manifest, selector: str) -> str:
    """``NAME@VERSION/select:TERMS`` (terms normalized); a rollback release adds ``/rollback-SIGNED_AT``."""
    suffix = f"/rollback-{manifest.created_at}" if manifest.rollback else ""
    return f"{manifest.release_id}/select:{sel.normalize(selector)}{suffix}"


class FleetService:
    """The operations behind the API's mutating calls."""

    def __init__(self, store: Store, link: BrokerLink | None) -> None:
        self.store = store
        self.rollouts = RolloutsTable(store.db)
        self.link = link

    # -- reading --------------------------------------------------------------------------------

    def matching(self, terms: tuple[sel.Term, ...]) -> list[str]:
        """Devices of the inventory a selector matches, online ones first, then by id."""
        found = [d for d in self.store.devices() if sel.matches(terms, d.labels, d.group, facts_of(d))]
        return [
            d.device_id
            for d in sorted(found, key=lambda d: (not self.online(d.device_id, d.online), d.device_id))
        ]

    def online(self, device: str, recorded: bool | None = None) -> bool:
        """Online as the broker says now (else as last recorded)."""
        if self.link is not None and self.link.connected:
            return self.link.online(device)
        return bool(recorded)

    def running(self, device: str) -> str | None:
        """``NAME@VERSION`` the device runs, as far as is known."""
        found = self.store.device(device)
        return f"{found.model}@{found.version}" if found and found.model else None

    def rollout(self, rollout_id: str) -> Rollout:
        """One rollout, or ``NotFound``."""
        found = self.rollouts.get(rollout_id)
        if found is None:
            raise NotFound(f"no rollout {rollout_id!r} (GET /api/v1/rollouts lists them)")
        return found

    # -- changing -------------------------------------------------------------------------------

    def create_rollout(self, request: RolloutRequest, actor: str) -> tuple[Rollout, bool]:
        """Record a rollout (the controller drives it); returns it and whether it is new."""
        try:
            manifest = check_deployable(Manifest.parse(request.manifest), "the manifest")
        except ValueError as exc:
            raise FleetError(f"the manifest does not parse: {exc}") from None
        if (request.group is None) == (request.select is None):
            raise FleetError("give exactly one of group and select")
        if request.group is not None:
            terms = sel.parse(f"group={request.group}")
            rollout_id = rollout_id_of(manifest, request.group)
        else:
            assert request.select is not None
            terms = sel.parse(request.select)
            rollout_id = selector_rollout_id(manifest, request.select)
        if not 0 <= request.max_failure_rate <= 1:
            raise FleetError("max_failure_rate must lie in [0, 1]")
        payload = manifest.model_dump_json().encode()
        digest = self.store.remember(payload)
        existing = self.rollouts.get(rollout_id)
        if existing is not None:
            if existing.digest != digest:
                raise Conflict(f"rollout {rollout_id} exists with another manifest: sign a new version")
            return existing, False
        devices = self.matching(terms)
        if not devices:
            what = f"group {request.group!r}" if request.group else f"selector {request.select!r}"
            raise FleetError(
                f"no device of the inventory matches {what} (GET /api/v1/devices lists devices with their "
                "labels and groups; set labels with PATCH /api/v1/devices/ID/labels)"
            )
        canary = min(request.canary, len(devices))
        plan = [devices[:canary]] if canary else []
        plan += [w for w in plan_waves(devices[canary:], request.waves, max(1, request.min_devices)) if w]
        now = time.time()
        rollout = Rollout(
            id=rollout_id, release=manifest.release_id, digest=digest, selector=",".join(map(str, terms)),
            group=request.group, waves=request.waves, canary=int(canary > 0),
            wave_timeout=request.wave_timeout, max_failure_rate=request.max_failure_rate,
            max_parallel=request.max_parallel, resume_on_recovery=request.resume_on_recovery, state="running",
            wave=0, accepted_failures=0, reason=None, rollback_of=None, created=now, created_by=actor,
            updated=now, leader=None, defer_offline=request.defer_offline,
        )  # fmt: skip
        # The stored wave list is the plan's (empty percentages dropped), so waves and targets agree.
        rollout = _with_waves(rollout, len(plan) - rollout.canary)
        with self.store.db.transaction():
            self.rollouts.create(rollout, [[(d, self.running(d), None) for d in wave] for wave in plan])
            self.store.audit(actor, "rollout.create", rollout_id, {
                "release": manifest.release_id, "selector": rollout.selector, "devices": len(devices),
                "waves": [len(w) for w in plan], "canary": canary,
            })  # fmt: skip
            self.rollouts.event(rollout_id, f"created by {actor}: {len(devices)} devices in waves of "
                                + ", ".join(str(len(w)) for w in plan) + (" (the first is the canary)" if canary else ""))  # fmt: skip
        return self.rollout(rollout_id), True

    def abort(self, rollout_id: str, actor: str) -> list[str]:
        """Stop a rollout for good; withdraw the desired state of devices that had not finished."""
        rollout = self.rollout(rollout_id)
        if rollout.state in ("done", "aborted"):
            raise Conflict(f"rollout {rollout_id} is already {rollout.state}: there is nothing to abort")
        with self.store.db.transaction():
            self.rollouts.update(rollout_id, state="aborted", reason=f"aborted by {actor}")
            unfinished = sorted(
                d for d, t in self.rollouts.targets(rollout_id).items() if t.state in ("sent", "deferred")
            )
            self.store.record_assignment("device", unfinished, None, f"abort of {rollout_id}", actor)
            self.rollouts.mark(rollout_id, dict.fromkeys(unfinished, ("canceled", "rollout aborted")))
            self.store.audit(actor, "rollout.abort", rollout_id, {"withdrawn": unfinished})
            self.rollouts.event(
                rollout_id, f"ABORTED by {actor}; desired state withdrawn from {len(unfinished)} devices"
            )
        if unfinished and self.link is not None:
            self.link.publish_desired(unfinished, b"")
        return unfinished

    def resume(self, rollout_id: str, actor: str) -> Rollout:
        """Continue a halted rollout (the failures of its current wave so far are accepted)."""
        rollout = self.rollout(rollout_id)
        if rollout.state == "aborted":
            raise Conflict(
                f"rollout {rollout_id} was aborted, and an abort is final: to try again, sign a new version "
                "and roll that out"
            )
        if rollout.state != "halted":
            return rollout
        failures = sum(
            1
            for t in self.rollouts.targets(rollout_id).values()
            if t.wave == rollout.wave and t.state in FAILED
        )
        with self.store.db.transaction():
            self.rollouts.update(
                rollout_id, only_if=("halted",), state="running", reason=None, accepted_failures=failures
            )
            self.store.audit(actor, "rollout.resume", rollout_id, {"accepted_failures": failures})
            self.rollouts.event(rollout_id, f"resumed by {actor} ({failures} failures so far accepted)")
        return self.rollout(rollout_id)

    def rollback(
        self, rollout_id: str, manifests: list[bytes], waves: list[float], actor: str, **policy: float
    ) -> tuple[Rollout, bool]:
        """Return the devices ``rollout_id`` touched to what each ran before, with the signed rollback
        ``manifests`` (one per earlier release); its id is ``ID/rollback``."""
        rollout = self.rollout(rollout_id)
        back_id = f"{rollout_id}/rollback"
        existing = self.rollouts.get(back_id)
        if existing is not None:
            return existing, False
        if rollout.state == "running":
            raise Conflict(f"rollout {rollout_id} is still running: abort it first")
        by_release: dict[str, str] = {}
        for payload in manifests:
            manifest = check_deployable(Manifest.parse(payload), "a rollback manifest")
            if not manifest.rollback:
                raise FleetError(f"{manifest.release_id} is not a rollback release (edge-fleet signs them)")
            by_release[manifest.release_id] = self.store.remember(manifest.model_dump_json().encode())
        touched = {
            d: t for d, t in self.rollouts.targets(rollout_id).items() if t.state != "pending" and t.before
        }
        missing = sorted({t.before for t in touched.values() if t.before and t.before not in by_release})
        if missing:
            raise FleetError(f"no signed rollback manifest given for {', '.join(map(str, missing))}")
        if not touched:
            raise FleetError(
                f"rollout {rollout_id} sent its release to no device with a known earlier release"
            )
        order = sorted(touched, key=lambda d: (touched[d].wave, d))
        plan = plan_waves(order, waves, 1)
        first = by_release[touched[order[0]].before or ""]
        now = time.time()
        back = Rollout(
            id=back_id, release=self.store.db.one("SELECT release FROM releases WHERE digest = ?", (first,))[0],  # type: ignore[index]
            digest=first, selector="", group=rollout.group, waves=waves[: len(plan)], canary=0,
            wave_timeout=float(policy.get("wave_timeout", rollout.wave_timeout)),
            max_failure_rate=float(policy.get("max_failure_rate", rollout.max_failure_rate)), max_parallel=rollout.max_parallel,
            resume_on_recovery=False, state="running", wave=0, accepted_failures=0, reason=None, rollback_of=rollout_id,
            created=now, created_by=actor, updated=now, leader=None,
        )  # fmt: skip
        back = _with_waves(back, len(plan))
        with self.store.db.transaction():
            self.rollouts.create(
                back, [[(d, self.running(d), by_release[touched[d].before or ""]) for d in w] for w in plan]
            )
            self.store.audit(
                actor, "rollout.rollback", rollout_id, {"rollback": back_id, "devices": len(order)}
            )
            self.rollouts.event(
                back_id,
                f"created by {actor}: {len(order)} devices back in waves of "
                + ", ".join(str(len(w)) for w in plan),
            )
        return self.rollout(back_id), True


class Deployments:
    """``deploy`` and ``reconcile`` on the server: desired state set directly, without waves."""

    def __init__(self, service: FleetService) -> None:
        self.service = service
        self.store = service.store

    def deploy(
        self, kind: str, target: str, payload: bytes | None, override: bool, actor: str
    ) -> dict[str, object]:
        """Record, then publish, ``payload`` (None: cleared) as the desired state of a device or a
        group; a group's devices with their own desired state are refused unless ``override``."""
        digest = release = None
        if payload is not None:
            try:
                manifest = check_deployable(Manifest.parse(payload), "the manifest")
            except ValueError as exc:
                raise FleetError(f"the manifest does not parse: {exc}") from None
            payload = manifest.model_dump_json().encode()
            digest, release = self.store.remember(payload), manifest.release_id
        cleared: list[str] = []
        followers = [target]
        if kind == "group":
            followers = [d.device_id for d in self.store.devices() if d.group == target]
            own = {
                a["target"]: a["release"] for a in self.store.current_assignments() if a["kind"] == "device"
            }
            shadowed = sorted(d for d in followers if own.get(d))
            if shadowed and not override:
                raise Conflict(
                    f"deploy to group {target} refused: {len(shadowed)} of its devices have their own desired "
                    f"state, which wins over the group's: {', '.join(shadowed)}. Pass override to clear theirs"
                )
            cleared = shadowed
        with self.store.db.transaction():
            if cleared:
                self.store.record_assignment(
                    "device", cleared, None, f"override by deploy of group {target}", actor
                )
            self.store.record_assignment(kind, [target], digest, "deploy", actor)
            self.store.audit(actor, "deploy", f"{kind} {target}", {"release": release, "cleared": cleared})
        link = self.service.link
        if link is not None:
            messages = [("device", d, b"") for d in cleared] + [(kind, target, payload or b"")]
            link.publish_assignments(messages)
        return {
            "kind": kind,
            "target": target,
            "release": release,
            "cleared": cleared,
            "followers": followers,
        }

    def reconcile(self, actor: str) -> dict[str, int]:
        """Publish every recorded desired state again; counts by kind and cleared."""
        counts = {"device": 0, "group": 0, "cleared": 0}
        messages = []
        for a in self.store.current_assignments():
            payload = self.store.manifest(a["digest"]) if a["digest"] else b""
            if payload is None:
                raise FleetError(f"the database lost the manifest of {a['release']}")
            messages.append((a["kind"], a["target"], payload))
            counts[a["kind"] if payload else "cleared"] += 1
        if not messages:
            raise FleetError("no desired state is recorded on this server: nothing to publish")
        if self.service.link is None:
            raise FleetError("this server has no broker link")
        self.service.link.publish_assignments(messages)
        self.store.audit(actor, "reconcile", "*", counts)
        return counts


def _with_waves(rollout: Rollout, count: int) -> Rollout:
    from dataclasses import replace

    return replace(
        rollout,
        waves=rollout.waves[:count]
        if len(rollout.waves) >= count
        else rollout.waves + [100.0] * (count - len(rollout.waves)),
    )
