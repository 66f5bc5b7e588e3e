"""A 3-node NATS cluster with MQTT listeners and JetStream (three replicas), for the tests.

Each node has its own ``server_name``, client, cluster, monitoring and MQTT ports (all free
ports), a ``cluster`` block routing to the other two, and a JetStream ``store_dir``; MQTT's
sessions and retained messages live in JetStream streams with ``stream_replicas: 3``, so they
survive losing any one node.  nats-server is installed by CI; missing, the tests fail.
"""

from __future__ import annotations

import json
import shutil
import signal
import socket
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest

from tests.support.broker import free_port


class NatsNode:
    """One nats-server of the cluster."""

    fleet = None
    client_identity = None
    client_login = None

    def __init__(self, name: str, workdir: Path) -> None:
        self.name = name
        self.host = "127.0.0.1"
        self.port = free_port()  # MQTT: what agents and edge-fleet use
        self.operator_port = self.port  # (one listener: operators and devices alike)
        self.client_port = free_port()
        self.cluster_port = free_port()
        self.http_port = free_port()
        self.workdir = workdir
        self.conf = workdir / f"{name}.conf"
        self.log = workdir / f"{name}.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def write_config(self, routes: list[int]) -> None:
        store = self.workdir / f"{self.name}-js"
        self.conf.write_text(
            "\n".join(
                [
                    f"server_name: {self.name}",
                    f"listen: 127.0.0.1:{self.client_port}",
                    f"http: 127.0.0.1:{self.http_port}",
                    "cluster {",
                    "  name: edge-cluster",
                    f"  listen: 127.0.0.1:{self.cluster_port}",
                    "  routes: [" + ", ".join(f"nats-route://127.0.0.1:{p}" for p in routes) + "]",
                    "}",
                    f'jetstream {{ store_dir: "{store}" }}',
                    # Sessions and retained messages replicated on all three nodes.
                    f"mqtt {{ listen: 127.0.0.1:{self.port}, stream_replicas: 3 }}",
                    "",
                ]
            )
        )

    def start(self, binary: str) -> None:
        self.proc = subprocess.Popen(
            [binary, "-c", str(self.conf), "-l", str(self.log)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,  # it logs to self.log
        )

    def kill(self) -> None:
        """``kill -9`` this node."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(timeout=10)
        self.proc = None

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        self.proc = None

    def mqtt_clients(self) -> list[str]:
        """Client ids of the MQTT connections on this node (its monitoring endpoint)."""
        with urllib.request.urlopen(f"http://127.0.0.1:{self.http_port}/connz?limit=1000", timeout=5) as r:
            data = json.load(r)
        return [c.get("mqtt_client", "") for c in data.get("connections") or [] if c.get("mqtt_client")]


class NatsCluster:
    """Three ``NatsNode``s routed to each other."""

    def __init__(self, workdir: Path) -> None:
        binary = shutil.which("nats-server") or "/usr/sbin/nats-server"
        if not Path(binary).exists():
            pytest.fail("nats-server is not installed (CI installs it: apt-get install nats-server)")
        self.binary = binary
        self.workdir = workdir
        workdir.mkdir(parents=True, exist_ok=True)
        self.nodes = self._new_nodes(self.workdir)

    @staticmethod
    def _new_nodes(workdir: Path) -> list[NatsNode]:
        workdir.mkdir(parents=True, exist_ok=True)
        nodes = [NatsNode(f"n{i + 1}", workdir) for i in range(3)]
        for node in nodes:
            node.write_config([n.cluster_port for n in nodes if n is not node])
        return nodes

    def start(self, timeout: float = 60.0) -> None:
        """Start every node and wait until JetStream is ready on all (MQTT works only then).

        A port found free can be taken before its node binds it (the other nodes' outgoing route
        connections draw local ports from the same range): then the cluster starts again on new
        ports, up to three times. Whatever fails, no node is left running.
        """
        for attempt in range(3):
            try:
                taken = self._start_once(timeout)
            except BaseException:
                self.stop()
                raise
            if taken is None:
                return
            self.stop()
            if attempt == 2:
                pytest.fail(f"nats-server could not bind its ports three times; last: {taken}")
            self.nodes = self._new_nodes(self.workdir / f"retry-{attempt + 1}")  # fresh logs and stores

    def _start_once(self, timeout: float) -> str | None:
        """Start and wait; the log line of a port already in use, or None once ready."""
        for node in self.nodes:
            node.start(self.binary)
        deadline = time.monotonic() + timeout
        for node in self.nodes:
            while not self._ready(node):
                if node.proc is not None and node.proc.poll() is not None:
                    log = node.log.read_text() if node.log.exists() else ""
                    if "address already in use" in log:
                        return next(line for line in log.splitlines() if "address already in use" in line)
                    pytest.fail(f"nats-server {node.name} exited: {log}")
                if time.monotonic() > deadline:
                    pytest.fail(
                        f"the NATS cluster was not ready within {timeout} s; {node.name}'s log:\n{node.log.read_text()}"
                    )
                time.sleep(0.2)
        return None

    @staticmethod
    def _ready(node: NatsNode) -> bool:
        try:
            with socket.create_connection((node.host, node.port), timeout=0.2):
                pass
            with urllib.request.urlopen(f"http://127.0.0.1:{node.http_port}/jsz", timeout=2) as r:
                data = json.load(r)
            return bool((data.get("meta_cluster") or {}).get("leader"))
        except (OSError, ValueError):
            return False

    def node_of(self, client_id: str) -> NatsNode | None:
        """The node ``client_id`` is connected to."""
        for node in self.nodes:
            if node.proc is None:
                continue
            try:
                if client_id in node.mqtt_clients():
                    return node
            except OSError:
                continue
        return None

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()
