"""Pieces for the fast tier's in-process daemon tests.

``RecordingLink`` stands in for the MQTT link where a test plays the broker's
part itself (which publication it acknowledges, when it reconnects); the real
link over a real mosquitto is exercised by the e2e tier.  ``Served`` wraps a
real engine on a committed fixture model the way the updater does.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from agent.engine.engine import Engine
from edge_contract.protocol import ModelRef


@dataclass
class Published:
    topic: str
    payload: bytes
    correlation: bytes | None
    retain: bool
    qos: int


class RecordingLink:
    """Records publications and numbers them like paho (a mid per publication)."""

    def __init__(self) -> None:
        self.sent: list[Published] = []
        self.connected = threading.Event()
        self.connected.set()
        self.alive = True
        self.cert_expiry: datetime | None = None  # as MQTTLink: the client certificate in use
        self._mid = 0
        self._lock = threading.Lock()

    def publish(
        self,
        topic: str,
        payload: bytes,
        *,
        qos: int = 1,
        retain: bool = False,
        correlation: bytes | None = None,
    ) -> int:
        with self._lock:
            self._mid += 1
            self.sent.append(Published(topic, payload, correlation, retain, qos))
            return self._mid

    def to(self, topic: str) -> list[Published]:
        with self._lock:
            return [p for p in self.sent if p.topic == topic]


@dataclass
class Served:
    engine: Engine
    ref: ModelRef
    precision: str | None = None


@dataclass
class Models:
    """The served model, and the probation verdicts the worker reports."""

    serving: Served
    verdicts: list[tuple[bool, str | None]] = field(default_factory=list)

    def job_finished(self, succeeded: bool, error: str | None = None) -> None:
        self.verdicts.append((succeeded, error))


def models(engine: Engine) -> Models:
    return Models(Served(engine, ModelRef(name=engine.name, version="1.0.0")))


def unused(*_a: Any) -> None:
    raise AssertionError("not expected to be called")
