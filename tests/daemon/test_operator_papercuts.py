"""Issue 24, item 8: the operator's papercuts, each against a real mosquitto from ``broker init``."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from edge_contract.protocol import ModelRef, Status
from edge_fleet.cli import main as fleet_cli
from edge_fleet.views import FRAME_BREAK
from tests.daemon.test_identity_life import _operator_flags
from tests.daemon.test_security import Probe
from tests.support.broker import Broker
from tests.support.pki import Fleet

pytestmark = pytest.mark.e2e


def _online(broker: Broker, fleet: Fleet, name: str) -> None:
    """A retained online status for ``name`` with an unversioned model, as its agent would publish it."""
    operator = Probe(broker, fleet.operator)
    try:
        assert operator.first_outcome() == "connected"
        status = Status(online=True, device_id=name, group="g1", model=ModelRef(name="demo"))
        operator.publish(f"edge/{name}/status", status.model_dump_json().encode(), retain=True)
    finally:
        operator.close()


def test_status_and_devices_on_the_devices_port_fail_with_the_fix(
    tls_broker: Broker, fleet: Fleet, capsys: pytest.CaptureFixture[str]
) -> None:
    _online(tls_broker, fleet, "box-p")
    good = _operator_flags(tls_broker)
    assert fleet_cli(["status", "--wait", "1", *good]) == 0  # the control: the operators' port
    out = capsys.readouterr().out
    assert "box-p" in out and "demo@unversioned" in out and "demo@None" not in out
    wrong = list(good)
    wrong[wrong.index("--broker") + 1] = f"{tls_broker.host}:{tls_broker.port}"
    for command in (["status"], ["devices"]):
        assert fleet_cli([*command, "--wait", "1", *wrong]) == 1
        captured = capsys.readouterr()
        assert f"--broker {tls_broker.host}:8884" in captured.err and "devices' listener" in captured.err
        assert "box-p" not in captured.out, "no stale table"


def test_watchs_first_frame_shows_online_boxes_online_and_a_pipe_gets_no_escape_codes(
    tls_broker: Broker, fleet: Fleet, capsys: pytest.CaptureFixture[str]
) -> None:
    _online(tls_broker, fleet, "box-w")
    assert fleet_cli(["watch", "--duration", "0.3", "--refresh", "5", *_operator_flags(tls_broker)]) == 0
    out = capsys.readouterr().out
    assert "\x1b" not in out
    first = next(f for f in out.split(FRAME_BREAK) if f.strip())
    row = next(line for line in first.splitlines() if line.startswith("box-w"))
    assert row.split()[2] == "yes", first


def test_devices_shows_the_new_serial_after_renew(
    tmp_path: Path, fleet: Fleet, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "box-s"
    assert fleet_cli(["provision", "box-s", "--ca", str(fleet.ca_dir), "--out", str(out)]) == 0

    def serial() -> str:
        capsys.readouterr()
        assert fleet_cli(["devices", "--no-broker", "--json"]) == 0
        rows = {r["device"]: r for r in map(json.loads, capsys.readouterr().out.splitlines())}
        return str(rows["box-s"]["cert_serial"])

    before = serial()
    assert fleet_cli(["renew", "box-s", "--ca", str(fleet.ca_dir), "--out", str(out)]) == 0
    from cryptography import x509

    now = format(x509.load_pem_x509_certificate((out / "box-s.crt").read_bytes()).serial_number, "x")
    assert serial() == now != before
