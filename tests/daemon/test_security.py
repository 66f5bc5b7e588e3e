"""The fleet link against a real mosquitto running what ``edge-fleet broker init`` writes.

Every certificate is made in the test by ``edge-fleet ca init`` / ``provision``;
devices are registered on the broker's dynamic-security state as
``provision --live`` registers them.
What the broker refuses is proven with real clients: a refused publication
gets PUBACK "Not authorized" and reaches nobody; a forbidden read is proven
by a marker published after the forbidden message, which arrives while the
forbidden one never does (one publisher's messages keep their order).
"""

from __future__ import annotations

import json
import queue
import stat
import subprocess
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import paho.mqtt.client as paho
import pytest
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from agent.link.tls import certificate_expiry
from edge_contract.protocol import JobRequest
from edge_fleet.broker import BrokerOptions
from edge_fleet.cli import main as fleet_cli
from edge_fleet.submit import Submitter
from tests.support.agent import run_doctor
from tests.support.broker import Broker
from tests.support.mqtt_client import close_client
from tests.support.pki import Fleet, Identity

pytestmark = pytest.mark.e2e

_WAIT_S = 15.0  # generous: the machine is shared; every wait ends on an event, not on time
#: PUBACK reasons of an accepted publication (0x10: accepted, nobody subscribed).
ACCEPTED = {"Success", "No matching subscribers"}


class Probe:
    """A raw MQTT 5 client recording the broker's answers: connection, PUBACK codes, messages."""

    def __init__(
        self,
        broker: Broker,
        identity: Identity | None,
        *,
        name: str | None = None,
        login: tuple[str, str] | None = None,
        port: int | None = None,
        resume: bool = False,
    ) -> None:
        """``resume``: clean start off with a one-hour session expiry, as an agent connects."""
        self.client = paho.Client(
            CallbackAPIVersion.VERSION2,
            client_id=name or f"probe-{uuid.uuid4().hex[:8]}",
            protocol=MQTTProtocolVersion.MQTTv5,
        )
        if identity is not None:
            identity.configure(self.client)
        if login is not None:
            self.client.username_pw_set(*login)
        self.outcomes: queue.Queue[str] = queue.Queue()
        self.messages: queue.Queue[tuple[str, bytes]] = queue.Queue()
        self.acks: dict[int, str] = {}
        self._acked = threading.Condition()
        self._subscribed: queue.Queue[tuple[int, str]] = queue.Queue()
        self.client.on_connect = lambda _c, _u, _f, reason, _p: self.outcomes.put(
            f"refused: {reason}" if reason.is_failure else "connected"
        )
        self.client.on_disconnect = lambda _c, _u, _f, reason, _p: self.outcomes.put(
            f"disconnected: {reason}"
        )
        self.client.on_connect_fail = lambda _c, _u: self.outcomes.put("failed")
        self.client.on_message = lambda _c, _u, msg: self.messages.put((msg.topic, bytes(msg.payload)))
        self.client.on_subscribe = lambda _c, _u, mid, reasons, _p: self._subscribed.put(
            (mid, str(reasons[0]))
        )
        self.client.on_publish = self._on_publish
        if port is None:
            # The test's operator goes through the operators' listener, every other identity
            # through the devices'.
            is_operator = identity is not None and identity == broker.client_identity
            port = broker.operator_port if is_operator else broker.port
        try:
            props = None
            if resume:
                props = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
                props.SessionExpiryInterval = 3600
            self.client.connect(broker.host, port, clean_start=not resume, properties=props)
        except OSError as exc:  # the TLS handshake failed before any MQTT was spoken
            self.outcomes.put(f"failed: {exc}")
            return
        self.client.loop_start()

    def _on_publish(self, _c: Any, _u: Any, mid: int, reason: Any, _p: Any) -> None:
        with self._acked:
            self.acks[mid] = str(reason)
            self._acked.notify_all()

    def first_outcome(self) -> str:
        """How the connection attempt ended: ``connected``, or how it did not."""
        return self.outcomes.get(timeout=_WAIT_S)

    def subscribe(self, *filters: str) -> list[str]:
        """Subscribe, wait for each SUBACK and return their reasons ("Granted QoS 1", "Not authorized")."""
        reasons = []
        for topic_filter in filters:
            _rc, mid = self.client.subscribe(topic_filter, qos=1)
            got, reason = self._subscribed.get(timeout=_WAIT_S)
            assert got == mid
            reasons.append(reason)
        return reasons

    def publish(self, topic: str, payload: bytes = b"{}", *, retain: bool = False) -> str:
        """Publish at QoS 1 and return the broker's PUBACK reason."""
        info = self.client.publish(topic, payload, qos=1, retain=retain)
        with self._acked:
            assert self._acked.wait_for(lambda: info.mid in self.acks, timeout=_WAIT_S), (
                f"no PUBACK on {topic}"
            )
            return self.acks[info.mid]

    def received_until(self, marker_topic: str) -> list[str]:
        """Topics received up to and including the first message on ``marker_topic``."""
        seen = []
        while True:
            topic, _payload = self.messages.get(timeout=_WAIT_S)
            seen.append(topic)
            if topic == marker_topic:
                return seen

    def close(self) -> None:
        """Disconnect."""
        close_client(self.client)


