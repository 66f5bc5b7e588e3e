"""Simulated devices (``edge_fleet.simulate``) running in a thread of the test, on the test's broker."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from typing import Any

from edge_fleet.broker import BrokerOptions
from edge_fleet.simulate import Simulator
from tests.support.broker import Broker


class SimulatedFleet:
    """``count`` simulated devices, connected until ``stop``."""

    def __init__(self, broker: Broker, count: int, **kwargs: Any) -> None:
        self.sim = Simulator(
            BrokerOptions(host=broker.host, port=broker.port, plaintext=True), count, **kwargs
        )
        self.ids = [d.device_id for d in self.sim.devices]
        ready = threading.Event()
        self._thread = threading.Thread(target=self.sim.run, kwargs={"ready": ready}, daemon=True)
        self._thread.start()
        if not ready.wait(30):
            raise AssertionError(f"only {self.sim.connected} of {count} simulated devices connected")

    def stop(self) -> None:
        """Disconnect every device."""
        self.sim.stop()
        self._thread.join(timeout=10)


def simulated_fleets(broker: Broker, **defaults: Any) -> Iterator[Callable[..., SimulatedFleet]]:
    """Body of a ``fleet`` fixture: a factory of simulated fleets (``defaults`` overridable per call),
    every one stopped after the test."""
    made: list[SimulatedFleet] = []

    def make(count: int, **kwargs: Any) -> SimulatedFleet:
        made.append(SimulatedFleet(broker, count, **{**defaults, **kwargs}))
        return made[-1]

    yield make
    for f in made:
        f.stop()
