"""The gateway's own MQTT 5 connection: it sends jobs to boxes and hands their replies back.

Each job carries the gateway's response topic (under ``{prefix}/replies/``, the subtree the
shipped ACL opens to callers) and a fresh correlation id; replies go to the ``sink`` the
request registered (called on the link's network thread: the sink hands them to the request's event
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

from pydantic import ValidationError

from agent.link.mqtt import Ack, Message, PublishRefused
from edge_contract.errors import LinkError
from edge_contract.protocol import REPLY, CancelRequest, Chunk, FleetTopics, JobRequest, Result, Status

from ...broker import BrokerOptions

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
        # Every (re)connection subscribes again: the gateway's session ends with its connection.
        self.client = options.client(
            "edge-fleet-gateway", protocol="5", on_connect=self._on_connect, on_drop=self._on_drop
        )
        self.client.route(self._reply_topic, self._reply)
        self.client.route(self._fleet.any_status, self._on_status)
        self.client.start(*options.address)

    def _on_connect(self, _session_present: bool) -> None:
        self.client.subscribe([self._reply_topic, self._fleet.any_status]).then(self._subscribed)

    def _subscribed(self, ack: Ack) -> None:
        try:
            refused = [r for r in ack.wait(0) if r is not None]
        except LinkError:  # the connection dropped first: the next one subscribes again
            return
        if refused:  # replies would never come: say so, and take no job
            log.error(
                "gateway: the broker refused the subscriptions to %s and %s (%s): give the server's "
                "identity read access to them (docs/fleet-server.md)",
                self._reply_topic, self._fleet.any_status, ", ".join(refused),
            )  # fmt: skip
            return
        self.connected.set()

    def _on_drop(self, _reason: str) -> None:
        self.connected.clear()
        with self._lock:
            waiting = list(self._jobs.values())
        for _device, sink in waiting:
            sink(LinkDown("the fleet server lost its broker connection"))

    def _reply(self, msg: Message) -> None:
        with self._lock:
            found = self._jobs.get(msg.correlation or b"")
        if found is None:
            return  # a job given up on (or a duplicate after its result)
        try:
            reply = REPLY.validate_json(msg.payload)
        except ValidationError as exc:
            log.warning("gateway: a reply from %s does not parse (%s); ignored", found[0], exc)
            return
        found[1](reply)

    def _on_status(self, msg: Message) -> None:
        self._status(msg.topic.split("/")[-2], msg.payload)

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
        topic = self._fleet.device(device_id).jobs
        sent = self.client.publish(
            topic,
            job.model_dump_json(exclude_none=True),
            response_topic=self._reply_topic,
            correlation=correlation,
            expiry_s=self.expiry_s,
        )
        if not self.client.connected.is_set():
            sink(LinkDown(f"cannot publish to {topic} (the fleet server is not connected to the broker)"))
        else:
            sent.then(lambda ack: self._refused(ack, topic, sink))
        return correlation

    @staticmethod
    def _refused(ack: Ack, topic: str, sink: Sink) -> None:
        try:
            ack.wait(0)
        except PublishRefused as exc:
            sink(LinkDown(f"the broker refused the job on {topic} ({exc.reason})"))
        except LinkError:
            pass  # the connection dropped: ``_on_drop`` told every waiting request

    def forget(self, ticket: bytes) -> None:
        """No more replies for this job."""
        with self._lock:
            self._jobs.pop(ticket, None)

    def cancel(self, device_id: str, job_id: str) -> None:
        """Ask the box to cancel the job (queued in its session when it is offline)."""
        body = CancelRequest(id=job_id).model_dump_json()
        self.client.publish(self._fleet.device(device_id).cancel, body)

    def close(self) -> None:
        """Disconnect."""
        self.client.close()