def test_a_device_reads_and_writes_only_its_own_topics(tls_broker: Broker, fleet: Fleet) -> None:
    a = Probe(tls_broker, fleet.device("box-a"), name="box-a")
    b = Probe(tls_broker, fleet.device("box-b"), name="box-b")
    operator = Probe(tls_broker, fleet.operator)
    try:
        assert a.first_outcome() == b.first_outcome() == operator.first_outcome() == "connected"
        # A asks for B's jobs, cancels and desired state, and for everything: refused at SUBSCRIBE;
        # its own jobs: granted.
        assert a.subscribe(
            "edge/box-b/jobs",
            "edge/box-b/jobs/cancel",
            "edge/box-b/model/desired",
            "edge/#",
            "edge/+/jobs",
            "$CONTROL/dynamic-security/#",
            "edge/box-a/jobs",
        ) == [*["Not authorized"] * 6, "Granted QoS 1"]
        assert b.subscribe("edge/box-b/jobs") == ["Granted QoS 1"]
        assert operator.subscribe("edge/#") == ["Granted QoS 1"]
        for topic in ("edge/box-b/jobs", "edge/box-b/jobs/cancel", "edge/box-b/model/desired"):
            assert operator.publish(topic, b'{"id": "secret-job"}') == "Success"
        assert operator.publish("edge/box-a/jobs", b'{"id": "marker"}') == "Success"
        assert b.received_until("edge/box-b/jobs") == ["edge/box-b/jobs"], "B gets its own job"
        # Everything A received, up to the marker the operator sent last: only its own job.
        assert set(a.received_until("edge/box-a/jobs")) == {"edge/box-a/jobs"}

        # A may publish its own status, telemetry, results and model state, and replies.
        observer = Probe(tls_broker, fleet.operator)
        assert observer.first_outcome() == "connected"
        observer.subscribe("edge/#", "other/#")
        allowed = [
            "edge/box-a/status",
            "edge/box-a/telemetry",
            "edge/box-a/results/j-1",
            "edge/box-a/model/state",
            "edge/replies/0123abcd",
        ]
        for topic in allowed:
            assert a.publish(topic) == "Success", topic
        # ... and nothing of B's, no desired state (not even its own), no jobs.
        for topic in (
            "edge/box-b/results/j-1",
            "edge/box-b/status",
            "edge/box-b/telemetry",
            "edge/box-b/model/state",
            "edge/box-b/jobs",
            "edge/box-a/jobs",
            "edge/box-a/model/desired",
            "edge/box-b/model/desired",
            "edge/groups/pool/model/desired",
            "edge/groups/pool/jobs",
            "other/topic",
            "$CONTROL/dynamic-security/v1",  # the authorization API itself
        ):
            assert a.publish(topic, retain=topic.endswith("desired")) == "Not authorized", topic
        assert a.publish("edge/box-a/telemetry", b"marker") == "Success"
        # Up to A's last message the observer saw exactly A's allowed publications.
        assert observer.received_until("edge/box-a/telemetry") == allowed[:2], "in order"
        assert observer.received_until("edge/box-a/telemetry") == [*allowed[2:], "edge/box-a/telemetry"]
        observer.close()
    finally:
        for probe in (a, b, operator):
            probe.close()


