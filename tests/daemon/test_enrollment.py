"""Issue 24: a box enrolls itself from a claim — its key made on the box, its CSR over the broker, its
certificate, group and labels from the fleet — and serves a group job."""

from __future__ import annotations

import json
import stat
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import pytest

from agent.enroll import EnrollError, enroll
from edge_contract.protocol import FleetTopics, Topics, enroll_topics
from edge_fleet.cli import main as fleet_cli
from tests.daemon.test_identity import REPLIES, _answered, _answers_one, _job, _operator
from tests.daemon.test_identity_life import _status
from tests.daemon.test_security import ACCEPTED, Probe
from tests.support.broker import Broker
from tests.support.pki import Fleet, Identity
from tests.support.wait import wait_until

pytestmark = pytest.mark.e2e


def _serve(broker: Broker, fleet: Fleet, count: int) -> threading.Thread:
    """`edge-fleet enroll serve --count N` on its own thread (it returns after N answers)."""
    codes: list[int] = []
    thread = threading.Thread(
        target=lambda: codes.append(
            fleet_cli(
                ["enroll", "serve", "--ca", str(fleet.ca_dir), "--count", str(count), *broker.admin_flags()]
            )
        ),
        daemon=True,
    )
    thread.start()
    return thread


def _claim(broker: Broker, fleet: Fleet, name: str, out: Path, *flags: str) -> Path:
    """`edge-fleet claim create NAME --out OUT FLAGS…` on ``broker``; returns ``out``."""
    create = ["claim", "create", name, "--ca", str(fleet.ca_dir), "--out", str(out), *flags]
    assert fleet_cli([*create, *broker.admin_flags()]) == 0
    return out


def _enrolling(
    broker: Broker, claim: Path, out: Path, names: list[str], timeout_s: float = 60
) -> tuple[list[threading.Thread], dict[str, Path | Exception]]:
    """Boxes ``names`` enrolling at once on ``claim`` (started threads), and where each one's
    certificate or error lands."""
    outcome: dict[str, Path | Exception] = {}

    def box(name: str) -> None:
        try:
            outcome[name] = enroll(name, claim, (broker.host, broker.port), out / name, timeout_s=timeout_s)
        except Exception as exc:  # the caller reads it
            outcome[name] = exc

    threads = [threading.Thread(target=box, args=(name,), daemon=True) for name in names]
    for thread in threads:
        thread.start()
    return threads, outcome


def enrollment_desk(broker: Broker, fleet: Fleet) -> Any:
    """The fleet server's enrollment desk beside ``fleet``'s CA, as its operator on ``broker``."""
    from edge_fleet.broker import BrokerOptions
    from edge_fleet.server.api.enrollments import EnrollmentDesk

    op = fleet.operator
    options = BrokerOptions(broker.host, broker.operator_port, ca=op.ca, cert=op.cert, key=op.key)
    return EnrollmentDesk(
        fleet.ca_dir, options, BrokerOptions(broker.host, broker.port, ca=op.ca, cert=op.cert, key=op.key)
    )


def _two_waiting(broker: Broker, fleet: Fleet, tmp_path: Path, claim: str, names: list[str]) -> Any:
    """A manual claim, `enroll serve` for two requests, a server store, and boxes ``names``
    enrolling: ``(serving, store, threads, outcome)``."""
    from edge_fleet.server.db import Database
    from edge_fleet.server.store import Store

    flags = ["--group", "g1", "--approve", "manual", "--count", "2"]
    path = _claim(broker, fleet, claim, tmp_path / "claim", *flags)
    serving = _serve(broker, fleet, count=2)
    store = Store(Database(str(tmp_path / "server.sqlite3")))
    return (serving, store, *_enrolling(broker, path, tmp_path, names, timeout_s=90))


def _check_decisions(waiting: Any, out: Path, claim: str, approved: str, rejected: str) -> None:
    """Both boxes of ``_two_waiting`` heard their decision (``approved`` has its certificate,
    ``rejected`` the operator's reason), and the audit log holds both, by the operator."""
    serving, store, threads, outcome = waiting
    for thread in threads:
        thread.join(timeout=60)
    serving.join(timeout=30)
    assert outcome[approved] == out / approved / f"{approved}.crt"
    assert isinstance(outcome[rejected], EnrollError)
    assert f"rejected the enrollment of {rejected} under {claim} (unknown box)" in str(outcome[rejected])
    decisions = [
        (e.actor, e.action, e.target) for e in store.audit_log() if e.action.startswith("enrollment.")
    ]
    assert decisions == [
        ("operator-1", "enrollment.approve", approved),
        ("operator-1", "enrollment.reject", rejected),
    ]


