"""The operator's model of the fleet, fed by the topics boxes publish.

``FleetView.feed(topic, payload)`` takes every message of
``{prefix}/+/status`` (retained), ``{prefix}/+/model/state`` (retained) and
``{prefix}/+/telemetry``; ``rows`` flattens each device into one ``DeviceRow``
for tables and JSON; ``summary`` counts them.  Messages that do not parse are
counted and ignored: one broken box must not blind the operator to the rest.
"""

from __future__ import annotations

import json
import queue
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

from pydantic import ValidationError

from agent.link.mqtt import SubscribeRefused
from edge_contract.errors import LinkError
from edge_contract.protocol import FleetTopics, ModelState, Status
from edge_contract.telemetry import Telemetry

from .broker import TLS_PORT, BrokerOptions, FleetError, identity_of, open_client

Kind = Literal["status", "model", "telemetry", "desired"]
# Retained messages arrive in one burst right after subscribing; this much quiet ends it.
_RETAINED_QUIET_S = 0.5
#: A SUBACK takes milliseconds; this covers a busy broker.
_SUBACK_S = 10.0


@dataclass
class Device:
    """What is known of one device."""

    device_id: str
    status: Status | None = None
    model: ModelState | None = None
    telemetry: Telemetry | None = None
    desired: str | None = None  # NAME@VERSION of its own retained desired state (when subscribed)
    last_seen: float = 0.0
    offline_since: float | None = None  # when it was seen going offline (else its status's ``since``)


@dataclass(frozen=True)
class DeviceRow:
    """One device, flattened: the columns of ``edge-fleet watch`` and ``status --json``."""

    device: str
    online: bool | None
    group: str | None
    health: str | None
    model: str | None
    version: str | None
    previous: str | None
    update_version: str | None
    update_phase: str | None
    update_progress: float | None
    update_error: str | None
    update_message: str | None
    temp_c: float | None
    mem_available_mb: int | None
    queue: int | None
    tok_s: float | None
    last_seen: float
    offline_since: float | None = None
    revoked: bool = False  # `edge-fleet revoke` published so (retained)
    labels: dict[str, str] = field(default_factory=dict)  # pushed with its membership (a claim's, say)

    def as_json(self) -> dict[str, Any]:
        """The row as a JSON-ready dict."""
        return asdict(self)