def test_only_the_operator_publishes_desired_state_and_group_jobs(tls_broker: Broker, fleet: Fleet) -> None:
    operator = Probe(tls_broker, fleet.operator)
    device = Probe(tls_broker, fleet.device("box-c"))
    try:
        assert operator.first_outcome() == device.first_outcome() == "connected"
        # Its own membership too: a box may not move itself into another group.
        for topic in (
            "edge/groups/pool/jobs",
            "edge/groups/pool/model/desired",
            "edge/box-c/model/desired",
            "edge/box-c/membership",
        ):
            assert operator.publish(topic) in ACCEPTED, topic
            assert device.publish(topic) == "Not authorized", topic
    finally:
        operator.close()
        device.close()


def test_group_topics_are_readable_by_the_groups_devices_only(
    tls_broker: Broker, fleet: Fleet, tmp_path: Path
) -> None:
    out = tmp_path / "box-g"
    flags = tls_broker.admin_flags()
    live = ["--live", f"{tls_broker.host}:{tls_broker.port}", *flags[4:]]  # --tls-ca/--tls-cert/--tls-key
    assert (
        fleet_cli(
            ["provision", "box-g", "--ca", str(fleet.ca_dir), "--out", str(out), "--group", "pool", *live]
        )
        == 0
    )
    assert 'group = "pool"' in (out / "agent.toml").read_text()
    grouped = Probe(tls_broker, Identity("box-g", out / "ca.crt", out / "box-g.crt", out / "box-g.key"))
    loner = Probe(tls_broker, fleet.device("box-l"))
    operator = Probe(tls_broker, fleet.operator)
    try:
        assert grouped.first_outcome() == loner.first_outcome() == operator.first_outcome() == "connected"
        assert grouped.subscribe(
            "$share/pool/edge/groups/pool/jobs",
            "edge/groups/pool/model/desired",
            "edge/groups/+/model/desired",
            "edge/groups/other/jobs",
            "$share/other/edge/groups/other/jobs",
            "edge/box-g/jobs",
        ) == [
            "Granted QoS 1",
            "Granted QoS 1",
            "Not authorized",
            "Not authorized",
            "Not authorized",
            "Granted QoS 1",
        ]
        assert loner.subscribe("$share/pool/edge/groups/pool/jobs", "edge/box-l/jobs") == [
            "Not authorized",
            "Granted QoS 1",
        ]
        for topic in ("edge/groups/other/jobs", "edge/groups/pool/jobs", "edge/groups/pool/model/desired"):
            assert operator.publish(topic) in ACCEPTED
        for topic in ("edge/box-g/jobs", "edge/box-l/jobs"):
            assert operator.publish(topic) in ACCEPTED
        assert grouped.received_until("edge/box-g/jobs") == [
            "edge/groups/pool/jobs",
            "edge/groups/pool/model/desired",
            "edge/box-g/jobs",
        ], "its group's jobs and desired model, its own jobs; not another group's"
        assert loner.received_until("edge/box-l/jobs") == ["edge/box-l/jobs"], "no group: no group jobs"
    finally:
        for probe in (grouped, loner, operator):
            probe.close()