def test_a_fresh_box_enrolls_from_a_claim_and_serves_its_group(
    tls_broker: Broker, fleet: Fleet, agents: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    flags = ["--group", "g1", "--label", "site=shop3", "--count", "1"]
    claim = _claim(tls_broker, fleet, "shop3", tmp_path / "image" / "claim", *flags)
    serving = _serve(tls_broker, fleet, count=2)
    box = tmp_path / "box-z" / "identity"  # the box's own disk: nothing here comes from the operator
    cert = enroll("box-z", claim, (tls_broker.host, tls_broker.port), box, timeout_s=60)
    key = box / "box-z.key"
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    assert not list(fleet.ca_dir.rglob("box-z.key")), "the private key exists on the box only"
    assert "box-z" in (fleet.ca_dir / "devices.txt").read_text().split()
    # The claim was for one box: a second one is refused, with the reason.
    with pytest.raises(EnrollError, match="used up"):
        enroll("box-y", claim, (tls_broker.host, tls_broker.port), tmp_path / "box-y", timeout_s=60)
    serving.join(timeout=30)

    # Its agent.toml names no group or labels: the fleet pushed g1 and site=shop3 with the certificate.
    agent = agents(on=tls_broker, device_id="box-z", identity=Identity("box-z", box / "ca.crt", cert, key))
    agent.start()
    assert _answers_one(tls_broker, fleet, "edge/groups/g1/jobs", "enrolled-1")
    assert 'membership from the fleet: group g1, labels {"site": "shop3"}' in agent.log_text()
    wait_until(
        lambda: _status(tls_broker, capsys).get("box-z", {}).get("labels") == {"site": "shop3"},
        what="status to show the claim's labels",
        timeout=15,
    )
    # A move changes the group and keeps the claim's labels.
    assert fleet_cli(["move", "box-z", "--group", "g2", *tls_broker.admin_flags()]) == 0
    wait_until(
        lambda: _status(tls_broker, capsys).get("box-z", {}).get("group") == "g2",
        what="status to show box-z in g2",
        timeout=15,
    )
    assert _status(tls_broker, capsys)["box-z"]["labels"] == {"site": "shop3"}


def test_a_certificate_near_expiry_is_renewed_over_the_boxs_own_link_without_an_operator(
    tls_broker: Broker, fleet: Fleet, agents: Any, tmp_path: Path
) -> None:
    from agent.link.tls import certificate_expiry

    out = tmp_path / "box-n"
    live = ["--live", f"{tls_broker.host}:{tls_broker.port}", *tls_broker.admin_flags()[4:]]
    provision = ["provision", "box-n", "--ca", str(fleet.ca_dir), "--out", str(out), "--days", "1"]
    assert fleet_cli([*provision, *live]) == 0  # one day left: inside the 30-day warning
    identity = Identity("box-n", out / "ca.crt", out / "box-n.crt", out / "box-n.key")
    before, old_key = certificate_expiry(out / "box-n.crt"), (out / "box-n.key").read_bytes()
    serving = _serve(tls_broker, fleet, count=1)
    agent = agents(on=tls_broker, device_id="box-n", identity=identity)
    agent.start()
    wait_until(lambda: "renewed the certificate" in agent.log_text(), what="the agent to renew", timeout=60)
    serving.join(timeout=30)
    assert certificate_expiry(out / "box-n.crt") > before
    assert (out / "box-n.key").read_bytes() != old_key and not list(out.glob("*.renew"))
    assert stat.S_IMODE((out / "box-n.key").stat().st_mode) == 0o600
    # The next connection uses the new pair; the box serves on.
    tls_broker.restart(until=lambda: "disconnected from broker" in agent.log_text())
    caller = _operator(tls_broker, fleet)
    try:
        caller.send("edge/box-n/jobs", _job("after-renewal"), response_topic=REPLIES)
        assert _answered(caller, ["after-renewal"]) == 1
        assert "loaded the renewed TLS files" in agent.log_text()
    finally:
        caller.close()


def _pending(fleet: Fleet, capsys: pytest.CaptureFixture[str]) -> list[str]:
    capsys.readouterr()
    assert fleet_cli(["enroll", "pending", "--ca", str(fleet.ca_dir), "--json"]) == 0
    # `enroll serve` prints on its own thread meanwhile: the answer is the line that is a JSON list.
    [answer] = [line for line in capsys.readouterr().out.splitlines() if line.startswith("[")]
    return [row["name"] for row in json.loads(answer)]


def test_a_claim_needing_approval_waits_for_the_operator_and_brings_its_group_and_labels(
    tls_broker: Broker, fleet: Fleet, agents: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    flags = tls_broker.admin_flags()
    labels = ["--label", "site=shop4", "--label", "hw=pi5", "--approve", "manual", "--count", "2"]
    claim = _claim(tls_broker, fleet, "shop4", tmp_path / "image" / "claim", "--group", "g1", *labels)
    serving = _serve(tls_broker, fleet, count=2)  # two requests, each answered "pending"
    # box-p through the library, box-q as the real `edge-agent enroll` process.
    box_p = tmp_path / "box-p" / "identity"
    outcome: list[Path | Exception] = []
    told: list[str] = []

    def enroll_p() -> None:
        try:
            outcome.append(
                enroll("box-p", claim, (tls_broker.host, tls_broker.port), box_p, notify=told.append)
            )
        except Exception as exc:  # the test reads it below
            outcome.append(exc)

    thread = threading.Thread(target=enroll_p, daemon=True)
    thread.start()
    box_q = subprocess.Popen(
        [sys.executable, "-m", "agent.cli", "enroll", "box-q", "--claim", str(claim), "--broker",
         f"{tls_broker.host}:{tls_broker.port}", "--out", str(tmp_path / "box-q")],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        wait_until(lambda: sorted(_pending(fleet, capsys)) == ["box-p", "box-q"], what="both boxes to wait")
        wait_until(lambda: bool(told), what="box-p to be told it waits for approval")
        assert "edge-fleet approve box-p" in told[0]
        assert not (box_p / "box-p.crt").exists() and not outcome, "nothing is signed before the approval"

        assert fleet_cli(["approve", "box-p", "--ca", str(fleet.ca_dir), *flags]) == 0
        thread.join(timeout=60)
        assert outcome == [box_p / "box-p.crt"]
        assert fleet_cli(["reject", "box-q", "--ca", str(fleet.ca_dir), "--reason", "not ours", *flags]) == 0
        _out, err = box_q.communicate(timeout=60)
        assert box_q.returncode != 0
        assert "waiting for an operator to approve box-q" in err
        assert "rejected the enrollment of box-q under claim-shop4 (not ours)" in err
        assert not (tmp_path / "box-q" / "box-q.crt").exists()
        assert _pending(fleet, capsys) == []
        assert fleet_cli(["approve", "box-q", "--ca", str(fleet.ca_dir), *flags]) == 1, (
            "nothing left to approve"
        )
        assert "no enrollment of 'box-q' is waiting" in capsys.readouterr().err
    finally:
        if box_q.poll() is None:
            box_q.kill()
            box_q.communicate()
    serving.join(timeout=30)

    # The approved box, agent.toml without a group or labels, gets both from the fleet and serves.
    identity = Identity("box-p", box_p / "ca.crt", box_p / "box-p.crt", box_p / "box-p.key")
    agent = agents(on=tls_broker, device_id="box-p", identity=identity)
    agent.start()
    wait_until(
        lambda: _status(tls_broker, capsys).get("box-p", {}).get("labels") == {"site": "shop4", "hw": "pi5"},
        what="status to show box-p's labels from the claim",
        timeout=15,
    )
    assert _status(tls_broker, capsys)["box-p"]["group"] == "g1"
    # Sent once the box says it is in g1: a group job published before the box has its membership
    # (retained, read on connect) reaches the group's members of that moment only.
    assert _answers_one(tls_broker, fleet, "edge/groups/g1/jobs", "approved-1")


def test_neither_a_device_nor_a_claim_can_approve_read_others_answers_or_set_membership(
    tls_broker: Broker, fleet: Fleet, tmp_path: Path
) -> None:
    for name in ("shop5", "shop6"):
        _claim(tls_broker, fleet, name, tmp_path / name, "--approve", "manual")
    claim = Identity(
        "claim-shop5",
        tmp_path / "shop5" / "ca.crt",
        tmp_path / "shop5" / "claim-shop5.crt",
        tmp_path / "shop5" / "claim-shop5.key",
    )
    own_request, own_answer = enroll_topics("edge", "claim-shop5", "n1")
    _other_request, other_answer = enroll_topics("edge", "claim-shop6", "n1")
    device = Probe(tls_broker, fleet.device("box-x", group="g1"), name="box-x")
    holder = Probe(tls_broker, claim)
    try:
        assert device.first_outcome() == holder.first_outcome() == "connected"
        # The claim asks and reads its own answers (the control) ...
        assert holder.publish(own_request) in ACCEPTED
        assert holder.subscribe(FleetTopics("edge").claim("claim-shop5")[1]) == ["Granted QoS 1"]
        # ... but cannot answer (approve) itself, read another claim's answers, or push a membership.
        assert holder.publish(own_answer, b'{"name": "box-new", "cert": "x"}') == "Not authorized"
        assert holder.subscribe(FleetTopics("edge").claim("claim-shop6")[1], "edge/enroll/#") == [
            "Not authorized",
            "Not authorized",
        ]
        assert holder.publish(Topics("edge", "box-new", None).membership) == "Not authorized"
        # A device with a valid certificate: its own status (the control), nothing of enrollment.
        assert device.publish(Topics("edge", "box-x", None).status, b'{"online": true}') in ACCEPTED
        assert device.publish(own_answer) == device.publish(other_answer) == "Not authorized"
        assert device.publish(own_request) == "Not authorized"
        assert device.subscribe(FleetTopics("edge").claim("claim-shop5")[1]) == ["Not authorized"]
        assert device.publish(Topics("edge", "box-x", None).membership) == "Not authorized"
    finally:
        device.close()
        holder.close()


def test_a_batch_booting_at_once_on_one_claim_all_enroll(
    tls_broker: Broker, fleet: Fleet, tmp_path: Path
) -> None:
    """The boxes share the claim's client id, so each connection takes the session from another;
    each box's request is resent until acknowledged and its answer is retained: none is lost."""
    count = 8
    claim = _claim(tls_broker, fleet, "burst", tmp_path / "claim", "--group", "g1", "--count", str(count))
    serving = _serve(tls_broker, fleet, count=count)
    outcome: dict[str, Path | Exception] = {}

    def box(name: str) -> None:
        try:
            outcome[name] = enroll(
                name, claim, (tls_broker.host, tls_broker.port), tmp_path / name, timeout_s=240
            )
        except Exception as exc:  # reported by the assertion below
            outcome[name] = exc

    names = [f"burst-{i}" for i in range(count)]
    threads = [threading.Thread(target=box, args=(name,), daemon=True) for name in names]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=300)
    serving.join(timeout=30)
    assert outcome == {name: tmp_path / name / f"{name}.crt" for name in names}
    assert set(names) <= set((fleet.ca_dir / "devices.txt").read_text().split())


def test_the_fleet_servers_api_approves_and_rejects_pending_enrollments_audited(
    tls_broker: Broker, fleet: Fleet, tmp_path: Path
) -> None:
    from fastapi.testclient import TestClient

    from edge_fleet.server.app import create_app

    waiting = _two_waiting(tls_broker, fleet, tmp_path, "shop7", ["box-s", "box-t"])
    store = waiting[1]
    api = TestClient(create_app(store, enroll=enrollment_desk(tls_broker, fleet)))
    auth = {role: {"Authorization": f"Bearer {store.create_token(f'{role}-1', role, 'test')}"} for role in ("viewer", "operator")}  # fmt: skip
    wait_until(
        lambda: (
            sorted(r["name"] for r in api.get("/api/v1/enrollments", headers=auth["viewer"]).json())
            == ["box-s", "box-t"]
        ),
        what="the API to list both boxes as pending",
    )
    assert api.post("/api/v1/enrollments/box-s/approve", headers=auth["viewer"]).status_code == 403
    answer = api.post("/api/v1/enrollments/box-s/approve", headers=auth["operator"])
    assert answer.status_code == 200 and answer.json()["outcome"] == "enrolled"
    refused = api.post(
        "/api/v1/enrollments/box-t/reject", headers=auth["operator"], json={"reason": "unknown box"}
    )
    assert refused.status_code == 200
    _check_decisions(waiting, tmp_path, "claim-shop7", "box-s", "box-t")
    assert api.get("/api/v1/enrollments", headers=auth["viewer"]).json() == []
    again = api.post("/api/v1/enrollments/box-t/approve", headers=auth["operator"])
    assert again.status_code == 404 and "no enrollment of 'box-t' is waiting" in again.json()["detail"]
