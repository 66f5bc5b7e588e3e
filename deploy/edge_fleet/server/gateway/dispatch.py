"""The gateway's own MQTT 5 connection: it sends jobs to boxes and hands their replies back.

Each job carries the gateway's response topic (under ``{prefix}/replies/``, the subtree the
shipped ACL opens to callers) and a fresh correlation id; replies go to the ``sink`` the
request registered (called on paho's thread: the sink hands them to the request's event
loop).  The connection also follows every box's retained status, so a box that goes offline
(its Last Will, at once after a ``kill -9``) is told to the requests waiting on it —
``OFFLINE`` — rather than leaving them to time out; and a dropped broker connection is
told to every waiting request — ``LINK_DOWN``.  Jobs are published with a message expiry, so
one left in an offline box's session does not run long after its client gave up.
"""

from __future__ import annotations

import logging
import threading
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from pydantic import ValidationError

from agent.link.mqtt import no_delay
from edge_contract.protocol import REPLY, CancelRequest, Chunk, FleetTopics, JobRequest, Result, Status

from ...broker import BrokerOptions, release

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Offline:
    """The box went offline (its retained status says so)."""

    device_id: str


@dataclass(frozen=True)
class LinkDown:
    """The gateway's broker connection dropped: replies may be lost."""

    reason: str


Item = Chunk | Result | Offline | LinkDown
Sink = Callable[[Item], None]


class Dispatcher:
    """One MQTT 5 client for every job of the gateway."""

    def __init__(self, options: BrokerOptions, *, expiry_s: int = 60) -> None:
        self.prefix = options.prefix
        self.expiry_s = expiry_s
        self._fleet = FleetTopics(options.prefix)
        self._reply_topic = self._fleet.reply(f"gateway-{uuid.uuid4().hex}")
        self._lock = threading.Lock()
        self._jobs: dict[bytes, tuple[str, Sink]] = {}  # correlation -> (device, sink)
        self._offline: set[str] = set()  # boxes whose last retained status said offline
        self.connected = threading.Event()
        self.client = paho.Client(
            CallbackAPIVersion.VERSION2,
            client_id=f"edge-fleet-gateway-{uuid.uuid4().hex[:12]}",
            protocol=MQTTProtocolVersion.MQTTv5,
        )
        self.client.on_socket_open = no_delay
        options.configure(self.client)
        self.client.on_connect = self._on_connect
        self.client.on_disconnect = self._on_disconnect
        self.client.on_message = self._on_message
        self.client.on_subscribe = self._on_subscribe
        host, port = options.address
        self.client.connect_async(host, port)
        self.client.loop_start()

    def _on_connect(self, client: paho.Client, _u: Any, _f: Any, reason: Any, _p: Any) -> None:
        if reason.is_failure:
            log.error("gateway: the broker refused the connection (%s)", reason)
            return
        client.subscribe([(self._reply_topic, 1), (self._fleet.any_status, 1)])

    def _on_subscribe(self, _c: paho.Client, _u: Any, _mid: int, reasons: list[Any], _p: Any) -> None:
        refused = [str(r) for r in reasons if r.is_failure]
        if refused:  # replies would never come: say so, and take no job
            log.error(
                "gateway: the broker refused the subscriptions to %s and %s (%s): give the server's "
                "identity read access to them (docs/fleet-server.md)",
                self._reply_topic, self._fleet.any_status, ", ".join(refused),
            )  # fmt: skip
            return
        self.connected.set()

    def _on_disconnect(self, *_a: Any) -> None:
        self.connected.clear()
        with self._lock:
            waiting = list(self._jobs.values())
        for _device, sink in waiting:
            sink(LinkDown("the fleet server lost its broker connection"))

    def _on_message(self, _c: paho.Client, _u: Any, msg: paho.MQTTMessage) -> None:
        try:
            if msg.topic == self._reply_topic:
                self._reply(msg)
            elif msg.topic.endswith("/status"):
                self._status(msg.topic.split("/")[-2], bytes(msg.payload))
        except Exception:  # a bad message must not end paho's thread
            log.exception("gateway: cannot take a message on %s", msg.topic)

    def _reply(self, msg: paho.MQTTMessage) -> None:
        correlation = getattr(getattr(msg, "properties", None), "CorrelationData", None)
        with self._lock:
            found = self._jobs.get(bytes(correlation or b""))
        if found is None:
            return  # a job given up on (or a duplicate after its result)
        try:
            reply = REPLY.validate_json(msg.payload)
        except ValidationError as exc:
            log.warning("gateway: a reply from %s does not parse (%s); ignored", found[0], exc)
            return
        found[1](reply)

    def _status(self, device_id: str, payload: bytes) -> None:
        try:
            online = bool(payload) and Status.model_validate_json(payload).online
        except ValidationError:
            return
        with self._lock:
            if online:
                self._offline.discard(device_id)
                return
            self._offline.add(device_id)
            waiting = [sink for device, sink in self._jobs.values() if device == device_id]
        for sink in waiting:
            sink(Offline(device_id))

    def offline(self, device_id: str) -> bool:
        """Whether the last status this connection saw from ``device_id`` said offline."""
        with self._lock:
            return device_id in self._offline

    def send(self, device_id: str, job: JobRequest, sink: Sink) -> bytes:
        """Publish ``job`` to the box; its replies go to ``sink`` until ``forget``.  Returns the ticket."""
        correlation = uuid.uuid4().bytes
        with self._lock:
            self._jobs[correlation] = (device_id, sink)
        props = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
        props.ResponseTopic = self._reply_topic
        props.CorrelationData = correlation
        props.MessageExpiryInterval = self.expiry_s
        topic = self._fleet.device(device_id).jobs
        info = self.client.publish(topic, job.model_dump_json(exclude_none=True), qos=1, properties=props)
        if info.rc != paho.MQTT_ERR_SUCCESS:
            sink(LinkDown(f"cannot publish to {topic} ({paho.error_string(info.rc)})"))
        return correlation

    def forget(self, ticket: bytes) -> None:
        """No more replies for this job."""
        with self._lock:
            self._jobs.pop(ticket, None)

    def cancel(self, device_id: str, job_id: str) -> None:
        """Ask the box to cancel the job (queued in its session when it is offline)."""
        body = CancelRequest(id=job_id).model_dump_json()
        self.client.publish(self._fleet.device(device_id).cancel, body, qos=1)

    def close(self) -> None:
        """Disconnect."""
        release(self.client)
