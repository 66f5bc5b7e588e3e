"""Telemetry: real readings of this machine, sysfs trees laid out like a Raspberry Pi's, health, job stats."""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import threading
import time
from pathlib import Path

import psutil
import pytest
from pydantic import ValidationError

from agent.config import HealthThresholds, TelemetryConfig
from agent.health.probe import SystemProbe, decode_throttled
from agent.health.telemetry import JobStats, assess
from edge_contract.protocol import Health
from edge_contract.telemetry import (
    CPU,
    JobCounts,
    JobsTelemetry,
    Memory,
    ModelInfo,
    ProcessUsage,
    Telemetry,
    Temperature,
    ThrottleFlags,
    percentile,
)

MiB = 1024 * 1024
DEFAULTS = HealthThresholds()


def _sysfs_temperatures() -> list[float]:
    """Readable thermal zones of this machine, read independently of the probe."""
    found = []
    for zone in Path("/sys/class/thermal").glob("thermal_zone*"):
        with contextlib.suppress(OSError, ValueError):
            found.append(int((zone / "temp").read_text()) / 1000)
    return found


def _message(**changes: object) -> Telemetry:
    base = Telemetry(
        device_id="box-1",
        ts=1.0,
        interval_s=10.0,
        memory=Memory(total_mb=4096, available_mb=2048, swap_used_mb=0),
        disk_free_mb=10_000,
        temperature=Temperature(soc_c=50.0, max_c=50.0, sensors={"cpu_thermal": 50.0}),
    )
    return base.model_copy(update=changes)


# -- this machine ---------------------------------------------------------------------


