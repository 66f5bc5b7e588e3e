"""Run the real daemon (``edge-agent run``) as a child process for integration tests."""

from __future__ import annotations

import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion

from tests.support.broker import Broker
from tests.support.mqtt_client import close_client
from tests.support.pki import Identity
from tests.support.wait import wait_until


def agent_python() -> list[str]:
    """The interpreter command the daemon and the command line run with in the tests.

    This interpreter, unless ``EDGE_AGENT_TEST_PYTHON`` names another: the
    emulated aarch64 run (``.ci/arm64_emulated.sh``) sets it to
    ``qemu-aarch64-static -L SYSROOT SYSROOT/usr/bin/python3.11``, since an
    emulated interpreter cannot start an aarch64 program itself without
    binfmt_misc, but can start the (x86-64) emulator.
    """
    override = os.environ.get("EDGE_AGENT_TEST_PYTHON")
    return shlex.split(override) if override else [sys.executable]


def run_doctor(config: Path, timeout: float = 180) -> subprocess.CompletedProcess[str]:
    """``edge-agent doctor --config CONFIG`` as a user runs it; its exit status and output."""
    return subprocess.run(
        [sys.executable, "-m", "agent.cli", "doctor", "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


#: How long an agent may take to come online: importing onnxruntime and loading the model. An
#: emulated aarch64 interpreter (``EDGE_AGENT_TEST_PYTHON``) takes about 5 s for the imports alone on
#: an idle host, and 40 s and more on a busy one (seen at a load of 12 on 2 cores).
ONLINE_S = 300.0 if os.environ.get("EDGE_AGENT_TEST_PYTHON") else 30.0


class AgentProcess:
    """An ``edge-agent run`` process with its own config and state dir."""

    def __init__(
        self,
        broker: Broker,
        workdir: Path,
        model: Path,
        *,
        device_id: str = "box-1",
        group: str | None = None,
        jobs: dict[str, Any] | None = None,
        mqtt: dict[str, Any] | None = None,
        telemetry: dict[str, Any] | None = None,
        health: dict[str, Any] | None = None,
        update: dict[str, Any] | None = None,
        engine: dict[str, Any] | None = None,
        http: dict[str, Any] | None = None,
        model_version: str | None = None,
        identity: Identity | None = None,
    ) -> None:
        """``mqtt`` keys override the section's; with ``brokers`` in it, host and port are left out.

        Against a broker with a fleet the agent connects with TLS as ``identity`` (default: the
        fleet's certificate for ``device_id``); otherwise over plain TCP, said explicitly.
        """
        self.broker = broker
        self.device_id = device_id
        self.workdir = workdir
        self.state_dir = workdir / "state"
        workdir.mkdir(parents=True, exist_ok=True)
        self.config = workdir / "agent.toml"
        self.log = workdir / "agent.log"
        lines = [f'device_id = "{device_id}"', f'state_dir = "{self.state_dir}"']
        if group:
            lines.append(f'group = "{group}"')
        lines += ["[model]", f'path = "{model}"']
        if model_version:
            lines.append(f'version = "{model_version}"')
        lines.append("[mqtt]")
        mqtt = dict(mqtt or {})
        if "brokers" not in mqtt:
            mqtt = {"host": broker.host, "port": broker.port, **mqtt}
        if identity is None and broker.fleet is not None:
            identity = broker.fleet.device(device_id)
        if identity is None:
            mqtt.setdefault("allow_plaintext", True)
        lines += [f"{k} = {json.dumps(v)}" for k, v in mqtt.items()]
        if identity is not None:
            lines += identity.toml()
        lines += ["[jobs]"] + [f"{k} = {json.dumps(v)}" for k, v in (jobs or {}).items()]
        # Telemetry every second so tests see it quickly (10 s in production).
        telemetry = {"interval_s": 1.0, **(telemetry or {})}
        lines += ["[telemetry]"] + [f"{k} = {json.dumps(v)}" for k, v in telemetry.items()]
        lines += ["[health]"] + [f"{k} = {json.dumps(v)}" for k, v in (health or {}).items()]
        lines += ["[update]"] + [f"{k} = {json.dumps(v)}" for k, v in (update or {}).items()]
        if engine:
            lines += ["[engine]"] + [f"{k} = {json.dumps(v)}" for k, v in engine.items()]
        if http:
            lines += ["[http]"] + [f"{k} = {json.dumps(v)}" for k, v in http.items()]
        self.config.write_text("\n".join(lines) + "\n")
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, wait_online: bool = True, env: dict[str, str] | None = None) -> None:
        """Start the daemon; by default wait until it announces itself online."""
        watcher = _StatusWatcher(self.broker, self.device_id) if wait_online else None
        started = time.time()
        with self.log.open("ab") as log:  # the child keeps its own descriptor
            self.proc = subprocess.Popen(
                [
                    *agent_python(),
                    "-m",
                    "agent.cli",
                    "run",
                    "--config",
                    str(self.config),
                    "--log-level",
                    "DEBUG",
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
                env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})},
            )
        if watcher is not None:
            try:
                # Only a status this process published counts: a previous agent of the same box may
                # have come online less than a second ago (its status is still the retained one).
                watcher.wait_online(after=started, proc=self.proc, log=self.log)
            finally:
                watcher.close()

    def kill(self) -> None:
        """``kill -9``: no chance to clean up."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=10)

    def terminate(self, timeout: float = 30) -> int:
        """SIGTERM, as systemd stops it; returns the exit code."""
        assert self.proc is not None
        self.proc.terminate()
        return self.proc.wait(timeout=timeout)

    def stop(self) -> None:
        """Make sure the process is gone."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)

    def http_port(self, after: int = 0) -> int:
        """The port its HTTP API took (``[http] listen`` port 0: any free one, logged at start).

        ``after``: read the log from this offset (a restart takes another port). A port picked
        by the test and handed over would race the test's own MQTT clients, whose outgoing
        connections take free ports from the same range.
        """
        found = wait_until(
            lambda: re.search(r"HTTP API on http://[^:]+:(\d+)", self.log_text()[after:]),
            what="the HTTP API's port in the agent's log",
        )
        return int(found.group(1))

    def log_text(self) -> str:
        """What the daemon logged so far."""
        return self.log.read_text(errors="replace") if self.log.exists() else ""


