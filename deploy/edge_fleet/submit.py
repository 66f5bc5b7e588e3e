"""Submitting jobs to boxes over MQTT 5 request/response, streaming the answer back.

Each ``Submitter`` listens on its own response topic; a job carries that topic
and a fresh correlation id, so replies of concurrent jobs never mix.
"""

from __future__ import annotations

import queue
import threading
import time
import uuid
from collections.abc import Callable
from typing import Any

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from pydantic import ValidationError

from agent.link.mqtt import no_delay
from edge_contract.protocol import REPLY, Chunk, FleetTopics, JobRequest, Result, Status

from .broker import BrokerOptions, FleetError, connection_error, refusal, release


class JobFailed(Exception):
    """No result arrived in time, or the broker could not be reached."""


class Submitter:
    """A connected MQTT 5 client that sends jobs and collects their replies.

    ``broker`` says where and how to connect (TLS, identity: the same options as every
    ``edge-fleet`` command).  Replies come back under ``{prefix}/replies/``, the one
    subtree where the shipped ACL lets devices publish to topics a caller chose.
    """

    def __init__(self, broker: BrokerOptions, *, timeout: float = 10.0) -> None:
        prefix = broker.prefix
        self.prefix = prefix
        self._inbox: dict[bytes, queue.Queue[Chunk | Result]] = {}
        self._lock = threading.Lock()
        self._reply_topic = FleetTopics(prefix).reply(uuid.uuid4().hex)
        self._ready = threading.Event()
        self._client = paho.Client(
            CallbackAPIVersion.VERSION2,
            client_id=f"edge-fleet-{uuid.uuid4().hex[:12]}",
            protocol=MQTTProtocolVersion.MQTTv5,
        )
        self._client.on_socket_open = no_delay
        try:
            broker.configure(self._client)
        except FleetError as exc:
            raise JobFailed(str(exc)) from exc
        host, port = broker.address
        self._client.on_connect = self._on_connect
        self._broker = broker
        self._refused: list[str] = []  # SUBACK/PUBACK refusals, named at once (issue 13)
        self._client.on_subscribe = self._on_subscribe
        self._client.on_publish = self._on_publish
        self._client.on_message = self._on_message
        try:
            self._client.connect(host, port)
        except OSError as exc:
            raise JobFailed(str(connection_error(broker, exc))) from exc
        dropped: list[bool] = []

        def on_disconnect(*_a: Any) -> None:
            dropped.append(True)
            self._ready.set()

        self._client.on_disconnect = on_disconnect
        self._client.loop_start()
        answered = self._ready.wait(timeout)
        self._client.on_disconnect = None
        if dropped:  # closed before the subscription was answered: the broker refused this client
            self.close()
            raise JobFailed(str(connection_error(broker, None)))
        if not answered:
            self.close()
            raise JobFailed(f"the broker at {host}:{port} did not accept the subscription in {timeout} s")
        if self._refused:
            self.close()
            raise JobFailed(str(refusal(broker, f"subscribing to {self._reply_topic}", self._refused[0])))

    def _on_subscribe(self, _c: Any, _u: Any, _mid: int, reasons: list[Any], _p: Any) -> None:
        self._refused += [str(r) for r in reasons if r.is_failure]
        self._ready.set()

    def _on_publish(self, _c: Any, _u: Any, _mid: int, reason: Any, _p: Any) -> None:
        if reason.is_failure:
            self._refused.append(str(reason))

    def close(self) -> None:
        """Disconnect."""
        release(self._client)

    def __enter__(self) -> Submitter:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    def _on_connect(self, client: paho.Client, *_a: Any) -> None:
        client.subscribe(self._reply_topic, qos=1)

    def _on_message(self, _c: paho.Client, _u: Any, msg: paho.MQTTMessage) -> None:
        correlation = getattr(getattr(msg, "properties", None), "CorrelationData", None)
        with self._lock:
            box = self._inbox.get(bytes(correlation or b""))
        if box is None:
            return
        try:
            reply = REPLY.validate_json(msg.payload)
        except ValidationError:
            return
        box.put(reply)

    def statuses(self, topic_filter: str, wait: float = 2.0) -> list[Status] | None:
        """The retained statuses under ``topic_filter`` (``{prefix}/D/status`` or ``{prefix}/+/status``):
        what arrives within ``wait`` seconds of subscribing, ending early after a short quiet.  None
        when this identity may not read them (the broker refused the subscription)."""
        refusals_before = len(self._refused)
        found: dict[str, Status] = {}
        last = [time.monotonic()]

        def on_status(_c: paho.Client, _u: Any, msg: paho.MQTTMessage) -> None:
            last[0] = time.monotonic()
            try:
                found[msg.topic] = Status.model_validate_json(msg.payload)
            except ValidationError:
                return

        self._client.message_callback_add(topic_filter, on_status)
        self._client.subscribe(topic_filter, qos=1)
        try:
            end = time.monotonic() + wait
            while time.monotonic() < end:
                time.sleep(0.05)
                # Retained messages follow the subscription at once; 0.5 s of quiet after them ends it.
                if found and time.monotonic() - last[0] > 0.5:
                    break
            if len(self._refused) > refusals_before:  # not allowed to look: say nothing, refuse nothing
                del self._refused[refusals_before:]
                return None
            return list(found.values())
        finally:
            self._client.unsubscribe(topic_filter)
            self._client.message_callback_remove(topic_filter)

    def wait_online(self, device_id: str, timeout: float = 60.0) -> Status:
        """Block until ``device_id`` announces itself online (its retained status)."""
        online = threading.Event()
        found: list[Status] = []
        topic = FleetTopics(self.prefix).device(device_id).status

        def on_status(_c: paho.Client, _u: Any, msg: paho.MQTTMessage) -> None:
            try:
                status = Status.model_validate_json(msg.payload)
            except ValidationError:
                return
            if status.online:
                found.append(status)
                online.set()

        self._client.message_callback_add(topic, on_status)
        self._client.subscribe(topic, qos=1)
        try:
            if not online.wait(timeout):
                raise JobFailed(f"device {device_id} did not come online within {timeout:.0f} s")
            return found[-1]
        finally:
            self._client.unsubscribe(topic)
            self._client.message_callback_remove(topic)

    def run(
        self,
        topic: str,
        request: JobRequest,
        *,
        on_chunk: Callable[[Chunk], None] | None = None,
        timeout: float = 300.0,
    ) -> Result:
        """Publish ``request`` to ``topic`` and wait for its result, passing chunks to ``on_chunk``."""
        correlation = uuid.uuid4().bytes
        box: queue.Queue[Chunk | Result] = queue.Queue()
        with self._lock:
            self._inbox[correlation] = box
        try:
            props = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
            props.ResponseTopic = self._reply_topic
            props.CorrelationData = correlation
            info = self._client.publish(
                topic, request.model_dump_json(exclude_none=True).encode(), qos=1, properties=props
            )
            info.wait_for_publish(timeout=10)
            if self._refused:
                raise JobFailed(
                    str(refusal(self._broker, f"publishing job {request.id} to {topic}", self._refused[-1]))
                )
            seen: set[int] = set()
            end = time.monotonic() + timeout
            while True:
                left = end - time.monotonic()
                if left <= 0:
                    raise JobFailed(f"no result for job {request.id} within {timeout:.0f} s")
                try:
                    reply = box.get(timeout=left)
                except queue.Empty:
                    continue
                if isinstance(reply, Result):
                    return reply
                if reply.seq not in seen:  # QoS 1 may deliver a chunk twice
                    seen.add(reply.seq)
                    if on_chunk is not None:
                        on_chunk(reply)
        finally:
            with self._lock:
                self._inbox.pop(correlation, None)
