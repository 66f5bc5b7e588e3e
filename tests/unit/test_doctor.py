"""``edge-agent doctor``: the checks on this machine, with the real fixture model and real sockets."""

from __future__ import annotations

import os
import shutil
import socket
import threading
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from agent.config import AgentConfig, HealthThresholds, ModelConfig, MQTTConfig
from agent.doctor import Check, check_broker, check_cpu, format_report, run_checks, worst
from agent.engine.memory_plan import Budgets, estimate, model_shape
from agent.health.probe import SystemProbe
from agent.updates.record import UpdateRecord
from edge_contract.protocol import ErrorInfo, UpdateStatus

# /proc/cpuinfo heads of real boards.
PI5_CPUINFO = """processor\t: 0
BogoMIPS\t: 108.00
Features\t: fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics fphp asimdhp cpuid asimdrdm lrcpc dcpop asimddp
CPU implementer\t: 0x41
CPU part\t: 0xd0b
"""
PI4_CPUINFO = """processor\t: 0
BogoMIPS\t: 108.00
Features\t: fp asimd evtstrm crc32 cpuid
CPU part\t: 0xd08
"""
NEOVERSE_V1_CPUINFO = (
    "Features\t: fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics fphp asimdhp cpuid asimdrdm jscvt fcma "
    "lrcpc dcpop sha3 sm3 sm4 asimddp sha512 sve asimdfhm dit uscat ilrcpc flagm ssbs paca pacg dcpodp "
    "svei8mm svebf16 i8mm bf16 dgh rng\n"
)


@pytest.fixture()
def listening() -> Iterator[int]:
    """An open TCP port on localhost that hangs up on every connection (no broker behind it).

    The broker check only needs the port open; the MQTT login check then fails at once
    (connection closed) instead of waiting out its timeout for a CONNACK that never comes.
    """
    server = socket.create_server(("127.0.0.1", 0))
    server.settimeout(0.1)  # so the thread sees ``stop`` soon after the test
    stop = threading.Event()

    def hang_up() -> None:
        while not stop.is_set():
            try:
                conn, _ = server.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            conn.close()

    thread = threading.Thread(target=hang_up, daemon=True)
    thread.start()
    yield server.getsockname()[1]
    stop.set()
    server.close()
    thread.join(timeout=5)


@pytest.fixture()
def closed_port() -> int:
    """A localhost port nothing listens on (bound, then released)."""
    probe = socket.create_server(("127.0.0.1", 0))
    port: int = probe.getsockname()[1]
    probe.close()
    return port


def _config(tmp_path: Path, model: Path, port: int) -> AgentConfig:
    return AgentConfig(
        device_id="box-1",
        state_dir=tmp_path / "state",
        model=ModelConfig(path=model),
        mqtt=MQTTConfig(host="127.0.0.1", port=port, allow_plaintext=True),
    )


def _by_name(checks: list[Check]) -> dict[str, Check]:
    return {check.name: check for check in checks}


def test_a_good_box_with_the_fixture_model(tmp_path: Path, phi3_dir: Path, listening: int) -> None:
    checks = run_checks(_config(tmp_path, phi3_dir, listening))
    found = _by_name(checks)
    assert [c.name for c in checks][:3] == ["python", "onnxruntime", "cpu"]
    for name in ("python", "onnxruntime", "memory", "disk", "broker", "model"):
        assert found[name].status == "ok", found[name]
    assert found["onnxruntime"].detail == __import__("onnxruntime").__version__
    assert f"127.0.0.1:{listening} reachable" in found["broker"].detail
    assert found["model"].detail.startswith("phi3-int4 loaded")
    reading = SystemProbe(tmp_path).measure()
    if reading.temperature.max_c is None:
        assert found["temperature"].status == "warn", "no sensor: said, not invented"
    assert ("throttling" in found) == (reading.throttling is not None)
    if "avx2" in Path("/proc/cpuinfo").read_text():
        assert found["cpu"].status == "ok" and "avx2 yes" in found["cpu"].detail
    assert not (tmp_path / "state").exists(), "doctor writes nothing"


def test_closed_port_fails_the_broker_check(tmp_path: Path, phi3_dir: Path, closed_port: int) -> None:
    found = _by_name(run_checks(_config(tmp_path, phi3_dir, closed_port)))
    assert found["broker"].status == "fail"
    assert f"127.0.0.1:{closed_port} unreachable" in found["broker"].detail
    assert "refused" in found["broker"].detail.lower()
    assert found["model"].status == "ok", "one failure does not stop the other checks"