class _StatusWatcher:
    def __init__(self, broker: Broker, device_id: str) -> None:
        self.statuses: list[dict[str, Any]] = []
        self.client = paho.Client(CallbackAPIVersion.VERSION2, client_id=f"watch-{uuid.uuid4().hex[:8]}")
        if broker.client_identity is not None:
            broker.client_identity.configure(self.client)
        if broker.client_login is not None:
            self.client.username_pw_set(*broker.client_login)
        self.client.on_message = self._on_message
        self.client.connect(broker.host, broker.operator_port)
        self.client.subscribe(f"edge/{device_id}/status", qos=1)
        self.client.loop_start()

    def _on_message(self, _c: Any, _u: Any, msg: paho.MQTTMessage) -> None:
        self.statuses.append(json.loads(msg.payload))

    def wait_online(
        self, *, after: float, proc: subprocess.Popen[bytes], log: Path, timeout: float = ONLINE_S
    ) -> None:
        def online() -> bool:
            if proc.poll() is not None:
                raise AssertionError(f"agent exited with {proc.returncode}:\n{log.read_text()}")
            return any(s.get("online") and s.get("since", 0) >= after for s in list(self.statuses))

        try:
            wait_until(online, timeout=timeout, interval=0.05, what="the agent to come online")
        except AssertionError as exc:
            if "agent exited" in str(exc):
                raise
            raise AssertionError(
                f"agent did not come online within {timeout} s:\n{log.read_text()}"
            ) from None

    def close(self) -> None:
        close_client(self.client)
