"""Issue 24: a box enrolls itself from a claim — its key made on the box, its CSR over the broker, its
certificate, group and labels from the fleet — and serves a group job."""

from __future__ import annotations

import stat
import threading
from pathlib import Path
from typing import Any

import pytest

from agent.enroll import EnrollError, enroll
from edge_fleet.cli import main as fleet_cli
from tests.daemon.test_identity import REPLIES, _answered, _job, _operator
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


def test_a_fresh_box_enrolls_from_a_claim_and_serves_its_group(
    tls_broker: Broker, fleet: Fleet, agents: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    claim = tmp_path / "image" / "claim"
    flags = tls_broker.admin_flags()
    create = ["claim", "create", "shop3", "--ca", str(fleet.ca_dir), "--out", str(claim), "--group", "g1"]
    assert fleet_cli([*create, "--count", "1", *flags]) == 0
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

    # Its agent.toml names no group: the fleet pushed g1 with the certificate.
    agent = agents(on=tls_broker, device_id="box-z", identity=Identity("box-z", box / "ca.crt", cert, key))
    agent.start()
    caller = _operator(tls_broker, fleet)
    try:
        caller.send("edge/groups/g1/jobs", _job("enrolled-1"), response_topic=REPLIES)
        assert _answered(caller, ["enrolled-1"]) == 1
        assert "membership from the fleet: group g1" in agent.log_text()
    finally:
        caller.close()


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
    tls_broker.restart()
    caller = _operator(tls_broker, fleet)
    try:
        caller.send("edge/box-n/jobs", _job("after-renewal"), response_topic=REPLIES)
        assert _answered(caller, ["after-renewal"]) == 1
        assert "loaded the renewed TLS files" in agent.log_text()
    finally:
        caller.close()
