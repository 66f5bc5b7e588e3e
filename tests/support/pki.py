"""Certificates for the tests, made by the real ``edge-fleet ca init`` / ``provision`` commands."""

from __future__ import annotations

import datetime
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import paho.mqtt.client as paho

from agent.link.tls import client_context
from edge_fleet import pki
from edge_fleet.broker import BrokerOptions
from edge_fleet.cli import main as fleet
from edge_fleet.dynsec import DynSec

if TYPE_CHECKING:
    from tests.support.broker import Broker


@dataclass(frozen=True)
class Identity:
    """One provisioned identity: the CA to trust, the certificate and its key."""

    name: str
    ca: Path
    cert: Path | None  # None: TLS without a client certificate (a login instead)
    key: Path | None

    def configure(self, client: paho.Client) -> None:
        """TLS with this identity on an unconnected paho client."""
        client.tls_set_context(client_context(self.ca, self.cert, self.key))

    def toml(self) -> list[str]:
        """The agent's ``[mqtt.tls]`` section for this identity."""
        lines = ["[mqtt.tls]", f'ca = "{self.ca}"']
        if self.cert is not None:
            lines += [f'cert = "{self.cert}"', f'key = "{self.key}"']
        return lines


class Fleet:
    """A fleet CA in ``workdir`` and the identities issued by it (each once).

    A device issued here is registered (``DynSec.add_device``, what ``provision --live``
    does) on every running broker of the fleet, and on each broker started later.
    """

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.ca_dir = workdir / "ca"
        assert fleet(["ca", "init", "--out", str(self.ca_dir)]) == 0
        self.ca = self.ca_dir / "ca.crt"
        self.operator = self._issue("operator", ["--operator"])
        # A server certificate for localhost (the tests' HTTPS servers; `broker init` makes its own).
        self.broker = self._issue("broker", ["--broker", "localhost", "--broker", "127.0.0.1"])
        self.brokers: list[Broker] = []
        self.registered: dict[str, str | None] = {}

    def device(self, name: str, group: str | None = None) -> Identity:
        """The identity of device ``name`` (provisioned on first use, with its agent.toml),
        registered with ``group`` on the fleet's brokers."""
        identity = self._issue(name, [])
        # Without a group, a device registered before keeps its group (the agent fixture asks
        # for its identity by name only).
        if name not in self.registered or (group is not None and self.registered[name] != group):
            self.registered[name] = group
            for broker in self.brokers:
                if broker.running:
                    self.register_on(broker, name, group)
        return identity

    def register_on(self, broker: Broker, name: str, group: str | None) -> None:
        """Register device ``name`` on ``broker`` through the dynamic-security API."""
        options = BrokerOptions(
            broker.host, broker.port, ca=self.ca, cert=self.operator.cert, key=self.operator.key
        )
        with DynSec(options) as api:
            api.add_device(name, group, "edge")

    def _issue(self, name: str, flags: list[str]) -> Identity:
        out = self.workdir / "ids" / name
        if not (out / f"{name}.crt").exists():
            assert fleet(["provision", name, "--ca", str(self.ca_dir), "--out", str(out), *flags]) == 0
        return Identity(name, out / "ca.crt", out / f"{name}.crt", out / f"{name}.key")

    def expired(self, name: str) -> Identity:
        """A device identity of the fleet CA whose certificate expired yesterday."""
        out = self.workdir / "expired" / name
        pki.provision(
            name,
            self.ca_dir,
            out,
            days=1,
            not_before=datetime.datetime.now(datetime.UTC) - datetime.timedelta(days=3),
        )
        return Identity(name, out / "ca.crt", out / f"{name}.crt", out / f"{name}.key")

    def stranger(self, name: str) -> Identity:
        """An identity named ``name`` from another CA that the broker does not trust."""
        other = self.workdir / "other-ca"
        if not (other / "ca.crt").exists():
            pki.create_ca(other, name="someone else's CA")
        out = self.workdir / "stranger" / name
        pki.provision(name, other, out)
        # It trusts the fleet's CA for the broker; only its own certificate is foreign.
        return Identity(name, self.ca, out / f"{name}.crt", out / f"{name}.key")
