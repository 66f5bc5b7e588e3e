"""``edge-fleet server`` as a real process of the test, on a free port, with tokens of each role."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from tests.support.broker import Broker, free_port
from tests.support.wait import wait_until


def fleet_cli(
    *args: str, env: dict[str, str] | None = None, timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    """``edge-fleet ARGS`` as a subprocess."""
    return subprocess.run(
        [sys.executable, "-m", "edge_fleet.cli", *args], capture_output=True, text=True, timeout=timeout,
        env={**os.environ, **(env or {})},
    )  # fmt: skip


class FleetServer:
    """One server process on ``db`` (a SQLite path or a PostgreSQL DSN) and ``broker``."""

    def __init__(
        self,
        db: str,
        broker: Broker,
        log: Path,
        *,
        server_id: str = "test-server",
        tokens: dict[str, str] | None = None,
    ) -> None:
        """``tokens``: another server's on the same database (default: new ones, role-user)."""
        self.db = db
        self.broker = broker
        self.log = log
        self.server_id = server_id
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.tokens = tokens or {
            role: self.token(f"{role}-user", role) for role in ("viewer", "operator", "admin")
        }
        self.process: subprocess.Popen[bytes] | None = None

    def token(self, name: str, role: str) -> str:
        """A new token (``edge-fleet server token create``)."""
        made = fleet_cli("server", "token", "create", name, "--role", role, "--db", self.db)
        assert made.returncode == 0, made.stderr
        return made.stdout.strip()

    def start(self) -> FleetServer:
        """Start it and wait for /healthz."""
        with self.log.open("ab") as out:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "edge_fleet.cli", "server", "--listen", f"127.0.0.1:{self.port}",
                 "--db", self.db, "--broker", f"{self.broker.host}:{self.broker.port}", "--plaintext",
                 "--server-id", self.server_id, "--tick", "0.2"],
                stdout=out, stderr=subprocess.STDOUT,
            )  # fmt: skip
        wait_until(self._healthy, timeout=60, what=f"the fleet server's /healthz (log: {self.log})")
        return self

    def _healthy(self) -> bool:
        assert self.process is not None and self.process.poll() is None, self.log.read_text()
        try:
            with urllib.request.urlopen(self.url + "/healthz", timeout=2) as answer:
                return bool(json.loads(answer.read()).get("broker_connected"))
        except (urllib.error.URLError, OSError):
            return False

    def kill9(self) -> None:
        """``kill -9``."""
        assert self.process is not None
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(timeout=30)

    def stop(self) -> None:
        """SIGTERM, and wait."""
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=10)

    def env(self, role: str = "operator") -> dict[str, str]:
        """What makes the CLI a client of this server."""
        return {"EDGE_FLEET_SERVER": self.url, "EDGE_FLEET_TOKEN": self.tokens[role]}

    def get(self, path: str, role: str = "viewer") -> Any:
        """GET an API path; the JSON answer (or the text, for /metrics)."""
        request = urllib.request.Request(
            self.url + path, headers={"Authorization": f"Bearer {self.tokens[role]}"}
        )
        with urllib.request.urlopen(request, timeout=10) as answer:
            body = answer.read()
        return body.decode() if path == "/metrics" else json.loads(body)

    def rollout(self, rollout_id: str) -> dict[str, Any]:
        """One rollout's row."""
        found: dict[str, Any] = self.get(f"/api/v1/rollouts/{rollout_id}")
        return found

    def wait_state(self, rollout_id: str, *states: str, timeout: float = 60) -> dict[str, Any]:
        """The rollout once it is in one of ``states``."""
        return wait_until(
            lambda: (r := self.rollout(rollout_id))["state"] in states and r,
            timeout=timeout, interval=0.1, what=f"rollout {rollout_id} in {states}",
        )  # fmt: skip

    def rollout_killed_once(self, *args: str, until: str, at_least: int = 1, timeout: float = 60) -> str:
        """Start ``edge-fleet rollout ARGS --follow`` against this server, wait until ``at_least``
        of its targets are ``until``, then kill -9 the CLI (the rollout must go on without it).
        Returns the rollout's id (the CLI's first line)."""
        cli = subprocess.Popen(
            [sys.executable, "-m", "edge_fleet.cli", "rollout", *args, "--follow"],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env={**os.environ, **self.env()},
        )  # fmt: skip
        assert cli.stdout is not None
        try:
            rollout_id = cli.stdout.readline().strip()
            wait_until(
                lambda: self.rollout(rollout_id)["targets"].get(until, 0) >= at_least,
                timeout=timeout,
                what=f"{at_least} target(s) {until} in rollout {rollout_id!r}",
            )
        finally:
            cli.send_signal(signal.SIGKILL)
            cli.wait(timeout=10)
            cli.stdout.close()
        return rollout_id