@dataclass
class FleetView:
    """Every device seen on the broker under ``prefix``."""

    prefix: str = "edge"
    devices: dict[str, Device] = field(default_factory=dict)
    rejected: int = 0

    def subscriptions(self) -> list[tuple[str, int]]:
        """The topic filters to subscribe to (QoS 1 for the retained ones)."""
        p = self.prefix
        topics = FleetTopics(p)
        return [(topics.any_status, 1), (topics.any_model_state, 1), (topics.any_telemetry, 0)]

    def feed(self, topic: str, payload: bytes) -> tuple[str, Kind] | None:
        """Take one message; returns the device and what changed, or None if it was not for us."""
        parts = topic.split("/")
        if len(parts) < 3 or parts[0] != self.prefix or parts[1] == "groups":
            return None
        device_id, rest = parts[1], parts[2:]
        kind: Kind
        try:
            if rest == ["status"]:
                kind = "status"
                value: Any = Status.model_validate_json(payload) if payload else None
            elif rest == ["model", "state"]:
                kind = "model"
                value = ModelState.model_validate_json(payload) if payload else None
            elif rest == ["telemetry"]:
                kind = "telemetry"
                value = Telemetry.model_validate_json(payload)
            elif rest == ["model", "desired"]:
                kind = "desired"
                value = release_of(payload) if payload else None
            else:
                return None
        except ValidationError:
            self.rejected += 1
            return None
        device = self.devices.get(device_id)
        if device is None:
            device = self.devices[device_id] = Device(device_id)
        if kind == "status":
            was_online = device.status is not None and device.status.online
            if value is not None and not value.online:
                device.offline_since = time.time() if was_online else value.since
            else:
                device.offline_since = None
        setattr(device, kind, value)
        if kind != "desired":  # (an operator's message, not the device's)
            device.last_seen = time.time()
        return device_id, kind

    def row(self, device: Device) -> DeviceRow:
        """One device, flattened."""
        status, state, tele = device.status, device.model, device.telemetry
        active = state.active if state and state.active else (status.model if status else None)
        update = state.update if state else None
        health = None
        if status is None or status.online:  # an offline box's last verdict is stale
            verdict = tele.health if tele and tele.health else (status.health if status else None)
            health = verdict.verdict if verdict else None
        temp = None
        if tele is not None:
            temp = tele.temperature.soc_c if tele.temperature.soc_c is not None else tele.temperature.max_c
        return DeviceRow(
            device=device.device_id,
            online=status.online if status else None,
            group=status.group if status else None,
            health=health,
            model=active.name if active else None,
            version=active.version if active else None,
            previous=state.previous.version if state and state.previous else None,
            update_version=update.version if update else None,
            update_phase=update.phase if update else None,
            update_progress=update.progress if update else None,
            update_error=update.error.code if update and update.error else None,
            update_message=update.error.message if update and update.error else None,
            temp_c=temp,
            mem_available_mb=tele.memory.available_mb if tele else None,
            queue=tele.jobs.queue_depth if tele else None,
            tok_s=tele.jobs.decode_tok_s if tele else None,
            last_seen=device.last_seen,
            offline_since=device.offline_since if status is not None and not status.online else None,
            labels=dict(status.labels) if status else {},
            revoked=bool(status and status.revoked),
        )

    def rows(self, group: str | None = None) -> list[DeviceRow]:
        """Every device (of ``group``), sorted by id."""
        found = []
        for device_id in sorted(self.devices):
            device = self.devices[device_id]
            if device.last_seen == 0.0:
                continue  # only an operator's desired state: not a device seen
            if group is not None and (device.status is None or device.status.group != group):
                continue
            found.append(self.row(device))
        return found

    @staticmethod
    def summary(rows: list[DeviceRow]) -> dict[str, int]:
        """Counts for the header of the live view."""
        phases = Counter(r.update_phase for r in rows)
        return {
            "devices": len(rows),
            "online": sum(1 for r in rows if r.online),
            **({"revoked": revoked} if (revoked := sum(1 for r in rows if r.revoked)) else {}),
            "degraded": sum(1 for r in rows if r.health == "degraded"),
            "updating": sum(phases[p] for p in ("downloading", "verifying", "testing", "activating")),
            "failed": phases["failed"] + phases["rolled_back"],
        }


def release_of(payload: bytes) -> str:
    """``NAME@VERSION`` of a desired-state manifest (without checking it: only for display)."""
    try:
        data = json.loads(payload)
        return f"{data['name']}@{data['version']}"
    except (ValueError, KeyError, TypeError):
        return "(unreadable manifest)"


class FleetFeed:
    """A broker connection that fills a ``FleetView``; ``pump`` moves messages in on the caller's thread."""

    def __init__(self, options: BrokerOptions, *, telemetry: bool, desired: bool = False) -> None:
        self.view = FleetView(options.prefix)
        self.client = open_client(options, name="edge-fleet")
        subscriptions = self.view.subscriptions()
        if not telemetry:
            subscriptions = [s for s in subscriptions if s[0] != FleetTopics(options.prefix).any_telemetry]
        if desired:
            subscriptions.append((FleetTopics(options.prefix).any_model_desired, 1))
        try:
            self.client.subscribed(subscriptions, timeout=_SUBACK_S)
        except LinkError as exc:
            self.close()
            host, port = options.address
            why = exc.reason if isinstance(exc, SubscribeRefused) else f"no answer within {_SUBACK_S:.0f} s"
            raise FleetError(
                f"the broker at {host}:{port} refused to show the fleet's status ({why}): not authorized as "
                f"{identity_of(options)} — is {port} the devices' listener? Operators' tools use the "
                f"operators' port (--broker {host}:{TLS_PORT}) with an operator certificate"
            ) from exc

    def pump(self, wait: float) -> int:
        """Feed what arrived (waiting up to ``wait`` for the first); returns how many."""
        count = 0
        try:
            msg = self.client.messages.get(timeout=wait)
            while True:
                self.view.feed(msg.topic, msg.payload)
                count += 1
                msg = self.client.messages.get_nowait()
        except queue.Empty:
            return count

    def settle(self, limit: float) -> None:
        """Take in the retained burst after subscribing (until it pauses, or ``limit`` seconds)."""
        start = last = time.monotonic()
        while time.monotonic() - start < limit:
            if self.pump(0.05):
                last = time.monotonic()
            elif self.view.devices and time.monotonic() - last > _RETAINED_QUIET_S:
                return

    def close(self) -> None:
        """Disconnect."""
        self.client.close()
