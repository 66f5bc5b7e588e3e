"""A test-side MQTT client: publishes jobs the way callers do and collects replies."""

from __future__ import annotations

import json
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

from agent.link.mqtt import no_delay
from tests.support.pki import Identity


def close_client(client: paho.Client) -> None:
    """Disconnect ``client``, stop its loop, and close the socket pair paho wakes its loop with.

    paho 2.2 closes that pair only in ``__del__``; a client the garbage collector reaps inside
    a reference cycle can lose its sockets first, and the ResourceWarning (an error under this
    suite's ``filterwarnings``) then failed a run at its very end, about one in six of some subsets.
    """
    client.disconnect()
    client.loop_stop()
    for name in ("_sockpairR", "_sockpairW"):  # paho's own names; no public way to close them
        sock = getattr(client, name, None)
        if sock is not None:
            sock.close()
            setattr(client, name, None)


class Caller:
    """Subscribes to ``reply_filter`` and files every reply by job id."""

    def __init__(
        self,
        host: str,
        port: int,
        reply_filter: str | list[str] = "edge/replies/#",
        *,
        mqtt5: bool = True,
        identity: Identity | None = None,
    ) -> None:
        """``identity``: connect with TLS as that identity (a broker with a fleet needs one)."""
        self.client = paho.Client(
            CallbackAPIVersion.VERSION2,
            client_id=f"caller-{uuid.uuid4().hex[:8]}",
            protocol=MQTTProtocolVersion.MQTTv5 if mqtt5 else MQTTProtocolVersion.MQTTv311,
            clean_session=None if mqtt5 else False,
        )
        self.mqtt5 = mqtt5
        if identity is not None:
            identity.configure(self.client)
        self.filters = [reply_filter] if isinstance(reply_filter, str) else list(reply_filter)
        self.replies: dict[str, list[dict[str, Any]]] = {}
        self.model_states: dict[str, list[dict[str, Any]]] = {}  # device -> every model/state seen
        self.raw: queue.Queue[tuple[str, bytes, bytes | None]] = queue.Queue()
        self._cond = threading.Condition()
        self.client.on_socket_open = no_delay
        self.client.on_message = self._on_message
        self._subscribed = threading.Event()
        self.client.on_subscribe = lambda *_a: self._subscribed.set()
        # A persistent session that survives a broker restart, as a real caller's should.
        self.connected = threading.Event()
        self.client.on_connect = self._on_connect
        self.client.on_disconnect = lambda *_a: self.connected.clear()
        self.client.reconnect_delay_set(0.1, 1)
        props = None
        if mqtt5:
            props = Properties(PacketTypes.CONNECT)
            props.SessionExpiryInterval = 3600
        clean_start = False if mqtt5 else paho.MQTT_CLEAN_START_FIRST_ONLY
        self.client.connect(host, port, clean_start=clean_start, properties=props)
        self.client.loop_start()
        assert self._subscribed.wait(5), "caller could not subscribe"

    def _on_connect(self, *_a: Any) -> None:
        for topic_filter in self.filters:
            self.client.subscribe(topic_filter, qos=1)
        self.connected.set()

    def subscribe(self, topic_filter: str) -> None:
        """Add a filter (kept across reconnects)."""
        self.filters.append(topic_filter)
        self.client.subscribe(topic_filter, qos=1)

    def retained(self, topic_filter: str, timeout: float = 20.0) -> list[tuple[str, bytes]]:
        """Subscribe to ``topic_filter``; return what the broker sent for it before a probe published right after.

        The broker handles one client's packets in order: the retained messages it queues on
        the subscription go out before the probe it handles next, so the probe bounds the wait
        (no fixed settle time) and an empty answer means no retained message, not "too early".
        """
        probe = f"test/probe/{uuid.uuid4().hex[:8]}"
        start = self.raw.qsize()
        self.subscribe(topic_filter)
        self.subscribe(probe)
        self.send(probe, b"probe", response_topic=None)

        def until_probe() -> list[tuple[str, bytes]] | None:
            seen = list(self.raw.queue)[start:]
            topics = [topic for topic, _b, _c in seen]
            if probe not in topics:
                return None
            before = seen[: topics.index(probe)]
            return [(t, b) for t, b, _c in before if paho.topic_matches_sub(topic_filter, t)]

        end = time.monotonic() + timeout
        while (found := until_probe()) is None:
            assert time.monotonic() < end, f"the probe on {probe} did not come back within {timeout} s"
            time.sleep(0.02)
        return found

    def close(self) -> None:
        """Disconnect."""
        close_client(self.client)

    def _on_message(self, _c: Any, _u: Any, msg: paho.MQTTMessage) -> None:
        corr = getattr(getattr(msg, "properties", None), "CorrelationData", None)
        self.raw.put((msg.topic, bytes(msg.payload), corr))
        try:
            body = json.loads(msg.payload)
        except ValueError:
            return
        if msg.topic.endswith("/model/state") and isinstance(body, dict):
            with self._cond:
                self.model_states.setdefault(msg.topic.split("/")[1], []).append(body)
                self._cond.notify_all()
        elif isinstance(body, dict) and "id" in body:
            body["_topic"] = msg.topic
            body["_correlation"] = corr
            with self._cond:
                self.replies.setdefault(str(body["id"]), []).append(body)
                self._cond.notify_all()

    def send(
        self,
        topic: str,
        payload: dict[str, Any] | bytes | str,
        *,
        response_topic: str | None = "edge/replies/test",
        correlation: bytes | None = None,
        qos: int = 1,
    ) -> None:
        """Publish a job (a dict is sent as JSON) and wait until the broker has it."""
        data = json.dumps(payload).encode() if isinstance(payload, dict) else payload
        props = None
        if self.mqtt5 and (response_topic or correlation):
            props = Properties(PacketTypes.PUBLISH)
            if response_topic:
                props.ResponseTopic = response_topic
            if correlation:
                props.CorrelationData = correlation
        assert self.connected.wait(15), "caller not connected to the broker"
        info = self.client.publish(topic, data, qos=qos, properties=props)
        info.wait_for_publish(5)

    def results(self, job_id: str) -> list[dict[str, Any]]:
        """Terminal results received so far for ``job_id``."""
        with self._cond:
            return [r for r in self.replies.get(job_id, []) if r.get("type") == "result"]

    def wait_result(self, job_id: str, timeout: float = 20.0) -> dict[str, Any]:
        """Block until a terminal result for ``job_id`` arrives; return it."""
        end = time.monotonic() + timeout
        with self._cond:
            while True:
                found = [r for r in self.replies.get(job_id, []) if r.get("type") == "result"]
                if found:
                    return found[0]
                left = end - time.monotonic()
                if left <= 0:
                    raise AssertionError(f"no result for job {job_id} within {timeout} s")
                self._cond.wait(left)

    def settle(
        self, topic: str, job_ids: list[str], timeout: float = 60.0
    ) -> dict[str, list[dict[str, Any]]]:
        """Every result of ``job_ids`` once any duplicate of theirs would have come: after their
        results, a marker job sent to ``topic`` is answered (the broker redelivers before it
        delivers new messages, the agent takes jobs in order)."""
        for job_id in job_ids:
            self.wait_result(job_id, timeout=timeout)
        marker = f"marker-{uuid.uuid4().hex[:8]}"
        self.send(topic, {"id": marker, "prompt": "hi", "max_tokens": 1})
        self.wait_result(marker, timeout=timeout)
        return {job_id: self.results(job_id) for job_id in job_ids}

    def chunks(self, job_id: str) -> list[dict[str, Any]]:
        """Streamed chunks received for ``job_id``, in arrival order."""
        with self._cond:
            return [r for r in self.replies.get(job_id, []) if r.get("type") == "chunk"]

    def publish_retained(self, topic: str, payload: bytes) -> None:
        """Publish a retained message (empty: clear it) and wait until the broker has it."""
        assert self.connected.wait(15), "caller not connected to the broker"
        info = self.client.publish(topic, payload, qos=1, retain=True)
        info.wait_for_publish(5)

    def wait_model_state(
        self,
        device: str,
        predicate: Callable[[dict[str, Any]], bool],
        timeout: float = 30.0,
        *,
        since: int = 0,
    ) -> dict[str, Any]:
        """Block until ``device`` publishes a model state satisfying ``predicate`` (needs
        ``edge/+/model/state`` in the reply filters); return it.  ``since`` skips the
        states that ``state_count`` counted before."""
        end = time.monotonic() + timeout
        with self._cond:
            seen = since
            while True:
                states = self.model_states.get(device, [])
                for state in states[seen:]:
                    if predicate(state):
                        return state
                seen = len(states)
                left = end - time.monotonic()
                if left <= 0:
                    last = states[-1] if states else None
                    raise AssertionError(
                        f"{device}: no matching model state within {timeout} s; last: {last}"
                    )
                self._cond.wait(left)

    def state_count(self, device: str) -> int:
        """How many model states ``device`` published so far (for ``wait_model_state(since=)``)."""
        with self._cond:
            return len(self.model_states.get(device, []))
