"""Issue 13's attacks, against a real mosquitto started from ``edge-fleet broker init``'s output.

An attacker holds a valid device certificate (box-a's) and tries to take box-b's
client id, its session and the jobs queued in it, and to join a group's shared
subscription; the operator provisions, moves, revokes and renews identities on
the running broker.  Every negative assertion has its positive control beside it:
the real device answers every job.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest

from edge_fleet.cli import main as fleet_cli
from tests.daemon.test_security import Probe
from tests.support.agent import run_doctor
from tests.support.broker import Broker, mosquitto_binary, open_folder
from tests.support.mqtt_client import Caller
from tests.support.pki import Fleet, Identity
from tests.support.wait import wait_until

pytestmark = pytest.mark.e2e

_WAIT_S = 30.0  # generous: the machine is shared; every wait ends on an event
REPLIES = "edge/replies/identity-test"
GRANTED, REFUSED = "Granted QoS 1", "Not authorized"


def _wait_for(predicate, what: str, timeout: float = _WAIT_S) -> None:  # type: ignore[no-untyped-def]
    end = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < end, what
        time.sleep(0.05)


def _answered(caller: Caller, ids: list[str], timeout: float = 120.0) -> int:
    """How many of ``ids`` got a succeeded result (waits until all did or ``timeout``)."""
    end = time.monotonic() + timeout
    while time.monotonic() < end and not all(caller.results(i) for i in ids):
        time.sleep(0.1)
    return sum(1 for i in ids if any(r["status"] == "succeeded" for r in caller.results(i)))


def _answers_one(broker: Broker, fleet: Fleet, topic: str, job_id: str) -> bool:
    """Whether a job sent on ``topic`` (as the fleet's operator) gets a succeeded result."""
    caller = _operator(broker, fleet)
    try:
        caller.send(topic, _job(job_id), response_topic=REPLIES)
        return _answered(caller, [job_id]) == 1
    finally:
        caller.close()


def _job(job_id: str) -> dict[str, object]:
    return {"id": job_id, "prompt": "hi", "max_tokens": 2}


def _operator(broker: Broker, fleet: Fleet) -> Caller:
    return Caller(broker.host, broker.operator_port, REPLIES, identity=fleet.operator)


def _user_of(pid: int) -> str:
    import pwd

    uid = next(
        int(line.split()[1])
        for line in Path(f"/proc/{pid}/status").read_text().splitlines()
        if line.startswith("Uid:")
    )
    return pwd.getpwuid(uid).pw_name


def test_the_broker_runs_as_the_mosquitto_user_from_broker_inits_files(tls_broker: Broker) -> None:
    assert tls_broker.proc is not None
    if os.geteuid() == 0:
        assert _user_of(tls_broker.proc.pid) == "mosquitto", "started as root, it dropped privileges"
    assert "autosave_interval 5" in (tls_broker.setup / "conf.d" / "edge.conf").read_text()  # type: ignore[operator]


def test_operators_tools_keep_many_connections_as_one_identity(tls_broker: Broker, fleet: Fleet) -> None:
    # `watch` beside `rollout` beside `submit`: the same operator certificate, three connections.
    tools = [Probe(tls_broker, fleet.operator) for _ in range(3)]
    try:
        assert [t.first_outcome() for t in tools] == ["connected"] * 3
        assert all(t.subscribe("edge/+/status") == [GRANTED] for t in tools)
        assert tools[0].publish("edge/box-z/status", b"{}") == "Success"
        for tool in tools:
            topic, _payload = tool.messages.get(timeout=_WAIT_S)
            assert topic == "edge/box-z/status"
        assert all(t.outcomes.empty() for t in tools), "none of them was disconnected"
    finally:
        for tool in tools:
            tool.close()


def test_an_impostor_cannot_take_a_devices_client_id_session_or_queued_jobs(
    tls_broker: Broker, fleet: Fleet, agents
) -> None:  # type: ignore[no-untyped-def]
    fleet.device("box-a")
    box_b = agents(on=tls_broker, device_id="box-b")
    box_b.start()  # its session (subscriptions, one-hour expiry) now exists
    caller = _operator(tls_broker, fleet)
    try:
        # While box-b is online, box-a's certificate asks for the client id box-b, again and again.
        for _ in range(5):
            impostor = Probe(tls_broker, fleet.device("box-a"), name="box-b", resume=True)
            assert impostor.first_outcome() == "connected"  # ... as box-a: the id is its CN
            impostor.close()
        caller.send("edge/box-b/jobs", _job("online-1"), response_topic=REPLIES)
        assert _answered(caller, ["online-1"]) == 1
        assert "Session taken over" not in box_b.log_text()
        assert "disconnected from broker" not in box_b.log_text(), "box-b was never disturbed"
        log = tls_broker.log.read_text()
        assert "as box-a (" in log and "Client box-b already connected" not in log

        # box-b goes offline; three jobs wait in its session; box-a's certificate resumes "box-b".
        assert box_b.terminate() == 0
        jobs = ["queued-1", "queued-2", "queued-3"]
        for job_id in jobs:
            caller.send("edge/box-b/jobs", _job(job_id), response_topic=REPLIES)
        hijack = Probe(tls_broker, fleet.device("box-a"), name="box-b", resume=True)
        try:
            assert hijack.first_outcome() == "connected"
            assert hijack.subscribe("edge/box-b/jobs", "edge/box-a/jobs") == [REFUSED, GRANTED]
            caller.send("edge/box-a/jobs", {"id": "marker"}, response_topic=None)
            topic, _payload = hijack.messages.get(timeout=_WAIT_S)
            assert topic == "edge/box-a/jobs", "it holds box-a's own session: none of box-b's jobs"
        finally:
            hijack.close()
        box_b.start()
        assert _answered(caller, jobs) == 3, "box-b answers every job queued for it"
    finally:
        caller.close()


def test_an_outsider_cannot_join_a_groups_shared_subscription(
    tls_broker: Broker, fleet: Fleet, agents
) -> None:  # type: ignore[no-untyped-def]
    fleet.device("box-b", group="g1")
    box_b = agents(on=tls_broker, device_id="box-b", group="g1")
    box_b.start()
    outsider = Probe(tls_broker, fleet.device("box-a"), resume=True)
    caller = _operator(tls_broker, fleet)
    try:
        assert outsider.first_outcome() == "connected"
        assert outsider.subscribe("$share/g1/edge/groups/g1/jobs", "edge/groups/g1/jobs") == [
            REFUSED,
            REFUSED,
        ]
        jobs = [f"group-{i}" for i in range(20)]
        for job_id in jobs:
            caller.send("edge/groups/g1/jobs", _job(job_id), response_topic=REPLIES)
        assert _answered(caller, jobs, timeout=240) == 20, "every group job is answered"
        assert outsider.messages.empty()
    finally:
        outsider.close()
        caller.close()


def test_a_device_provisioned_and_moved_while_the_broker_runs(
    tls_broker: Broker, fleet: Fleet, agents, tmp_path: Path
) -> None:  # type: ignore[no-untyped-def]
    out = tmp_path / "box-n"
    flags = tls_broker.admin_flags()
    live = ["--live", f"{tls_broker.host}:{tls_broker.port}", *flags[4:]]
    args = ["provision", "box-n", "--ca", str(fleet.ca_dir), "--out", str(out), "--group", "g2"]
    assert fleet_cli([*args, *live]) == 0
    identity = Identity("box-n", out / "ca.crt", out / "box-n.crt", out / "box-n.key")
    agent = agents(on=tls_broker, device_id="box-n", group="g2", identity=identity)
    agent.start()
    caller = _operator(tls_broker, fleet)
    try:
        caller.send("edge/groups/g2/jobs", _job("g2-1"), response_topic=REPLIES)
        assert _answered(caller, ["g2-1"]) == 1, "its group's jobs, with no restart and no SIGHUP"
        # Moved to g3: g2's shared subscription is refused from now on, g3's granted.
        assert fleet_cli(["move", "box-n", "--group", "g3", *flags]) == 0
        probe = Probe(tls_broker, identity)
        try:
            assert probe.first_outcome() == "connected"
            assert probe.subscribe("$share/g2/edge/groups/g2/jobs", "$share/g3/edge/groups/g3/jobs") == [
                REFUSED,
                GRANTED,
            ]
        finally:
            probe.close()
        # The box follows (its agent.toml now says g3). Its session still held g2's shared
        # subscription, which would keep drawing half of g2's jobs only to have the broker refuse
        # their delivery: the agent leaves it. Another member of g2 then answers 10/10.
        assert agent.terminate() == 0
        moved = agents(on=tls_broker, device_id="box-n", group="g3", identity=identity)
        moved.workdir, moved.state_dir = agent.workdir, agent.state_dir
        moved.config.write_text(agent.config.read_text().replace('group = "g2"', 'group = "g3"'))
        moved.start()
        # Left by the running agent when the pushed membership reached it before it stopped, else
        # by the restarted one as it connects (which may come after start() returns: the old
        # agent's recent online status can satisfy start()'s wait): wait for the line.
        wait_until(
            lambda: "leaving $share/g2/edge/groups/g2/jobs" in agent.log_text() + moved.log_text(),
            what="the moved agent to leave g2's shared subscription",
        )
        fleet.device("box-m", group="g2")
        member = agents(on=tls_broker, device_id="box-m", group="g2")
        member.start()
        jobs = [f"g2-after-{i}" for i in range(10)]
        for job_id in jobs:
            caller.send("edge/groups/g2/jobs", _job(job_id), response_topic=REPLIES)
        assert _answered(caller, jobs) == 10
    finally:
        caller.close()


def test_a_revoked_device_is_cut_off_at_once_and_cannot_come_back(
    tls_broker: Broker, fleet: Fleet, agents, capsys: pytest.CaptureFixture[str]
) -> None:  # type: ignore[no-untyped-def]
    revoked = agents(on=tls_broker, device_id="box-r")
    revoked.start()
    other = agents(on=tls_broker, device_id="box-c")
    other.start()
    caller = _operator(tls_broker, fleet)
    try:
        caller.send("edge/box-r/jobs", _job("before"), response_topic=REPLIES)
        assert _answered(caller, ["before"]) == 1
        assert fleet_cli(["revoke", "box-r", *tls_broker.admin_flags()]) == 0
        assert "revoked box-r" in capsys.readouterr().out
        assert fleet_cli(["identities", "--json", *tls_broker.admin_flags()]) == 0
        rows = {row["name"]: row for row in map(json.loads, capsys.readouterr().out.splitlines())}
        assert rows["box-r"]["state"] == "revoked" and rows["box-c"]["state"] == "active"
        assert rows["operator"]["kind"] == "operator"
        _wait_for(
            lambda: "disconnected from broker" in revoked.log_text(), "the revoked box was not disconnected"
        )
        # It reconnects (mosquitto 2.0 accepts the certificate) but every subscription is refused ...
        _wait_for(
            lambda: "refused the subscription to edge/box-r/jobs" in revoked.log_text(),
            "the revoked box's subscriptions were not refused",
        )
        probe = Probe(tls_broker, fleet.device("box-r"))
        try:
            assert probe.first_outcome() == "connected"
            assert probe.subscribe("edge/box-r/jobs") == [REFUSED]
            assert probe.publish("edge/box-r/status") == REFUSED
        finally:
            probe.close()
        # ... so its jobs go unanswered, while another box (the positive control) answers.
        caller.send("edge/box-r/jobs", _job("after"), response_topic=REPLIES)
        caller.send("edge/box-c/jobs", _job("control"), response_topic=REPLIES)
        assert _answered(caller, ["control"]) == 1
        # "after" went out first; a box that still received it would have answered by the time
        # the control box answers a second job sent after the first was answered.
        caller.send("edge/box-c/jobs", _job("control-2"), response_topic=REPLIES)
        assert _answered(caller, ["control-2"]) == 1
        assert caller.results("after") == []
    finally:
        caller.close()


def test_a_renewed_certificate_keeps_the_agent_serving(
    tls_broker: Broker, fleet: Fleet, agents, tmp_path: Path
) -> None:  # type: ignore[no-untyped-def]
    source = fleet.device("box-w")
    folder = tmp_path / "box-w-identity"
    shutil.copytree(source.cert.parent, folder)  # type: ignore[union-attr]
    identity = Identity("box-w", folder / "ca.crt", folder / "box-w.crt", folder / "box-w.key")
    agent = agents(on=tls_broker, device_id="box-w", identity=identity)
    agent.start()
    old_serial = identity.cert.read_bytes()  # type: ignore[union-attr]
    caller = _operator(tls_broker, fleet)
    try:
        tls_broker.stop()
        assert fleet_cli(["renew", "box-w", "--ca", str(fleet.ca_dir), "--out", str(folder)]) == 0
        assert identity.cert.read_bytes() != old_serial  # type: ignore[union-attr]
        tls_broker.start()
        caller.send("edge/box-w/jobs", _job("renewed-1"), response_topic=REPLIES)
        assert _answered(caller, ["renewed-1"]) == 1
        assert "loaded the renewed TLS files" in agent.log_text()
    finally:
        caller.close()


def _doctor(config: Path) -> subprocess.CompletedProcess[str]:
    return run_doctor(config, timeout=180)


def _login_line(proc: subprocess.CompletedProcess[str]) -> str:
    return next((line for line in proc.stdout.splitlines() if line.split()[1:2] == ["login"]), proc.stdout)


def test_doctor_fails_for_a_rejected_certificate_and_a_denied_group(
    tls_broker: Broker, fleet: Fleet, agents
) -> None:  # type: ignore[no-untyped-def]
    fleet.device("box-d", group="g4")
    good = agents(on=tls_broker, device_id="box-d", group="g4")
    proc = _doctor(good.config)
    assert _login_line(proc).startswith("ok"), proc.stdout
    # Another CA's certificate: the TLS handshake with the broker passes, the login does not.
    stranger = agents(on=tls_broker, device_id="box-e", identity=fleet.stranger("box-e"))
    proc = _doctor(stranger.config)
    assert proc.returncode == 1
    assert _login_line(proc).startswith("fail") and "rejected this client certificate" in _login_line(proc)
    # A group the broker does not give this device: its shared subscription is refused.
    wrong_group = agents(on=tls_broker, device_id="box-d", group="g5")
    proc = _doctor(wrong_group.config)
    assert proc.returncode == 1
    line = _login_line(proc)
    assert line.startswith("fail") and "$share/g5/edge/groups/g5/jobs refused: Not authorized" in line


def test_edge_fleet_names_the_refused_identity_at_once(
    tls_broker: Broker, fleet: Fleet, capsys: pytest.CaptureFixture[str]
) -> None:
    device = fleet.device("box-f")
    # A device certificate on the devices' port, publishing a job: refused, said at once.
    flags = ["--broker", f"{tls_broker.host}:{tls_broker.port}", "--tls-ca", str(fleet.ca)]
    started = time.monotonic()
    code = fleet_cli(
        [
            "submit",
            "--device",
            "box-f",
            "hi",
            *flags,
            "--tls-cert",
            str(device.cert),
            "--tls-key",
            str(device.key),
        ]
    )
    err = capsys.readouterr().err
    assert code == 1 and "not authorized as box-f" in err, err
    assert time.monotonic() - started < 60, "said at once, not after the 300 s result timeout"
    # A view that subscribes: the refusal is printed, not an empty fleet shown in silence.
    fleet_cli(["status", *flags, "--tls-cert", str(device.cert), "--tls-key", str(device.key)])
    assert "not authorized as box-f" in capsys.readouterr().err
    # No --tls-ca: the verify failure names the flag.
    op = fleet.operator
    base = ["submit", "--device", "box-f", "hi", "--broker", f"{tls_broker.host}:{tls_broker.operator_port}"]
    assert fleet_cli([*base, "--tls-cert", str(op.cert), "--tls-key", str(op.key)]) == 1
    assert "--tls-ca" in capsys.readouterr().err
    # No client certificate: the flags to give are named.
    assert fleet_cli([*base, "--tls-ca", str(fleet.ca)]) == 1
    assert "--tls-cert and --tls-key" in capsys.readouterr().err


STOCK_DEBIAN_CONF = """\
# Place your local configuration in /etc/mosquitto/conf.d/
#
# A full description of the configuration file is at
# /usr/share/doc/mosquitto/examples/mosquitto.conf.example

pid_file /run/mosquitto/mosquitto.pid

persistence true
persistence_location /var/lib/mosquitto/

log_dest file /var/log/mosquitto/mosquitto.log

include_dir /etc/mosquitto/conf.d
"""


def test_the_documented_debian_setup_works_as_typed_and_keeps_state_across_a_crash(fleet: Fleet) -> None:
    """Debian 12's stock mosquitto.conf in a temporary root, the README's two steps, mosquitto as root."""
    root = open_folder("debian-root-")
    proc: subprocess.Popen[bytes] | None = None
    try:
        etc = root / "etc" / "mosquitto"
        (etc / "conf.d").mkdir(parents=True)
        (etc / "mosquitto.conf").write_text(STOCK_DEBIAN_CONF.replace(" /", f" {root}/"))
        for folder in ("var/lib/mosquitto", "var/log/mosquitto", "run/mosquitto"):
            (root / folder).mkdir(parents=True)
            if os.geteuid() == 0:
                shutil.chown(root / folder, "mosquitto", "mosquitto")  # as the Debian package does
        from tests.support.broker import free_port

        port, operator_port = free_port(), free_port()
        # README, "Setting up the broker", with this root's paths.
        assert (
            fleet_cli(
                [
                    "broker", "init", "--ca", str(fleet.ca_dir), "--hostname", "localhost",
                    "--hostname", "127.0.0.1", "--out", str(etc / "edge"), "--port", str(port),
                    "--operator-port", str(operator_port), "--bind", "127.0.0.1",
                ]
            )
            == 0
        )  # fmt: skip
        shutil.copy(etc / "edge" / "conf.d" / "edge.conf", etc / "conf.d" / "edge.conf")

        def start() -> subprocess.Popen[bytes]:
            started = subprocess.Popen(
                [mosquitto_binary(), "-c", str(etc / "mosquitto.conf")], stderr=subprocess.DEVNULL
            )
            broker.proc = started
            try:
                _wait_for(lambda: _listening(port) and _listening(operator_port), "mosquitto did not start")
            except AssertionError:
                started.kill()
                started.wait(10)
                log = root / "var/log/mosquitto/mosquitto.log"
                raise AssertionError(log.read_text() if log.exists() else "no log") from None
            return started

        broker = Broker.__new__(Broker)  # the Probe helper needs host, ports and identity only
        broker.host, broker.port, broker.operator_port = "127.0.0.1", port, operator_port
        broker.client_identity = fleet.operator
        proc = start()
        if os.geteuid() == 0:
            assert _user_of(proc.pid) == "mosquitto", "started as root, it runs as the user mosquitto"
        from tests.support.pki import Fleet as _Fleet

        _Fleet.register_on(fleet, broker, "box-a", None)
        device, operator = Probe(broker, fleet.device("box-a")), Probe(broker, fleet.operator)
        try:
            assert device.first_outcome() == operator.first_outcome() == "connected"
            assert device.subscribe("edge/box-a/model/desired") == [GRANTED]
            assert operator.publish("edge/box-a/model/desired", b'{"v": 1}', retain=True) == "Success"
        finally:
            device.close()
            operator.close()
        # autosave_interval 5: within seconds the database holds the retained state; kill -9 then.
        database = root / "var/lib/mosquitto/mosquitto.db"
        mtime = database.stat().st_mtime if database.exists() else 0.0
        # mosquitto writes the database aside and renames it: a newer one is complete.
        _wait_for(
            lambda: (
                database.exists()
                and database.stat().st_mtime > mtime
                and b'{"v": 1}' in database.read_bytes()
            ),
            "no autosave holding the retained state",
            20,
        )
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
        proc = start()
        again = Probe(broker, fleet.device("box-a"))
        try:
            assert again.first_outcome() == "connected"
            assert again.subscribe("edge/box-a/model/desired") == [GRANTED], "dynsec state survived"
            topic, payload = again.messages.get(timeout=_WAIT_S)
            assert (topic, payload) == ("edge/box-a/model/desired", b'{"v": 1}'), "retained state survived"
        finally:
            again.close()
    finally:
        if proc is not None and proc.poll() is None:
            proc.terminate()
            proc.wait(10)
        shutil.rmtree(root, ignore_errors=True)


def _listening(port: int) -> bool:
    import socket

    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.2):
            return True
    except OSError:
        return False


def test_a_box_the_broker_keeps_dropping_backs_off_and_says_why(
    tls_broker: Broker, fleet: Fleet, agents
) -> None:  # type: ignore[no-untyped-def]
    # Another CA's certificate: the TLS handshake completes on the box's side, then the broker
    # drops the connection — each time. The agent must not retry once a second forever.
    agent = agents(on=tls_broker, device_id="box-x", identity=fleet.stranger("box-x"))
    agent.start(wait_online=False)

    def delays() -> list[float]:
        marker = "next connection attempt in "
        return [
            float(line.split(marker)[1].split(" s")[0])
            for line in agent.log_text().splitlines()
            if marker in line
        ]

    _wait_for(lambda: len(delays()) >= 5, "the agent did not retry", timeout=90)
    waits = delays()[:5]
    for n, wait in enumerate(waits):
        assert 2**n / 2 <= wait <= 2**n, waits  # 0.5-1, 1-2, 2-4, 4-8, 8-16 s: doubling, jittered
    log = agent.log_text()
    assert "cannot connect to broker" in log or "the broker closed it" in log
    assert "connected to 127.0.0.1" not in log
