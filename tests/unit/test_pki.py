"""``edge-fleet ca init`` and ``provision``: files, modes, names, and what they certify."""

from __future__ import annotations

import datetime
import ipaddress
import stat
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from agent.config import load_config
from edge_fleet.cli import main as fleet
from edge_fleet.pki import set_group_lines


def _cert(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.fixture()
def ca(tmp_path: Path) -> Path:
    out = tmp_path / "ca"
    assert fleet(["ca", "init", "--out", str(out)]) == 0
    return out


def test_ca_init_writes_a_ca_and_a_private_key(ca: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cert = _cert(ca / "ca.crt")
    assert cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert _mode(ca / "ca.key") == 0o600
    assert fleet(["ca", "init", "--out", str(ca)]) == 1, "an existing CA is never replaced silently"
    assert "--force" in capsys.readouterr().err


def test_a_device_gets_its_certificate_key_ca_and_a_ready_config(ca: Path, tmp_path: Path) -> None:
    out = tmp_path / "box-7"
    args = ["provision", "box-7", "--ca", str(ca), "--out", str(out), "--group", "shop-3"]
    assert fleet([*args, "--endpoint", "a.lan:8883", "--endpoint", "b.lan:8883"]) == 0
    cert = _cert(out / "box-7.crt")
    assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "box-7"
    assert cert.issuer == _cert(ca / "ca.crt").subject
    eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [ExtendedKeyUsageOID.CLIENT_AUTH]
    assert _mode(out / "box-7.key") == 0o600
    assert (out / "ca.crt").read_bytes() == (ca / "ca.crt").read_bytes()
    config = load_config(out / "agent.toml")
    assert config.device_id == "box-7" and config.group == "shop-3"
    assert config.mqtt.endpoints == [("a.lan", 8883), ("b.lan", 8883)]
    assert config.mqtt.tls is not None and config.mqtt.tls.cert == Path("/etc/edge-agent/box-7.crt")
    assert fleet(args) == 1, "existing files are kept without --force"
    assert fleet([*args, "--force"]) == 0 and _mode(out / "box-7.key") == 0o600


def test_operator_and_broker_identities(ca: Path, tmp_path: Path) -> None:
    assert fleet(["provision", "operator", "--ca", str(ca), "--out", str(tmp_path / "op"), "--operator"]) == 0
    assert not (tmp_path / "op" / "agent.toml").exists(), "an operator is no device"
    out = tmp_path / "br"
    assert (
        fleet(
            [
                "provision",
                "mq",
                "--ca",
                str(ca),
                "--out",
                str(out),
                "--broker",
                "mq.lan",
                "--broker",
                "10.1.2.3",
            ]
        )
        == 0
    )
    cert = _cert(out / "mq.crt")
    names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert names.get_values_for_type(x509.DNSName) == ["mq.lan"]
    assert names.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address("10.1.2.3")]
    eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [ExtendedKeyUsageOID.SERVER_AUTH]
    left = cert.not_valid_after_utc - datetime.datetime.now(datetime.UTC)
    assert 390 < left.days < 400


@pytest.mark.parametrize("name", ["operator", "groups", "replies", "box/7", "+", "#", ".box"])
def test_names_that_would_break_the_acl_are_refused(ca: Path, tmp_path: Path, name: str) -> None:
    assert fleet(["provision", name, "--ca", str(ca), "--out", str(tmp_path / "x")]) == 1
    assert not (tmp_path / "x").exists() or not any((tmp_path / "x").iterdir())


def test_missing_ca_is_a_clear_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert fleet(["provision", "box-1", "--ca", str(tmp_path / "none"), "--out", str(tmp_path / "o")]) == 1
    assert "ca init" in capsys.readouterr().err


def test_group_lines_are_added_once_and_replaced(tmp_path: Path) -> None:
    acl = tmp_path / "edge.acl"
    acl.write_text("pattern read edge/%u/jobs\n")
    set_group_lines(acl, "box-1", "a")
    set_group_lines(acl, "box-2", "a")
    set_group_lines(acl, "box-1", "b")
    text = acl.read_text()
    assert text.startswith("pattern read edge/%u/jobs\n")
    assert text.count("user box-1\n") == 1 and "edge/groups/b/jobs" in text
    assert "topic read edge/groups/a/jobs" in text.split("# >>> device box-2")[1]
    assert "edge/groups/a/" not in text.split("# >>> device box-1")[1].split("# <<<")[0]


@pytest.mark.parametrize(
    "extra",
    [
        ["--operator", "--group", "g"],
        ["--broker", "mq.lan", "--endpoint", "a:1"],
        ["--endpoint", 'a"b'],
        ["--group", "a/b"],
    ],
)
def test_flags_that_do_not_fit_are_refused(ca: Path, tmp_path: Path, extra: list[str]) -> None:
    assert fleet(["provision", "box-1", "--ca", str(ca), "--out", str(tmp_path / "o"), *extra]) == 1
    assert not (tmp_path / "o").exists()


def test_odd_paths_stay_valid_toml(ca: Path, tmp_path: Path) -> None:
    out = tmp_path / "o"
    assert (
        fleet(["provision", "box-1", "--ca", str(ca), "--out", str(out), "--model", 'C:\\models\\"x"']) == 0
    )
    assert load_config(out / "agent.toml").model.path == Path('C:\\models\\"x"')