def test_unknown_host_fails() -> None:
    check = check_broker(
        MQTTConfig(host="no-such-host.invalid", port=1883, allow_plaintext=True), timeout_s=2.0
    )
    assert check.status == "fail" and "no-such-host.invalid:1883 unreachable" in check.detail


def test_config_file_path_and_invalid_file(tmp_path: Path, phi3_dir: Path, listening: int) -> None:
    good = tmp_path / "agent.toml"
    good.write_text(
        f'device_id = "box-1"\nstate_dir = "{tmp_path / "state"}"\n'
        f'[model]\npath = "{phi3_dir}"\n[mqtt]\nhost = "127.0.0.1"\nport = {listening}\nallow_plaintext = true\n'
    )
    found = _by_name(run_checks(good))
    assert found["config"] == Check(name="config", status="ok", detail="valid")
    assert found["model"].status == "ok"

    bad = tmp_path / "bad.toml"
    bad.write_text(good.read_text().replace(f"port = {listening}", "port = 0"))
    checks = run_checks(bad)
    assert [c.name for c in checks] == ["python", "onnxruntime", "cpu", "config"]
    assert checks[-1].status == "fail" and "mqtt.port" in checks[-1].detail
    assert run_checks(tmp_path / "missing.toml")[-1].detail.endswith("file not found")


