"""The server's one broker connection: it takes in what boxes publish and publishes desired state.

Statuses, model states and desired states are retained; telemetry is not.  Everything
lands in a ``FleetView`` (the same model the CLI's views use) under a lock; devices whose
status or model state changed are kept for the controller to record in the inventory.
After a reconnection the subscriptions are made again and the retained desired states
read afresh, so a broker that lost them is noticed (``desired_settled``).
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

from agent.link.mqtt import Ack, Message
from edge_contract.errors import LinkError
from edge_contract.protocol import Topics

from ..broker import BrokerOptions, connect_client, publish_retained
from ..fleet_view import FleetView, release_of
from ..follow import outcome
from .store import Seen

log = logging.getLogger(__name__)

# Retained messages arrive right after subscribing; the desired states are trusted this long after.
_SETTLE_S = 3.0


class BrokerLink:
    """A connected client feeding a ``FleetView``."""

    def __init__(self, options: BrokerOptions) -> None:
        self.options = options
        self.prefix = options.prefix
        self.view = FleetView(options.prefix)
        self.lock = threading.Lock()
        self._dirty: set[str] = set()
        self.group_desired: dict[str, str] = {}  # group -> NAME@VERSION of its retained desired state
        self.connected_at = 0.0
        self.messages = 0
        # Every (re)connection subscribes again: the server's session ends with its connection.
        self.client = options.client("edge-fleet-server", on_connect=self._on_connect, on_drop=self._on_drop)
        self.client.route("#", self._on_message)
        connect_client(options, self.client)

    def _topics(self) -> list[tuple[str, int]]:
        every = Topics(self.prefix, "+", None)
        groups = Topics(self.prefix, "-", "+").group_model_desired
        assert groups is not None
        return [
            (every.status, 1),
            (every.model_state, 1),
            (every.telemetry, 0),
            (every.model_desired, 1),
            (groups, 1),
        ]

    def _on_connect(self, _session_present: bool) -> None:
        with self.lock:
            for device in self.view.devices.values():
                device.desired = None  # read afresh: a broker that lost them sends none
            self.group_desired.clear()
            self.connected_at = time.monotonic()
        self.client.subscribe(self._topics()).then(self._subscribed)

    def _subscribed(self, ack: Ack) -> None:
        try:
            refused = [r for r in ack.wait(0) if r is not None]
        except LinkError as exc:  # the connection dropped first: the next one subscribes again
            log.info("fleet server: subscribing was cut short (%s)", exc)
            return
        if refused:
            log.error(
                "fleet server: the broker refused subscriptions of %s (%s): give the server's identity "
                "read access to them (docs/fleet-server.md)",
                ", ".join(t for t, _q in self._topics()), ", ".join(refused),
            )  # fmt: skip

    def _on_drop(self, _reason: str) -> None:
        with self.lock:
            self.connected_at = 0.0

    def _on_message(self, msg: Message) -> None:
        with self.lock:
            self.messages += 1
            parts = msg.topic.split("/")
            if len(parts) == 5 and parts[1] == "groups" and parts[3:] == ["model", "desired"]:
                if msg.payload:
                    self.group_desired[parts[2]] = release_of(msg.payload)
                else:
                    self.group_desired.pop(parts[2], None)
                return
            changed = self.view.feed(msg.topic, msg.payload)
            if changed is not None and changed[1] in ("status", "model"):
                self._dirty.add(changed[0])

    @property
    def connected(self) -> bool:
        """Whether the link is up."""
        return self.connected_at > 0

    def desired_settled(self) -> bool:
        """Whether the retained desired states have had time to arrive since the last (re)connection."""
        return self.connected and time.monotonic() - self.connected_at > _SETTLE_S

    def take_seen(self) -> list[Seen]:
        """What changed since the last call, for the inventory."""
        with self.lock:
            dirty, self._dirty = self._dirty, set()
            seen = []
            for device_id in sorted(dirty):
                device = self.view.devices[device_id]
                if device.status is None and device.model is None:
                    continue
                row = self.view.row(device)
                seen.append(
                    Seen(
                        device_id=device_id, group=row.group, online=row.online,
                        since=device.status.since if device.status else None, model=row.model,
                        version=row.version, health=row.health,
                        agent_version=device.status.agent_version if device.status else None,
                    )
                )  # fmt: skip
            return seen

    def online(self, device: str) -> bool:
        """Whether the device's retained status says online."""
        with self.lock:
            found = self.view.devices.get(device)
            return bool(found and found.status and found.status.online)

    def outcome(self, device: str, name: str, version: str) -> tuple[Any, str | None] | None:
        """``active``/``failed`` once ``device`` reports on ``name@version``."""
        with self.lock:
            return outcome(self.view, device, name, version)

    def desired(self, kind: str, target: str) -> str | None:
        """``NAME@VERSION`` of a device's or group's retained desired state on the broker, as last seen."""
        with self.lock:
            if kind == "group":
                return self.group_desired.get(target)
            found = self.view.devices.get(target)
            return found.desired if found else None

    def publish_desired(self, devices: list[str], payload: bytes) -> None:
        """Publish ``payload`` (empty: cleared) as each device's retained desired state; returns once
        the broker acknowledged every one."""
        publish_retained(
            self.client, [(Topics(self.prefix, d, None).model_desired, payload) for d in devices]
        )

    def publish_assignments(self, messages: list[tuple[str, str, bytes]]) -> None:
        """Publish (kind, target, payload) desired states, device or group, retained; returns once
        the broker acknowledged every one."""
        topics = []
        for kind, target, payload in messages:
            if kind == "device":
                topics.append((Topics(self.prefix, target, None).model_desired, payload))
            else:
                group_topic = Topics(self.prefix, "-", target).group_model_desired
                assert group_topic is not None
                topics.append((group_topic, payload))
        publish_retained(self.client, topics)

    def close(self) -> None:
        """Disconnect."""
        self.client.close()
