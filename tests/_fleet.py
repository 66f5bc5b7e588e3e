"""Simulated devices (``edge_fleet.simulate``) running in a thread of the test, on the test's broker."""

from __future__ import annotations

import threading
from typing import Any

from edge_fleet.broker import BrokerOptions
from edge_fleet.simulate import Simulator
from tests._broker import Broker


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