def test_untrusted_expired_and_missing_certificates_and_plain_tcp_are_refused(
    tls_broker: Broker, fleet: Fleet
) -> None:
    cases: list[tuple[str, Identity | None, str]] = [
        ("untrusted", fleet.stranger("box-a"), "certificate verify failed"),
        ("expired", fleet.expired("box-a"), "certificate verify failed"),
        ("none", Identity("box-a", fleet.ca, None, None), "peer did not return a certificate"),
        ("plain TCP", None, "wrong version number"),
    ]
    # A device's certificate is refused by the operators' listener: it cannot hold a session there.
    device_on_operator_port = Probe(tls_broker, fleet.device("box-a"), port=tls_broker.operator_port)
    try:
        assert device_on_operator_port.first_outcome() != "connected"
    finally:
        device_on_operator_port.close()
    for what, identity, reason in cases:
        logged = len(tls_broker.log.read_text().splitlines())
        probe = Probe(tls_broker, identity)
        try:
            assert probe.first_outcome() != "connected", f"{what}: accepted"
            # The broker says why, in its own log (written before it closes the connection).
            new = tls_broker.log.read_text().splitlines()[logged:]
            assert any(reason in line for line in new), f"{what}: {new}"
        finally:
            probe.close()
    good = Probe(tls_broker, fleet.device("box-a"))
    try:
        assert good.first_outcome() == "connected", "the broker still serves the fleet"
    finally:
        good.close()


def test_agent_over_tls_answers_edge_fleet_and_leaks_no_secret(
    tls_broker: Broker, fleet: Fleet, agents
) -> None:  # type: ignore[no-untyped-def]
    identity = fleet.device("box-s")
    password = "hunter2-" + uuid.uuid4().hex
    agent = agents(
        on=tls_broker,
        device_id="box-s",
        mqtt={"username": "box-s"},
        identity=identity,
    )
    watcher = Probe(tls_broker, fleet.operator)
    try:
        assert watcher.first_outcome() == "connected"
        watcher.subscribe("edge/box-s/#")
        # The password comes from the environment, as a deployment would give it.
        agent.start(env={"EDGE_AGENT_MQTT__PASSWORD": password})
        options = BrokerOptions(
            tls_broker.host,
            tls_broker.operator_port,
            ca=fleet.ca,
            cert=fleet.operator.cert,
            key=fleet.operator.key,
        )
        with Submitter(options) as submitter:
            result = submitter.run(
                "edge/box-s/jobs",
                JobRequest(id="tls-1", prompt="hello", max_tokens=5, stream=True),
                timeout=60,
            )
        assert result.status == "succeeded" and result.usage.completion_tokens == 5
        payloads: list[bytes] = []
        while not any(b'"type":"telemetry"' in p for p in payloads):
            topic, payload = watcher.messages.get(timeout=_WAIT_S)
            payloads.append(payload)
        telemetry = next(json.loads(p) for p in payloads if b'"type":"telemetry"' in p)
        assert telemetry["cert_expires_at"] == certificate_expiry(identity.cert).timestamp()
        assert agent.terminate() == 0
        while True:  # the offline status published at shutdown
            topic, payload = watcher.messages.get(timeout=_WAIT_S)
            payloads.append(payload)
            if topic == "edge/box-s/status" and b'"online":false' in payload:
                break
    finally:
        watcher.close()
    key_body = "".join(identity.key.read_text().splitlines()[1:-1])
    secrets = [password, key_body, key_body[:40], (fleet.ca_dir / "ca.key").read_text().splitlines()[1]]
    log = agent.log_text()
    assert "DEBUG" in log and "connected to 127.0.0.1" in log, "the scan reads a real, verbose log"
    haystacks = {"log": log, **{f"message {i}": p.decode(errors="replace") for i, p in enumerate(payloads)}}
    for where, text in haystacks.items():
        for secret in secrets:
            assert secret not in text, f"a secret appears in the {where}"


def _doctor(config: Path) -> subprocess.CompletedProcess[str]:
    return run_doctor(config, timeout=120)


def test_doctor_verifies_the_tls_handshake_and_the_certificates(
    tls_broker: Broker, fleet: Fleet, agents
) -> None:  # type: ignore[no-untyped-def]
    agent = agents(on=tls_broker, device_id="box-d")
    proc = _doctor(agent.config)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    lines = {
        line.split()[1]: line for line in proc.stdout.splitlines() if line.startswith(("ok", "warn", "fail"))
    }
    assert lines["broker"].startswith("ok") and "reachable TLS verified" in lines["broker"]
    assert lines["certificate"].startswith("ok") and "days left" in lines["certificate"]
    assert lines["tls"].startswith("ok")
    # A broker whose certificate the box cannot verify (another CA) fails the handshake.
    stranger = fleet.stranger("box-d")
    other_ca = agent.config.read_text().replace(str(fleet.device("box-d").ca), str(stranger.cert))
    agent.config.write_text(other_ca)
    bad = _doctor(agent.config)
    assert bad.returncode == 1 and "TLS handshake failed" in bad.stdout, bad.stdout


