"""Configuration: TOML file, environment overrides, and errors that name the key."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from agent.config import load_config
from edge_contract.errors import ConfigError

GOOD = """
device_id = "box-7"
group = "shop-3"
state_dir = "/var/lib/edge-agent"
[mqtt]
host = "broker.local"
port = 8883
password = "s3cret"
[mqtt.tls]
ca = "/etc/edge-agent/ca.crt"
[model]
path = "/opt/models/phi3"
[jobs]
max_queue = 10
"""


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "agent.toml"
    path.write_text(text)
    return path


def test_file_values_and_defaults(tmp_path: Path) -> None:
    config = load_config(_write(tmp_path, GOOD))
    assert config.device_id == "box-7" and config.group == "shop-3"
    assert config.mqtt.host == "broker.local" and config.mqtt.port == 8883
    assert config.mqtt.topic_prefix == "edge" and config.mqtt.protocol == "5"
    assert config.jobs.max_queue == 10 and config.jobs.max_payload_bytes == 65536
    assert "s3cret" not in repr(config), "secrets never show in logs"


def test_environment_overrides_single_keys(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EDGE_AGENT_MQTT__HOST", "10.0.0.9")
    monkeypatch.setenv("EDGE_AGENT_JOBS__MAX_QUEUE", "99")
    monkeypatch.setenv("EDGE_AGENT_DEVICE_ID", "box-env")
    config = load_config(_write(tmp_path, GOOD))
    assert config.mqtt.host == "10.0.0.9"
    assert config.mqtt.port == 8883, "the file's other keys in the section survive"
    assert config.jobs.max_queue == 99
    assert config.device_id == "box-env"


@pytest.mark.parametrize(
    "edit,key",
    [
        (("port = 8883", "port = 70000"), "mqtt.port"),
        (('device_id = "box-7"', 'device_id = "box/7"'), "device_id"),
        (("max_queue = 10", "max_queu = 10"), "jobs.max_queu"),
        (('[model]\npath = "/opt/models/phi3"', ""), "model"),
        (('host = "broker.local"', 'host = "b"\nprotocol = "4"'), "mqtt.protocol"),
    ],
)
def test_invalid_values_name_the_key(tmp_path: Path, edit: tuple[str, str], key: str) -> None:
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config(_write(tmp_path, GOOD.replace(*edit)))


def test_not_toml(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(_write(tmp_path, "device_id = "))


def _check(path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "agent.cli", "config", "check", str(path)],
        capture_output=True,
        text=True,
        check=False,
    )


def _present(tmp_path: Path) -> str:
    """GOOD with every file it names present: a model folder, a CA bundle, a client pair."""
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "genai_config.json").write_text("{}")
    for name in ("ca.crt", "box.crt", "box.key"):
        (tmp_path / name).write_text("x")
    return (
        GOOD.replace("/opt/models/phi3", str(tmp_path / "model"))
        .replace("/var/lib/edge-agent", str(tmp_path / "state"))
        .replace("/etc/edge-agent/ca.crt", str(tmp_path / "ca.crt"))
        .replace("[model]", f'cert = "{tmp_path / "box.crt"}"\nkey = "{tmp_path / "box.key"}"\n[model]')
    )


@pytest.mark.e2e  # runs the command line as a subprocess
def test_config_check_command(tmp_path: Path) -> None:
    present = _present(tmp_path)
    good = _check(_write(tmp_path, present))
    assert good.returncode == 0 and "OK" in good.stdout, good.stderr
    proc = _check(_write(tmp_path, present.replace("port = 8883", "port = -1")))
    assert proc.returncode == 1 and "mqtt.port" in proc.stderr and "Traceback" not in proc.stderr


def _mkdir(path: Path) -> None:
    path.mkdir()


@pytest.mark.parametrize(
    "damage,key,says",
    [
        (
            lambda d: (d / "model" / "genai_config.json").unlink(),
            "model.path",
            "no readable genai_config.json",
        ),
        (lambda d: (d / "ca.crt").unlink(), "mqtt.tls.ca", "does not exist"),
        (lambda d: ((d / "ca.crt").unlink(), _mkdir(d / "ca.crt")), "mqtt.tls.ca", "is a folder"),
        (lambda d: (d / "box.key").unlink(), "mqtt.tls.key", "does not exist"),
        (lambda d: (d / "box.crt").unlink(), "mqtt.tls.cert", "does not exist"),
        (lambda d: (d / "state").write_text("a file"), "state_dir", "is not a folder"),
    ],
    ids=["genai_config", "ca", "ca_folder", "key", "cert", "state_dir"],
)
def test_config_check_fails_on_a_file_it_names_but_cannot_read(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], damage: Any, key: str, says: str
) -> None:
    """Before: ``config check`` printed OK with a missing model folder or CA file."""
    from agent.cli import main

    config = str(_write(tmp_path, _present(tmp_path)))
    assert main(["config", "check", config]) == 0, "positive control"
    damage(tmp_path)
    capsys.readouterr()
    assert main(["config", "check", config]) == 1
    out, err = capsys.readouterr()
    assert "OK" not in out
    line = next(line for line in err.splitlines() if f": {key}: " in line)
    assert says in line and str(tmp_path) in line, line
    assert any(fix in line.rsplit(": ", 1)[1] for fix in ("copy", "fix", "point", "chown")), line


@pytest.mark.e2e  # runs the command line as a subprocess
def test_config_check_names_a_missing_model_folder_and_every_other_problem(tmp_path: Path) -> None:
    # Paths of its own, under tmp_path, that do not exist: never the host's /opt or /etc, which may.
    model, ca = tmp_path / "absent" / "phi3", tmp_path / "absent" / "ca.crt"
    text = GOOD.replace("/opt/models/phi3", str(model)).replace("/etc/edge-agent/ca.crt", str(ca))
    proc = _check(_write(tmp_path, text))
    assert proc.returncode == 1
    assert f"model.path: {model} does not exist: copy a model folder there" in proc.stderr
    assert f"mqtt.tls.ca: {ca} does not exist" in proc.stderr


def test_trusted_keys_must_be_openssh_ed25519_lines(tmp_path: Path) -> None:
    from edge_contract import signing

    key = signing.generate()
    line = signing.PublicKey(key.public_key(), signing.key_id(key.public_key())).to_line()
    config = load_config(_write(tmp_path, GOOD + f'[update]\ntrusted_keys = ["{line}"]\n'))
    assert [k.key_id for k in config.update.public_keys()] == [signing.key_id(key.public_key())]
    with pytest.raises(ConfigError, match=r"update\.trusted_keys: .*entry 0: not an OpenSSH public key"):
        load_config(_write(tmp_path, GOOD + '[update]\ntrusted_keys = ["ssh-ed25519 AAAA"]\n'))


def _mqtt(tmp_path: Path, section: str) -> Path:
    return _write(
        tmp_path, f'device_id = "box-7"\nstate_dir = "/s"\n[model]\npath = "/m"\n[mqtt]\n{section}\n'
    )


def test_plain_tcp_only_when_the_config_says_so(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"mqtt: .*no \[mqtt\.tls\] section.*allow_plaintext = true"):
        load_config(_mqtt(tmp_path, 'host = "b"'))
    plain = load_config(_mqtt(tmp_path, 'host = "b"\nallow_plaintext = true'))
    assert plain.mqtt.tls is None and plain.mqtt.endpoints == [("b", 1883)]
    tls = load_config(_mqtt(tmp_path, 'host = "b"\n[mqtt.tls]\nca = "/ca.crt"'))
    assert tls.mqtt.endpoints == [("b", 8883)], "TLS defaults to the MQTT-over-TLS port"
    with pytest.raises(ConfigError, match="exclude each other"):
        load_config(_mqtt(tmp_path, 'allow_plaintext = true\n[mqtt.tls]\nca = "/ca.crt"'))
    with pytest.raises(ConfigError, match="both cert and key"):
        load_config(_mqtt(tmp_path, '[mqtt.tls]\ncert = "/box.crt"'))


def test_several_brokers_in_failover_order(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config = load_config(
        _mqtt(tmp_path, 'brokers = ["a.lan:8884", "b.lan", "[fd00::1]:8883"]\n[mqtt.tls]\nca = "/ca.crt"')
    )
    assert config.mqtt.endpoints == [("a.lan", 8884), ("b.lan", 8883), ("fd00::1", 8883)]
    with pytest.raises(ConfigError, match="either host/port or brokers"):
        load_config(_mqtt(tmp_path, 'host = "x"\nbrokers = ["a:1"]\nallow_plaintext = true'))
    with pytest.raises(ConfigError, match=r"mqtt\.brokers.*HOST:PORT"):
        load_config(_mqtt(tmp_path, 'brokers = ["a:70000"]\nallow_plaintext = true'))
    monkeypatch.setenv("EDGE_AGENT_MQTT__BROKERS", '["c:1", "d:2"]')
    env = load_config(_mqtt(tmp_path, "allow_plaintext = true"))
    assert env.mqtt.endpoints == [("c", 1), ("d", 2)]


@pytest.mark.parametrize("name", ["operator", "groups", "replies"])
def test_reserved_names_are_no_device_ids(tmp_path: Path, name: str) -> None:
    with pytest.raises(ConfigError, match=r"device_id: .*reserved"):
        load_config(_write(tmp_path, GOOD.replace('device_id = "box-7"', f'device_id = "{name}"')))


@pytest.mark.parametrize(
    "edit,key",
    [
        (('device_id = "box-7"', 'device_id = "box-7\\n"'), "device_id"),
        (('group = "shop-3"', 'group = "shop-3\\n"'), "group"),
        (("port = 8883", 'port = 8883\ntopic_prefix = "edge\\n"'), "mqtt.topic_prefix"),
        (('device_id = "box-7"', 'device_id = "\\nbox-7"'), "device_id"),
    ],
    ids=["device_id", "group", "topic_prefix", "leading"],
)
def test_names_refuse_a_trailing_newline(tmp_path: Path, edit: tuple[str, str], key: str) -> None:
    """``re.match(...$)`` matches before a final newline: "box\\n" would become a topic level."""
    assert load_config(_write(tmp_path, GOOD)).device_id == "box-7", "positive control"
    with pytest.raises(ConfigError, match=rf"{key.replace('.', '[.]')}: .*must be 1-64"):
        load_config(_write(tmp_path, GOOD.replace(*edit)))


def test_a_name_from_the_environment_is_checked_the_same(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("EDGE_AGENT_DEVICE_ID", "box-env\n")
    with pytest.raises(ConfigError, match="device_id"):
        load_config(_write(tmp_path, GOOD))