def test_memory_reports_the_expected_peak_beside_what_is_available_and_a_model_too_big(
    tmp_path: Path, phi3_dir: Path, listening: int
) -> None:
    found = _by_name(run_checks(_config(tmp_path, phi3_dir, listening)))
    peak = estimate(
        model_shape(phi3_dir),
        Budgets(context_tokens=256, max_batch=1, prefix_cache_mb=256, prefill_chunk_tokens=512),
        weights_mapped=True,  # the daemon's default: the weights mapped from their repacked copy
    )
    assert found["memory"].status == "ok"
    assert found["memory"].detail.startswith(f"model expects peak {peak.describe()} at a 256-token context")
    assert "MiB available" in found["memory"].detail

    huge = tmp_path / "huge-model"
    shutil.copytree(phi3_dir, huge)
    with (huge / "model.onnx.data").open("r+b") as data:  # sparse: large on paper, nothing on disk
        data.truncate(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") * 2)
    found = _by_name(run_checks(_config(tmp_path, huge, listening)))
    assert found["memory"].status == "fail" and "MiB available" in found["memory"].detail
    assert "serve a smaller model" in found["memory"].detail
    assert found["model"] == Check(name="model", status="fail", detail="not loaded: not enough memory")

    margin = HealthThresholds(min_mem_available_mb=1 << 20)  # a margin no machine leaves
    found = _by_name(run_checks(_config(tmp_path, phi3_dir, listening), thresholds=margin))
    assert found["memory"].status == "fail" and "model.path: the model needs" in found["memory"].detail


def test_a_broken_model_folder(tmp_path: Path, phi3_dir: Path, listening: int) -> None:
    broken = tmp_path / "broken"
    shutil.copytree(phi3_dir, broken)
    (broken / "model.onnx").write_bytes(b"not a graph")
    found = _by_name(run_checks(_config(tmp_path, broken, listening)))
    assert found["model"].status == "fail" and "onnxruntime cannot load it" in found["model"].detail

    found = _by_name(run_checks(_config(tmp_path, tmp_path / "nowhere", listening)))
    assert found["memory"].status == "fail" and "model folder not found" in found["memory"].detail
    assert found["model"].status == "fail" and "model folder not found" in found["model"].detail


@pytest.mark.parametrize(
    "cpuinfo,machine,status,detail",
    [
        (PI5_CPUINFO, "aarch64", "ok", "aarch64: NEON yes, dotprod yes, i8mm no"),
        (PI4_CPUINFO, "aarch64", "warn", "aarch64: NEON yes, dotprod no, i8mm no"),
        (NEOVERSE_V1_CPUINFO, "aarch64", "ok", "aarch64: NEON yes, dotprod yes, i8mm yes"),
        ("Features\t: fp evtstrm\n", "aarch64", "fail", "aarch64: NEON no, dotprod no, i8mm no"),
        ("flags\t\t: fpu sse sse2 avx avx2 fma\n", "x86_64", "ok", "x86_64: avx2 yes, avx512 no"),
        ("flags\t\t: fpu sse sse2 sse4_2\n", "x86_64", "warn", "x86_64: avx2 no"),
        ("", "riscv64", "warn", "riscv64: not an architecture"),
    ],
)
def test_cpu_features(cpuinfo: str, machine: str, status: str, detail: str) -> None:
    check = check_cpu(cpuinfo, machine)
    assert check.status == status and check.detail.startswith(detail), check


def test_this_machines_cpuinfo() -> None:
    check = check_cpu()
    assert check.name == "cpu" and check.detail.startswith(os.uname().machine)


def test_report() -> None:
    checks = [
        Check(name="python", status="ok", detail="3.11.2"),
        Check(name="temperature", status="warn", detail="no temperature sensor is readable"),
        Check(name="broker", status="fail", detail="h:1 unreachable: Connection refused"),
    ]
    assert format_report(checks).splitlines() == [
        "ok    python       3.11.2",
        "warn  temperature  no temperature sensor is readable",
        "fail  broker       h:1 unreachable: Connection refused",
        "1 failure, 1 warning",
    ]
    assert worst(checks) == "fail" and worst(checks[:2]) == "warn" and worst(checks[:1]) == "ok"
    assert format_report(checks[:1]).splitlines()[-1] == "all 1 check passed"


def test_certificate_expiry_warns_30_days_ahead_and_fails_once_expired(tmp_path: Path) -> None:
    from agent.doctor import check_tls
    from edge_fleet.pki import create_ca, provision

    create_ca(tmp_path / "ca")
    for days in (10, 100):
        provision(f"box-{days}", tmp_path / "ca", tmp_path / "ids", days=days)
    ids = tmp_path / "ids"

    def tls(name: str) -> MQTTConfig:
        return MQTTConfig(tls={"ca": ids / "ca.crt", "cert": ids / f"{name}.crt", "key": ids / f"{name}.key"})

    found = _by_name(check_tls(tls("box-100")))
    assert found["tls"].status == "ok" and found["ca certificate"].status == "ok"
    assert found["certificate"].status == "ok" and "days left" in found["certificate"].detail
    soon = _by_name(check_tls(tls("box-10")))["certificate"]
    assert soon.status == "warn" and "provision a new one" in soon.detail
    later = datetime.now(UTC) + timedelta(days=120)
    assert _by_name(check_tls(tls("box-100"), now=later))["certificate"].status == "fail"
    plain = check_tls(MQTTConfig(allow_plaintext=True))
    assert [c.status for c in plain] == ["warn"] and "plain TCP" in plain[0].detail


def test_updates_and_the_served_model_come_from_the_store(
    tmp_path: Path, phi3_dir: Path, listening: int
) -> None:
    import time

    from agent.updates.store import ModelStore, Pointer
    from edge_contract import signing
    from edge_contract.manifest import FileEntry, Manifest, SmokeTest
    from tests.support.models import fixture_path

    config = _config(tmp_path, phi3_dir, listening)
    found = _by_name(run_checks(config))
    assert found["updates"].status == "warn" and "trusted_keys is empty" in found["updates"].detail

    key = signing.generate()
    line = signing.PublicKey(key.public_key(), signing.key_id(key.public_key())).to_line()
    config = config.model_copy(update={"update": config.update.model_copy(update={"trusted_keys": [line]})})
    assert _by_name(run_checks(config))["updates"].detail == "1 trusted key; no update installed yet"

    # An installed update (llama) is what the agent serves, so it is what the doctor loads.
    store = ModelStore(config.state_dir / "models")
    now = int(time.time())
    manifest = Manifest(
        name="assistant", version="2.0.0",
        files=[FileEntry(path="genai_config.json", size=1, sha256="0" * 64, url="http://h/g")],
        memory_bytes=1, smoke_test=SmokeTest(prompt="p", prompt_ids=[1], token_ids=[1]),
        created_at=now, expires_at=now + 60, key_id="0" * 16,
    ).signed(key)  # fmt: skip
    staged = store.staging(manifest)
    shutil.copytree(fixture_path("llama-int4"), staged, dirs_exist_ok=True)
    store.install(manifest)
    store.set_pointer(Pointer(active="assistant@2.0.0"))
    store.write_record(UpdateRecord(update=UpdateStatus(
        name="assistant", version="3.0.0", phase="rolled_back",
        error=ErrorInfo(code="probation_failed", message="2 of its first 2 jobs failed"))))  # fmt: skip
    found = _by_name(run_checks(config))
    assert found["model"].status == "ok" and found["model"].detail.startswith("assistant@2.0.0 loaded")
    assert found["updates"].status == "warn"
    assert "active assistant@2.0.0" in found["updates"].detail
    assert "assistant@3.0.0 rolled_back: probation_failed" in found["updates"].detail
