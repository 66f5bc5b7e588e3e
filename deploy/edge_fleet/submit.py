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

from pydantic import ValidationError

from agent.link.mqtt import Ack, ConnectionLost, Message, NoAnswer, PublishRefused
from edge_contract.errors import LinkError
from edge_contract.protocol import REPLY, Chunk, FleetTopics, JobRequest, Result, Status

from .broker import BrokerOptions, FleetError, connect_client, connection_error, refusal


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
        self._broker = broker
        self._suback: Ack | None = None
        try:
            # MQTT 5 whatever the profile says: replies need a response topic.
            self._client = broker.client("edge-fleet", protocol="5", on_connect=self._subscribe)
            self._client.route(self._reply_topic, self._on_reply)
            connect_client(broker, self._client, timeout=timeout)
        except FleetError as exc:
            raise JobFailed(str(exc)) from exc
        host, port = broker.address
        assert self._suback is not None  # sent by the connection's hook
        try:
            refused = self._suback.wait(timeout)[0]
        except ConnectionLost:  # closed before the subscription was answered: the broker refused this client
            self.close()
            raise JobFailed(str(connection_error(broker, None))) from None
        except NoAnswer:
            self.close()
            raise JobFailed(
                f"the broker at {host}:{port} did not accept the subscription in {timeout} s"
            ) from None
        if refused is not None:
            self.close()
            raise JobFailed(str(refusal(broker, f"subscribing to {self._reply_topic}", refused)))

    def _subscribe(self, _session_present: bool) -> None:
        # Every (re)connection subscribes again: the session ends with the connection.
        self._suback = self._client.subscribe(self._reply_topic)

    def close(self) -> None:
        """Disconnect."""
        self._client.close()

    def __enter__(self) -> Submitter:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    def _on_reply(self, msg: Message) -> None:
        with self._lock:
            box = self._inbox.get(msg.correlation or b"")
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
        found: dict[str, Status] = {}
        last = [time.monotonic()]

        def on_status(msg: Message) -> None:
            last[0] = time.monotonic()
            try:
                found[msg.topic] = Status.model_validate_json(msg.payload)
            except ValidationError:
                return

        self._client.route(topic_filter, on_status)
        suback = self._client.subscribe(topic_filter)
        try:
            end = time.monotonic() + wait
            while time.monotonic() < end:
                time.sleep(0.05)
                # Retained messages follow the subscription at once; 0.5 s of quiet after them ends it.
                if found and time.monotonic() - last[0] > 0.5:
                    break
            try:
                refused = suback.wait()[0]  # answered long before the retained messages ended
            except LinkError:
                refused = None
            if refused is not None:  # not allowed to look: say nothing, refuse nothing
                return None
            return list(found.values())
        finally:
            self._client.unsubscribe(topic_filter)
            self._client.unroute(topic_filter)

    def wait_online(self, device_id: str, timeout: float = 60.0) -> Status:
        """Block until ``device_id`` announces itself online (its retained status)."""
        online = threading.Event()
        found: list[Status] = []
        topic = FleetTopics(self.prefix).device(device_id).status

        def on_status(msg: Message) -> None:
            try:
                status = Status.model_validate_json(msg.payload)
            except ValidationError:
                return
            if status.online:
                found.append(status)
                online.set()

        self._client.route(topic, on_status)
        self._client.subscribe(topic)
        try:
            if not online.wait(timeout):
                raise JobFailed(f"device {device_id} did not come online within {timeout:.0f} s")
            return found[-1]
        finally:
            self._client.unsubscribe(topic)
            self._client.unroute(topic)

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
            sent = self._client.publish(
                topic,
                request.model_dump_json(exclude_none=True).encode(),
                response_topic=self._reply_topic,
                correlation=correlation,
            )
            try:
                sent.wait(10)
            except PublishRefused as exc:
                raise JobFailed(
                    str(refusal(self._broker, f"publishing job {request.id} to {topic}", exc.reason))
                ) from exc
            except (NoAnswer, ConnectionLost):
                pass  # sent again once connected; the result's wait below bounds it
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
