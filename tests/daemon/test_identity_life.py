"""Issue 24: a box's life after its identity was made — revoke and move lose no job.

Against a real mosquitto started from ``edge-fleet broker init``'s output and real
agents.  mosquitto keeps a revoked or moved box's persistent session (and its
``$share/G/…`` subscription) whatever the rules say; ``revoke`` and ``move`` settle it
(``edge_fleet.sessions``).  Every count of answered jobs is the positive control of
the claim that nothing is lost.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from edge_fleet.cli import main as fleet_cli
from tests.daemon.test_identity import REPLIES, _answered, _answers_one, _doctor, _job, _login_line, _operator
from tests.daemon.test_security import ACCEPTED, Probe
from tests.support.broker import Broker
from tests.support.mqtt_client import Caller
from tests.support.pki import Fleet
from tests.support.wait import wait_until

pytestmark = pytest.mark.e2e


def _operator_flags(broker: Broker) -> list[str]:
    """``--broker`` (the operators' listener) and the TLS flags, without ``--admin-port``."""
    flags = broker.admin_flags()
    at = flags.index("--admin-port")
    return flags[:at] + flags[at + 2 :]


def _status(broker: Broker, capsys: pytest.CaptureFixture[str]) -> dict[str, dict[str, object]]:
    capsys.readouterr()
    assert fleet_cli(["status", "--json", "--wait", "2", *_operator_flags(broker)]) == 0
    return {row["device"]: row for row in map(json.loads, capsys.readouterr().out.splitlines())}


def _members(broker: Broker, fleet: Fleet, agents: Any, *names: str) -> dict[str, Any]:
    """Boxes of group g1, provisioned and running, by name."""
    for name in names:
        fleet.device(name, group="g1")
    members = {name: agents(on=broker, device_id=name, group="g1") for name in names}
    for agent in members.values():
        agent.start()
    return members


def _send(caller: Caller, topic: str, job_ids: list[str]) -> None:
    for job_id in job_ids:
        caller.send(topic, _job(job_id), response_topic=REPLIES)


def test_revoke_ends_the_session_and_the_group_answers_every_job(
    tls_broker: Broker, fleet: Fleet, agents, capsys: pytest.CaptureFixture[str]
) -> None:  # type: ignore[no-untyped-def]
    members = _members(tls_broker, fleet, agents, "box-a", "box-b", "box-r", "box-s")
    # box-s goes offline: its session (and its share of g1) stays on the broker.
    assert members["box-s"].terminate() == 0
    caller = _operator(tls_broker, fleet)
    try:
        # box-r revoked while its agent runs, box-s while it is stopped.
        for name in ("box-r", "box-s"):
            assert fleet_cli(["revoke", name, *tls_broker.admin_flags()]) == 0
            assert f"revoked {name}" in capsys.readouterr().out
        wait_until(
            lambda: (
                "refused the subscription to $share/g1/edge/groups/g1/jobs" in members["box-r"].log_text()
            ),
            what="the revoked agent to come back and be refused",
        )
        jobs = [f"after-revoke-{i}" for i in range(30)]
        _send(caller, "edge/groups/g1/jobs", jobs)
        assert _answered(caller, jobs, timeout=240) == 30, "the other members answer every group job"

        # Revoked, visibly, in `status` (the box's own status is refused from now on) ...
        rows = _status(tls_broker, capsys)
        assert rows["box-r"]["revoked"] is True and rows["box-r"]["online"] is False
        assert rows["box-s"]["revoked"] is True
        assert rows["box-a"]["revoked"] is False and rows["box-a"]["online"] is True  # the control
        # ... and in `devices`, and still after a broker restart (retained, persisted).
        tls_broker.stop()
        tls_broker.start()
        rows = _status(tls_broker, capsys)
        assert rows["box-r"]["revoked"] is True and rows["box-s"]["revoked"] is True
        assert fleet_cli(["devices", "--json", "--wait", "2", *_operator_flags(tls_broker)]) == 0
        inventory = {r["device"]: r for r in map(json.loads, capsys.readouterr().out.splitlines())}
        assert inventory["box-r"]["revoked"] is True and inventory["box-a"]["revoked"] is False
    finally:
        caller.close()


def test_a_move_while_offline_loses_no_job_of_the_old_group(
    tls_broker: Broker, fleet: Fleet, agents, capsys: pytest.CaptureFixture[str]
) -> None:  # type: ignore[no-untyped-def]
    box_b = _members(tls_broker, fleet, agents, "box-a", "box-b")["box-b"]
    assert box_b.terminate() == 0
    caller = _operator(tls_broker, fleet)
    try:
        # While box-b is away: its own jobs, and group jobs (some queue in box-b's session).
        own = ["own-1", "own-2"]
        _send(caller, "edge/box-b/jobs", own)
        before = [f"before-move-{i}" for i in range(10)]
        _send(caller, "edge/groups/g1/jobs", before)
        assert fleet_cli(["move", "box-b", "--group", "g2", *tls_broker.admin_flags()]) == 0
        assert "left g1" in capsys.readouterr().out
        after = [f"after-move-{i}" for i in range(20)]
        _send(caller, "edge/groups/g1/jobs", after)
        assert _answered(caller, after, timeout=240) == 20, "every job sent to g1 after the move"
        assert _answered(caller, before, timeout=120) == 10, "and those held in box-b's session"

        # box-b comes back on g2: its own jobs waited for it; g2's jobs reach it.
        moved = agents(on=tls_broker, device_id="box-b", group="g2")
        moved.workdir, moved.state_dir = box_b.workdir, box_b.state_dir
        moved.config.write_text(box_b.config.read_text().replace('group = "g1"', 'group = "g2"'))
        moved.start()
        caller.send("edge/groups/g2/jobs", _job("g2-1"), response_topic=REPLIES)
        assert _answered(caller, [*own, "g2-1"]) == 3
    finally:
        caller.close()


def test_a_move_while_online_loses_no_job_of_the_old_group(
    tls_broker: Broker, fleet: Fleet, agents: Any
) -> None:
    box_b = _members(tls_broker, fleet, agents, "box-a", "box-b")["box-b"]
    caller = _operator(tls_broker, fleet)
    try:
        # box-b's agent.toml still says g1: it comes back, asks for g1's share again, and is refused.
        assert fleet_cli(["move", "box-b", "--group", "g2", *tls_broker.admin_flags()]) == 0
        wait_until(
            lambda: "refused the subscription to $share/g1/edge/groups/g1/jobs" in box_b.log_text(),
            what="the moved agent to come back under the new rules",
        )
        jobs = [f"online-move-{i}" for i in range(20)]
        _send(caller, "edge/groups/g1/jobs", jobs)
        assert _answered(caller, jobs, timeout=240) == 20
        caller.send("edge/box-b/jobs", _job("own-after-move"), response_topic=REPLIES)
        assert _answered(caller, ["own-after-move"]) == 1, "box-b itself still serves (the control)"
    finally:
        caller.close()


def test_identity_commands_refuse_the_devices_port_as_the_operators_listener(
    tls_broker: Broker, fleet: Fleet, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    fleet.device("box-q", group="g1")
    flags = tls_broker.admin_flags()
    flags[flags.index("--broker") + 1] = f"{tls_broker.host}:{tls_broker.port}"
    assert fleet_cli(["revoke", "box-q", *flags]) == 1
    assert "is the devices' listener" in capsys.readouterr().err
    # `identities` needs only the devices' listener: --broker HOST:PORT is kept (no --admin-port).
    at = flags.index("--admin-port")
    assert fleet_cli(["identities", "--json", *flags[:at], *flags[at + 2 :]]) == 0
    assert "box-q" in capsys.readouterr().out


def _retained(broker: Broker, fleet: Fleet, topic_filter: str) -> set[str]:
    """Topics holding a retained message under ``topic_filter`` (a fresh subscriber's burst, ended by a
    marker the same client publishes after subscribing)."""
    probe = Probe(broker, fleet.operator)
    try:
        assert probe.first_outcome() == "connected"
        assert probe.subscribe(topic_filter, "edge/marker/retained-probe") == ["Granted QoS 1"] * 2
        probe.publish("edge/marker/retained-probe", b"m")
        return {t for t in probe.received_until("edge/marker/retained-probe") if "marker" not in t}
    finally:
        probe.close()


def test_retained_messages_where_devices_have_no_reason_to_retain_are_cleared(
    tls_broker: Broker, fleet: Fleet, capsys: pytest.CaptureFixture[str]
) -> None:
    device = Probe(tls_broker, fleet.device("box-x"), name="box-x")
    try:
        assert device.first_outcome() == "connected"
        flooded = [f"edge/replies/flood-{i}" for i in range(5)] + [
            "edge/box-x/results/r1",
            "edge/box-x/telemetry",
        ]
        for topic in flooded:
            assert device.publish(topic, b"x" * 1024, retain=True) in ACCEPTED
        assert device.publish("edge/box-x/status", b'{"online": true}', retain=True) in ACCEPTED
        assert set(flooded) <= _retained(tls_broker, fleet, "edge/#"), "the broker kept them"
        assert fleet_cli(["broker", "sweep", *_operator_flags(tls_broker)]) == 0
        assert f"cleared {len(flooded)} retained" in capsys.readouterr().out
        assert _retained(tls_broker, fleet, "edge/#") == {"edge/box-x/status"}, (
            "its status stays (the control)"
        )
    finally:
        device.close()


def test_doctor_leaves_a_running_agent_alone_and_a_takeover_is_named(
    tls_broker: Broker, fleet: Fleet, agents: Any
) -> None:
    fleet.device("box-d", group="g4")
    agent = agents(on=tls_broker, device_id="box-d", group="g4")
    agent.start()
    caller = _operator(tls_broker, fleet)
    try:
        wait_until(lambda: (agent.state_dir / "link.json").exists(), what="the agent to report its link")
        proc = _doctor(agent.config)
        line = _login_line(proc)
        assert line.startswith("ok") and "is running, so doctor did not log in" in line, proc.stdout
        assert "subscriptions granted" in line
        caller.send("edge/box-d/jobs", _job("after-doctor"), response_topic=REPLIES)
        assert _answered(caller, ["after-doctor"]) == 1
        assert "disconnected from broker" not in agent.log_text(), "doctor did not disturb it"
        # Another connection with box-d's certificate takes the session: said in those words.
        clone = Probe(tls_broker, fleet.device("box-d"), resume=True)
        try:
            assert clone.first_outcome() == "connected"
        finally:
            clone.close()
        wait_until(
            lambda: "session taken over by another connection with this identity" in agent.log_text(),
            what="the agent to name the takeover",
        )
        assert "a certificate it does not accept" not in agent.log_text()
        caller.send("edge/box-d/jobs", _job("after-takeover"), response_topic=REPLIES)
        assert _answered(caller, ["after-takeover"]) == 1, "it took its session back"
    finally:
        caller.close()


def test_move_is_one_command_the_box_switches_group_without_a_restart(
    tls_broker: Broker, fleet: Fleet, agents: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    box_b = _members(tls_broker, fleet, agents, "box-a", "box-b")["box-b"]
    assert box_b.proc is not None
    pid, toml = box_b.proc.pid, box_b.config.read_text()
    caller = _operator(tls_broker, fleet)
    try:
        assert fleet_cli(["move", "box-b", "--group", "g2", *tls_broker.admin_flags()]) == 0
        wait_until(
            lambda: "membership from the fleet: group g2" in box_b.log_text(),
            what="the agent to apply the pushed membership",
        )
        wait_until(
            lambda: _status(tls_broker, capsys).get("box-b", {}).get("group") == "g2",
            what="status to show box-b in g2",
            timeout=15,
        )
        caller.send("edge/groups/g2/jobs", _job("g2-only-b"), response_topic=REPLIES)
        assert _answered(caller, ["g2-only-b"]) == 1, "box-b serves g2 (its only member)"
        jobs = [f"g1-after-{i}" for i in range(20)]
        _send(caller, "edge/groups/g1/jobs", jobs)
        assert _answered(caller, jobs, timeout=240) == 20
        assert box_b.proc.pid == pid and box_b.proc.poll() is None, "no restart"
        assert box_b.config.read_text() == toml, "no agent.toml edit"
        # A restart starts in the pushed group (kept in state_dir), agent.toml still saying g1.
        assert box_b.terminate() == 0
        again = agents(on=tls_broker, device_id="box-b", group="g1")
        again.workdir, again.state_dir = box_b.workdir, box_b.state_dir
        again.config.write_text(toml)
        again.start()
        caller.send("edge/groups/g2/jobs", _job("g2-after-restart"), response_topic=REPLIES)
        assert _answered(caller, ["g2-after-restart"]) == 1
        assert "group g2" in again.log_text().split("starting: device box-b, ")[-1][:20]
    finally:
        caller.close()


def _identities(broker: Broker, capsys: pytest.CaptureFixture[str]) -> dict[str, dict[str, object]]:
    """The broker's own authorization state, through `identities --json` on the devices' listener."""
    flags = broker.admin_flags()
    flags[flags.index("--broker") + 1] = f"{broker.host}:{broker.port}"
    at = flags.index("--admin-port")
    capsys.readouterr()
    assert fleet_cli(["identities", "--json", *flags[:at], *flags[at + 2 :]]) == 0
    return {row["name"]: row for row in map(json.loads, capsys.readouterr().out.splitlines())}


def test_an_operator_named_like_a_device_and_the_reverse_are_refused_on_a_live_broker(
    tls_broker: Broker, fleet: Fleet, agents: Any, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    fleet.device("box-a", group="g1")
    box_a = agents(on=tls_broker, device_id="box-a", group="g1")
    box_a.start()
    before = _identities(tls_broker, capsys)
    assert before["box-a"]["kind"] == "device" and before["operator"]["kind"] == "operator"
    live = ["--live", f"{tls_broker.host}:{tls_broker.port}", *tls_broker.admin_flags()[4:]]
    ca = ["--ca", str(fleet.ca_dir)]
    # An operator certificate named like the running device: refused, nothing written.
    assert fleet_cli(["provision", "box-a", "--operator", *ca, "--out", str(tmp_path / "op-a")]) == 1
    assert "box-a" in capsys.readouterr().err
    assert not (tmp_path / "op-a" / "box-a.crt").exists()
    # A device named like the fleet's operator, registered live: refused, the broker unchanged.
    device_op = ["provision", "operator", *ca, "--out", str(tmp_path / "dev-op"), "--group", "g1", *live]
    assert fleet_cli(device_op) == 1
    assert "operator" in capsys.readouterr().err
    assert not (tmp_path / "dev-op" / "operator.crt").exists()
    # The control: a free name is provisioned live the same way.
    free = ["provision", "box-c", *ca, "--out", str(tmp_path / "box-c"), "--group", "g1", *live]
    assert fleet_cli(free) == 0
    after = _identities(tls_broker, capsys)
    assert after["box-c"]["kind"] == "device"
    assert after["operator"] == before["operator"] and after["box-a"] == before["box-a"]
    # box-a's agent kept its session: it answers, and never saw a takeover.
    assert _answers_one(tls_broker, fleet, "edge/box-a/jobs", "still-box-a")
    assert "taken over" not in box_a.log_text()