def test_reading_of_this_machine(tmp_path: Path) -> None:
    probe = SystemProbe(tmp_path)
    reading = probe.measure()
    memory = psutil.virtual_memory()
    assert reading.memory.total_mb == memory.total // MiB
    assert (
        reading.memory.available_mb is not None and 0 < reading.memory.available_mb <= reading.memory.total_mb
    )
    assert reading.memory.swap_used_mb is not None and reading.memory.swap_used_mb >= 0
    assert reading.cpu.cores == os.cpu_count()
    assert reading.cpu.percent is not None and 0.0 <= reading.cpu.percent <= 100.0
    assert reading.cpu.load is not None and all(v >= 0 for v in reading.cpu.load)
    free = shutil.disk_usage(tmp_path).free // MiB
    assert reading.disk_free_mb is not None and abs(reading.disk_free_mb - free) <= max(64, free // 100)
    assert reading.uptime_s is not None and reading.agent_uptime_s is not None
    assert reading.uptime_s >= reading.agent_uptime_s >= 0
    assert reading.agent.rss_mb is not None and reading.agent.rss_mb > 10
    assert reading.agent.threads is not None and reading.agent.threads >= 1

    sensors = psutil.sensors_temperatures()
    if sensors or _sysfs_temperatures():
        assert reading.temperature.max_c is not None and reading.temperature.sensors
    else:  # this machine has no sensor: nothing is invented
        assert reading.temperature == Temperature(soc_c=None, max_c=None, sensors={})
    pi_flags = Path("/sys/devices/platform/soc/soc:firmware/get_throttled")
    if not pi_flags.exists() and not list(Path("/sys/bus/platform/drivers").glob("raspberrypi-firmware/*")):
        assert reading.throttling is None


def test_missing_state_dir_gives_null_disk(tmp_path: Path) -> None:
    assert SystemProbe(tmp_path / "not-yet").measure().disk_free_mb is None


def test_process_cpu_covers_the_time_since_the_last_reading(tmp_path: Path) -> None:
    probe = SystemProbe(tmp_path)
    probe.measure()
    end = time.process_time() + 0.2
    data = b"x" * 4096
    while time.process_time() < end:  # a fifth of a second of real work in this process
        data = hashlib.sha256(data).digest() * 128
    usage = probe.measure().agent.cpu_percent
    assert usage is not None and usage > 0


def test_message_of_this_machine_is_small_and_round_trips(tmp_path: Path) -> None:
    stats = JobStats()
    stats.record("succeeded", 1.5, 12.0)
    message = SystemProbe(tmp_path).telemetry(
        device_id="box-1",
        interval_s=10.0,
        thresholds=DEFAULTS,
        jobs=stats.snapshot_and_reset(queue_depth=2),
        model=ModelInfo(name="phi3-int4", version="3", precision="int4"),
        backlog=0,
    )
    payload = message.model_dump_json()
    assert len(payload.encode()) < 1024
    assert payload.startswith('{"type":"telemetry","device_id":"box-1","ts":')
    again = Telemetry.model_validate_json(payload)
    assert again == message
    assert message.health is not None and message.jobs.queue_depth == 2


def test_worst_case_message_is_under_2kb() -> None:
    flags = ThrottleFlags(under_voltage=True, freq_capped=True, throttled=True, soft_temp_limit=True)
    big = 2**40
    counts = JobCounts(succeeded=big, failed=big, rejected=big, canceled=big, expired=big)
    message = Telemetry(
        device_id="d" * 64,
        ts=time.time(),
        interval_s=3600.0,
        uptime_s=123456789.1,
        agent_uptime_s=123456789.1,
        cpu=CPU(percent=100.0, load=(123.45, 123.45, 123.45), cores=256),
        memory=Memory(total_mb=big, available_mb=big, swap_used_mb=big),
        disk_free_mb=big,
        temperature=Temperature(soc_c=-12.3, max_c=123.4, sensors={f"{i}" * 40: -123.4 for i in range(8)}),
        throttling=decode_throttled(0xFFFFFFFF).model_copy(update={"now": flags}),
        agent=ProcessUsage(rss_mb=123456.7, cpu_percent=25600.0, threads=10000),
        model=ModelInfo(name="m" * 64, version="v" * 64, precision="p" * 16),
        jobs=JobsTelemetry(
            queue_depth=big,
            interval=counts,
            total=counts,
            latency_p50_s=123456.789,
            latency_p95_s=123456.789,
            decode_tok_s=12345.6,
            http_total=big,
        ),
        broker_backlog=big,
        health=Health(
            verdict="degraded",
            reasons=["hot", "throttled", "under_voltage", "low_memory", "low_disk", "broker_backlog"],
        ),
    )
    assert len(message.model_dump_json().encode()) < 2048


def test_bounded_fields_refuse_oversize() -> None:
    with pytest.raises(ValidationError):
        Temperature(sensors={str(i): 1.0 for i in range(9)})
    with pytest.raises(ValidationError):
        ModelInfo(name="x" * 65)


# -- sysfs trees like a Raspberry Pi's ----------------------------------------------------------


def _write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def test_pi4_sysfs_thermal_zone_and_throttled_flags(tmp_path: Path) -> None:
    sysfs = tmp_path / "sys"
    _write(sysfs / "class/thermal/thermal_zone0/type", "cpu-thermal\n")
    _write(sysfs / "class/thermal/thermal_zone0/temp", "81234\n")
    _write(sysfs / "class/thermal/thermal_zone1/type", "broken\n")
    (sysfs / "class/thermal/thermal_zone1/temp").mkdir(parents=True)  # unreadable: skipped
    _write(sysfs / "devices/platform/soc/soc:firmware/get_throttled", "50005\n")
    probe = SystemProbe(tmp_path, sysfs=sysfs)
    reading = probe.measure()
    assert reading.temperature.sensors["cpu_thermal"] == 81.2
    assert "broken" not in reading.temperature.sensors
    if not psutil.sensors_temperatures():  # on a machine with its own sensors those come first
        assert reading.temperature.soc_c == 81.2 and reading.temperature.max_c == 81.2
    assert reading.throttling == decode_throttled(0x50005)
    assert reading.throttling.now.under_voltage and reading.throttling.now.throttled
    assert not reading.throttling.now.freq_capped and not reading.throttling.now.soft_temp_limit
    assert reading.throttling.raw == "0x50005"

    message = probe.telemetry(device_id="pi", interval_s=10, thresholds=DEFAULTS, jobs=JobsTelemetry())
    assert message.health == Health(verdict="degraded", reasons=["hot", "throttled", "under_voltage"])
    assert message.health.overloaded

    _write(sysfs / "devices/platform/soc/soc:firmware/get_throttled", "0\n")
    _write(sysfs / "class/thermal/thermal_zone0/temp", "45000\n")
    calm = probe.measure()
    assert calm.throttling is not None and calm.throttling.now == ThrottleFlags(
        under_voltage=False, freq_capped=False, throttled=False, soft_temp_limit=False
    )
    assert calm.temperature.sensors["cpu_thermal"] == 45.0


def test_pi5_firmware_found_through_its_driver(tmp_path: Path) -> None:
    sysfs = tmp_path / "sys"
    _write(sysfs / "bus/platform/drivers/raspberrypi-firmware/soc@107c000000:firmware/get_throttled", "80008")
    throttling = SystemProbe(tmp_path, sysfs=sysfs).measure().throttling
    assert throttling is not None
    assert throttling.now.soft_temp_limit and throttling.since_boot.soft_temp_limit
    assert not throttling.now.under_voltage


def test_newer_kernels_under_voltage_from_rpi_volt_hwmon(tmp_path: Path) -> None:
    sysfs = tmp_path / "sys"
    _write(sysfs / "class/hwmon/hwmon0/name", "cpu_thermal\n")
    _write(sysfs / "class/hwmon/hwmon1/name", "rpi_volt\n")
    _write(sysfs / "class/hwmon/hwmon1/in0_lcrit_alarm", "1\n")
    throttling = SystemProbe(tmp_path, sysfs=sysfs).measure().throttling
    assert throttling is not None
    assert throttling.now == ThrottleFlags(under_voltage=True)
    assert throttling.since_boot == ThrottleFlags(), "what the hwmon device cannot say stays null"
    assert throttling.raw is None


@pytest.mark.parametrize(
    "value,now,since_boot",
    [
        (0x0, (False, False, False, False), (False, False, False, False)),
        (0x1, (True, False, False, False), (False, False, False, False)),
        (0x2, (False, True, False, False), (False, False, False, False)),
        (0x4, (False, False, True, False), (False, False, False, False)),
        (0x8, (False, False, False, True), (False, False, False, False)),
        (0xF0000, (False, False, False, False), (True, True, True, True)),
        (0x50005, (True, False, True, False), (True, False, True, False)),
    ],
)
def test_decode_throttled(
    value: int, now: tuple[bool, bool, bool, bool], since_boot: tuple[bool, bool, bool, bool]
) -> None:
    decoded = decode_throttled(value)
    keys = ("under_voltage", "freq_capped", "throttled", "soft_temp_limit")
    assert decoded.now == ThrottleFlags(**dict(zip(keys, now, strict=True)))
    assert decoded.since_boot == ThrottleFlags(**dict(zip(keys, since_boot, strict=True)))


# -- health -----------------------------------------------------------------------------------------


def test_real_machine_under_forced_thresholds(tmp_path: Path) -> None:
    probe = SystemProbe(tmp_path)
    reading = probe.measure()
    assert reading.memory.total_mb is not None and reading.disk_free_mb is not None
    forced = HealthThresholds(
        min_mem_available_mb=reading.memory.total_mb + 1,
        min_disk_free_mb=reading.disk_free_mb + 100_000,
        max_temp_c=30.0,
        max_backlog=10,
    )
    message = probe.telemetry(
        device_id="box", interval_s=10, thresholds=forced, jobs=JobsTelemetry(), backlog=11
    )
    assert message.health is not None and message.health.verdict == "degraded"
    assert {"low_memory", "low_disk", "broker_backlog"} <= set(message.health.reasons)
    assert message.health.overloaded
    if message.temperature.max_c is None:
        assert "hot" not in message.health.reasons, "an unknown temperature never counts as hot"
    relaxed = HealthThresholds(min_mem_available_mb=0, min_disk_free_mb=0, max_temp_c=125.0)
    calm = assess(message, relaxed, backlog=0)
    assert calm == Health(verdict="ok", reasons=[]) and not calm.overloaded


def test_assess_boundaries_and_hysteresis() -> None:
    limits = HealthThresholds(
        max_temp_c=80, temp_hysteresis_c=5, min_mem_available_mb=200, mem_hysteresis_mb=50
    )
    hot = _message(temperature=Temperature(soc_c=80.0, max_c=80.0))
    assert assess(hot, limits, None).reasons == ["hot"]
    cooling = _message(temperature=Temperature(soc_c=77.0, max_c=90.0))
    assert assess(cooling, limits, None).reasons == [], "the SoC sensor decides, not the hottest"
    previous = assess(hot, limits, None)
    assert assess(cooling, limits, None, previous).reasons == ["hot"], "hot until 5 degrees below"
    cool = _message(temperature=Temperature(soc_c=74.9, max_c=74.9))
    assert assess(cool, limits, None, previous).verdict == "ok"
    no_soc = _message(temperature=Temperature(soc_c=None, max_c=85.0))
    assert assess(no_soc, limits, None).reasons == ["hot"], "without a known SoC sensor the hottest counts"

    short = _message(memory=Memory(available_mb=199))
    assert assess(short, limits, None).reasons == ["low_memory"]
    recovering = _message(memory=Memory(available_mb=220))
    low = assess(short, limits, None)
    assert assess(recovering, limits, None).verdict == "ok"
    assert assess(recovering, limits, None, low).reasons == ["low_memory"]
    assert assess(_message(memory=Memory(available_mb=250)), limits, None, low).verdict == "ok"

    assert assess(_message(disk_free_mb=499), limits, None).reasons == ["low_disk"]
    assert assess(_message(), limits, 1000).verdict == "ok"
    assert assess(_message(), limits, 1001).reasons == ["broker_backlog"]
    degraded = assess(_message(), limits, 1001)
    assert degraded.verdict == "degraded" and not degraded.overloaded, "a backlog does not shed load"
    unknown = _message(memory=Memory(), disk_free_mb=None, temperature=Temperature())
    assert assess(unknown, limits, None).verdict == "ok"


def test_throttled_counts_only_when_current() -> None:
    past = decode_throttled(0xF0000)
    assert assess(_message(throttling=past), DEFAULTS, None).verdict == "ok"
    capped = decode_throttled(0x2)
    assert assess(_message(throttling=capped), DEFAULTS, None).reasons == ["throttled"]


def test_config_sections() -> None:
    assert TelemetryConfig().interval_s == 10.0
    assert DEFAULTS.max_temp_c == 80 and DEFAULTS.min_mem_available_mb == 200
    assert DEFAULTS.min_disk_free_mb == 500 and DEFAULTS.shed_load == "reject"
    assert HealthThresholds(shed_load="queue").shed_load == "queue"
    for bad in ({"interval_s": 0.5}, {"interval_s": 7200}, {"intervall_s": 10}):
        with pytest.raises(ValidationError):
            TelemetryConfig.model_validate(bad)
    for bad_health in ({"shed_load": "drop"}, {"max_temp_c": 200}, {"max_backlog": 0}, {"max_tmp_c": 70}):
        with pytest.raises(ValidationError):
            HealthThresholds.model_validate(bad_health)


# -- job statistics ------------------------------------------------------------------------------------


def test_job_stats_percentiles_and_counters() -> None:
    stats = JobStats()
    empty = stats.snapshot_and_reset()
    assert empty.latency_p50_s is None and empty.latency_p95_s is None and empty.decode_tok_s is None
    for i in range(1, 101):
        stats.record("succeeded", float(i), 10.0 if i % 2 else 30.0)
    stats.record("rejected")  # turned away at once: no latency
    stats.record("failed", 0.5)
    stats.record("expired", None)
    snap = stats.snapshot_and_reset(queue_depth=4)
    assert snap.queue_depth == 4
    assert snap.interval == JobCounts(succeeded=100, rejected=1, failed=1, expired=1)
    assert snap.total == snap.interval
    assert snap.latency_p50_s == 50.0  # 101 latencies: 0.5, 1..100
    assert snap.latency_p95_s == 95.0
    assert snap.decode_tok_s == 20.0

    stats.record("canceled", 2.0)
    stats.record("succeeded", 4.0, 8.0)
    second = stats.snapshot_and_reset()
    assert second.interval == JobCounts(succeeded=1, canceled=1), "the interval starts afresh"
    assert second.total == JobCounts(succeeded=101, rejected=1, failed=1, expired=1, canceled=1)
    assert second.latency_p50_s == 3.0 and second.latency_p95_s == 3.9
    assert second.decode_tok_s == 8.0


def test_job_stats_ignores_nonsense_samples_and_bounds_memory() -> None:
    stats = JobStats(max_samples=10)
    stats.record("succeeded", float("nan"), float("inf"))
    stats.record("succeeded", -1.0, 0.0)
    assert stats.snapshot_and_reset().latency_p50_s is None
    for i in range(100):
        stats.record("succeeded", float(i))
    snap = stats.snapshot_and_reset()
    assert snap.interval.succeeded == 100
    assert snap.latency_p50_s == 94.5, "the most recent samples are kept"


def test_job_stats_is_thread_safe() -> None:
    stats = JobStats()

    def worker() -> None:
        for _ in range(2000):
            stats.record("succeeded", 1.0, 5.0)

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for t in threads:
        t.start()
    collected = 0
    while any(t.is_alive() for t in threads):
        collected += stats.snapshot_and_reset().interval.succeeded
    for t in threads:
        t.join()
    final = stats.snapshot_and_reset()
    assert collected + final.interval.succeeded == 8000
    assert final.total.succeeded == 8000


def test_percentile() -> None:
    assert percentile([], 0.5) is None
    assert percentile([3.0], 0.95) == 3.0
    assert percentile([1.0, 2.0, 3.0, 4.0], 0.5) == 2.5
    assert percentile([1.0, 2.0, 3.0, 4.0], 0.0) == 1.0 and percentile([1.0, 2.0, 3.0, 4.0], 1.0) == 4.0