def test_device_logins_instead_of_certificates(tmp_path: Path, fleet: Fleet, agents) -> None:  # type: ignore[no-untyped-def]
    broker = Broker(tmp_path / "login-broker", fleet, device_logins=True)
    broker.start()
    assert broker.setup is not None
    admin = (broker.setup / "operator-operator.password").read_text().strip()
    passwords = {}
    try:
        for name in ("box-p", "box-q"):
            out = tmp_path / name
            args = ["provision", name, "--ca", str(fleet.ca_dir), "--out", str(out), "--login"]
            live = ["--live", f"{broker.host}:{broker.port}", "--tls-ca", str(fleet.ca)]
            assert fleet_cli([*args, *live, "--username", "operator", "--password", admin]) == 0
            toml = (out / "agent.toml").read_text()
            assert stat.S_IMODE((out / "agent.toml").stat().st_mode) == 0o600, "it holds a secret"
            passwords[name] = next(
                line.split('"')[1] for line in toml.splitlines() if line.startswith("password = ")
            )
        ca_only = Identity("box-p", fleet.ca, None, None)
        wrong = Probe(broker, ca_only, login=("box-p", "not-the-password"))
        try:
            assert wrong.first_outcome().startswith("refused"), "a wrong password is refused"
        finally:
            wrong.close()
        # Each login holds only its own session and its own topics.
        q = Probe(broker, ca_only, login=("box-q", passwords["box-q"]), name="box-p")
        try:
            assert q.first_outcome() in ("connected", "refused: Not authorized")
            if q.outcomes.empty():
                assert q.publish("edge/box-p/results/x") == "Not authorized"
        finally:
            q.close()
        agent = agents(on=broker, device_id="box-p", mqtt={"username": "box-p"}, identity=ca_only)
        agent.start(env={"EDGE_AGENT_MQTT__PASSWORD": passwords["box-p"]})
        options = BrokerOptions(
            broker.host, broker.operator_port, ca=fleet.ca, cert=fleet.operator.cert, key=fleet.operator.key
        )
        with Submitter(options) as submitter:
            result = submitter.run(
                "edge/box-p/jobs", JobRequest(id="pw-1", prompt="hi", max_tokens=3), timeout=60
            )
        assert result.status == "succeeded"
        assert "disconnected from broker" not in agent.log_text(), "the box-p login by box-q changed nothing"
        assert passwords["box-p"] not in agent.log_text()
        # With logins, a revoked device is refused at CONNECT.
        flags = ["--broker", f"{broker.host}:{broker.operator_port}", "--admin-port", str(broker.port)]
        creds = ["--tls-ca", str(fleet.ca), "--username", "operator", "--password", admin]
        assert fleet_cli(["revoke", "box-p", *flags, *creds]) == 0
        again = Probe(broker, ca_only, login=("box-p", passwords["box-p"]))
        try:
            assert again.first_outcome().startswith("refused")
        finally:
            again.close()
    finally:
        broker.cleanup()


def test_an_agent_with_an_expired_certificate_says_so_and_is_refused(
    tls_broker: Broker, fleet: Fleet, agents
) -> None:  # type: ignore[no-untyped-def]
    agent = agents(on=tls_broker, device_id="box-x", identity=fleet.expired("box-x"))
    agent.start(wait_online=False)
    end = time.monotonic() + _WAIT_S
    while "certificate verify failed" not in tls_broker.log.read_text():
        assert time.monotonic() < end, "the broker never saw the agent's certificate"
        time.sleep(0.05)
    log = agent.log_text()
    assert "expired on" in log and "the broker will refuse it" in log
    assert "connected to" not in log
