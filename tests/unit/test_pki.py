"""``edge-fleet ca init`` and ``provision``: files, modes, names, and what they certify."""

from __future__ import annotations

import datetime
import ipaddress
import os
import stat
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from agent.config import load_config
from edge_fleet import dynsec
from edge_fleet.cli import main as fleet
from edge_fleet.identity import renew


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


def test_group_rules_name_the_shared_filter_literally() -> None:
    acls = dynsec.group_acls("g1")
    subscribe = {a["topic"] for a in acls if a["acltype"] == "subscribeLiteral"}
    # mosquitto checks a shared subscription as the literal filter, $share/ included.
    assert subscribe == {
        "$share/g1/edge/groups/g1/jobs",
        "edge/groups/g1/jobs",
        "edge/groups/g1/model/desired",
    }
    assert all(a["allow"] for a in acls)
    assert not any(a["acltype"].startswith("subscribePattern") for a in dynsec.device_acls("box-1"))
    sends = {a["topic"] for a in dynsec.device_acls("box-1") if a["acltype"] == "publishClientSend"}
    assert "edge/box-1/status" in sends and not any("desired" in t or "jobs" in t for t in sends)
    state = dynsec.initial_state(["operator"])
    assert state["defaultACLAccess"] == {
        "publishClientSend": False,
        "publishClientReceive": False,
        "subscribe": False,
        "unsubscribe": True,
    }


def test_operators_come_from_their_own_ca_and_no_device_takes_their_name(ca: Path, tmp_path: Path) -> None:
    assert fleet(["provision", "alice", "--operator", "--ca", str(ca), "--out", str(tmp_path / "op")]) == 0
    cert = _cert(tmp_path / "op" / "alice.crt")
    assert cert.issuer == _cert(ca / "operator-ca.crt").subject != _cert(ca / "ca.crt").subject
    # Its ca.crt verifies the broker (fleet CA).
    assert (tmp_path / "op" / "ca.crt").read_bytes() == (ca / "ca.crt").read_bytes()
    assert fleet(["provision", "alice", "--ca", str(ca), "--out", str(tmp_path / "dev")]) == 1


def test_a_provisioned_config_trusts_the_fleet_key_and_keeps_its_state_dir(ca: Path, tmp_path: Path) -> None:
    assert fleet(["keygen", "--out", str(tmp_path / "keys")]) == 0
    out = tmp_path / "box-k"
    args = ["provision", "box-k", "--ca", str(ca), "--out", str(out), "--state-dir", "/srv/edge"]
    assert fleet([*args, "--trusted-key", str(tmp_path / "keys" / "fleet.pub")]) == 0
    config = load_config(out / "agent.toml")
    assert config.state_dir == Path("/srv/edge")
    assert config.update.trusted_keys == [(tmp_path / "keys" / "fleet.pub").read_text().strip()]
    (tmp_path / "bad.pub").write_text("not a key\n")
    assert fleet([*args, "--force", "--trusted-key", str(tmp_path / "bad.pub")]) == 1


def test_renew_swaps_in_a_new_pair_for_the_same_name(ca: Path, tmp_path: Path) -> None:
    out = tmp_path / "box-r"
    assert fleet(["provision", "box-r", "--ca", str(ca), "--out", str(out)]) == 0
    old = _cert(out / "box-r.crt")
    renew("box-r", ca, out)
    new = _cert(out / "box-r.crt")
    assert new.serial_number != old.serial_number and new.subject == old.subject
    assert _mode(out / "box-r.key") == 0o600
    assert sorted(p.name for p in out.iterdir()) == ["agent.toml", "box-r.crt", "box-r.key", "ca.crt"]
    assert fleet(["renew", "box-x", "--ca", str(ca), "--out", str(out)]) == 1, "nothing to renew"


def test_broker_init_writes_a_setup_debian_can_include(
    ca: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "mq"
    assert fleet(["broker", "init", "--ca", str(ca), "--hostname", "mq.lan", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert f"mosquitto -c {out / 'mosquitto.conf'}" in printed, "the exact start command"
    if os.geteuid() == 0:
        # pytest's folders are 0700: the user mosquitto could not read the files, and is told so.
        assert "is not searchable by the user mosquitto" in printed
        assert stat.S_IMODE((out / "certs" / "broker.key").stat().st_mode) == 0o640
    snippet = (out / "conf.d" / "edge.conf").read_text()
    assert "persistence_location" not in snippet, "Debian's stock mosquitto.conf sets it already"
    for line in ("per_listener_settings true", "autosave_interval 5", "use_username_as_clientid true"):
        assert line in snippet.splitlines()
    assert f"include_dir {out / 'conf.d'}" in (out / "mosquitto.conf").read_text()
    for name in ("broker.crt", "broker.key", "ca.crt", "operator-ca.crt", "clients-ca.crt"):
        assert (out / "certs" / name).is_file()
    assert fleet(["broker", "init", "--ca", str(ca), "--hostname", "mq.lan", "--out", str(out)]) == 1


@pytest.mark.parametrize(
    "extra",
    [
        ["--operator", "--group", "g"],
        ["--operator", "--live", "mq:8883"],
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


def test_the_link_loads_a_renewal_and_keeps_its_identity_when_the_new_files_are_broken(
    ca: Path, tmp_path: Path
) -> None:
    from agent.link.tls import TLSFiles

    out = tmp_path / "box-t"
    assert fleet(["provision", "box-t", "--ca", str(ca), "--out", str(out)]) == 0
    files = TLSFiles(out / "ca.crt", out / "box-t.crt", out / "box-t.key")
    first = files.cert_expiry
    assert files.reloaded() is None, "nothing changed"
    renew("box-t", ca, out, days=30)
    assert files.reloaded() is not None and files.cert_expiry is not None
    assert first is not None and files.cert_expiry < first, "the new certificate is the one in use"
    # A half-copied key (bad luck during the copy to the box): the working pair stays in use.
    (out / "box-t.key").write_text("-----BEGIN PRIVATE KEY-----\ntruncated")
    assert files.reloaded() is None


def test_generated_broker_passwords_never_start_with_a_dash(monkeypatch: pytest.MonkeyPatch) -> None:
    # An operator passes it as `--password VALUE`, where a leading "-" reads as an option (a CI run
    # here failed that way); token_urlsafe begins with one once in 64 draws.
    from edge_fleet import setup

    draws = iter(["-AbC", "xYz-"])
    monkeypatch.setattr(setup.secrets, "token_urlsafe", lambda _n: next(draws))
    assert setup.new_password() == "xYz-"
