"""Issue 24, names and files: one name space for devices and operators, every flag that ends up in a
broker file or a topic checked, and the broker's secrets kept from other local users."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest

from edge_fleet.cli import main as fleet_cli


@pytest.fixture()
def ca(tmp_path: Path) -> Path:
    folder = tmp_path / "ca"
    assert fleet_cli(["ca", "init", "--out", str(folder)]) == 0
    return folder


def _provision(ca: Path, tmp_path: Path, name: str, *extra: str) -> int:
    return fleet_cli(["provision", name, "--ca", str(ca), "--out", str(tmp_path / "out" / name), *extra])


def test_an_operator_cannot_be_named_like_a_device_nor_the_reverse(
    ca: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert _provision(ca, tmp_path, "box-a") == 0
    assert _provision(ca, tmp_path, "box-a", "--operator", "--force") == 1
    assert "'box-a' is a device of this CA" in capsys.readouterr().err
    assert _provision(ca, tmp_path, "ops-2", "--operator") == 0  # the control: a free name
    assert _provision(ca, tmp_path, "ops-2", "--force") == 1
    assert "'ops-2' is an operator of this CA" in capsys.readouterr().err


def _init(ca: Path, out: Path, *extra: str) -> list[str]:
    return ["broker", "init", "--ca", str(ca), "--hostname", "localhost", "--out", str(out), *extra]


@pytest.mark.parametrize(
    ("flags", "named"),
    [
        (["--topic-prefix", "edge\nallow_anonymous true"], "--topic-prefix"),
        (["--topic-prefix", "#"], "--topic-prefix"),
        (["--topic-prefix", "edge/+"], "--topic-prefix"),
        (["--hostname", "mq.lan\nallow_anonymous true"], "--hostname"),
        (["--bind", "127.0.0.1\nlistener 1883"], "--bind"),
        (["--operator", "box-a"], "--operator box-a"),
    ],
)
def test_broker_init_refuses_a_value_that_would_inject_lines_or_wildcards(
    ca: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], flags: list[str], named: str
) -> None:
    assert _provision(ca, tmp_path, "box-a") == 0
    out = tmp_path / "broker"
    assert fleet_cli(_init(ca, out, *flags)) == 1
    assert named in capsys.readouterr().err
    assert not (out / "mosquitto.conf").exists()


def test_broker_init_refuses_an_out_folder_with_a_newline(
    ca: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert fleet_cli(_init(ca, tmp_path / "b\nallow_anonymous true")) == 1
    assert "--out" in capsys.readouterr().err


def test_broker_init_keeps_the_authorization_state_from_other_users(ca: Path, tmp_path: Path) -> None:
    out = tmp_path / "broker"
    assert fleet_cli(_init(ca, out, "--device-logins")) == 0  # the control: good values pass
    state = out / "data" / "dynamic-security.json"
    assert stat.S_IMODE(state.stat().st_mode) == 0o600
    # mosquitto rewrites the file with its own mode: the folder keeps everyone else out.
    assert stat.S_IMODE((out / "data").stat().st_mode) == 0o700
    assert stat.S_IMODE((out / "operator-operator.password").stat().st_mode) == 0o600
    assert "allow_anonymous false" in (out / "conf.d" / "edge.conf").read_text()


@pytest.mark.parametrize(
    ("flags", "named"),
    [
        (["--topic-prefix", "#", "--live", "127.0.0.1:1"], "--topic-prefix"),
        (["--topic-prefix", "edge\n"], "--topic-prefix"),
        (["--state-dir", "/var/lib/x\n[mqtt]"], "--state-dir"),
    ],
)
def test_provision_refuses_a_bad_value_before_touching_anything(
    ca: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], flags: list[str], named: str
) -> None:
    assert _provision(ca, tmp_path, "box-f", *flags) == 1
    assert named in capsys.readouterr().err
    assert not (tmp_path / "out" / "box-f").exists()
