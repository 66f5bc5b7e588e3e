"""Measuring the machine: psutil for what it knows, ``/sys`` for what it does not.

``SystemProbe`` reads CPU, load, memory, swap, the disk holding ``state_dir``,
temperature sensors and the agent process's own use through psutil; thermal
zones (``/sys/class/thermal``) and the Raspberry Pi firmware's throttling
flags (``get_throttled``, or the ``rpi_volt`` hwmon device on newer kernels)
straight from sysfs.  What a machine cannot report is None, never a guess.
The models it fills are in ``telemetry``.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import psutil

from agent.health.options import HealthThresholds
from agent.health.telemetry import assess
from edge_contract.protocol import Health
from edge_contract.telemetry import (
    CPU,
    MAX_SENSORS,
    JobsTelemetry,
    Memory,
    ModelInfo,
    ProcessUsage,
    SystemReading,
    Telemetry,
    Temperature,
    ThrottleFlags,
    Throttling,
)

_MiB = 1024 * 1024
_T = TypeVar("_T")
# Sensors whose name says they measure the SoC / CPU package, most specific first
# (psutil keys, or thermal zone types with '-' written '_').
_SOC_SENSORS = ("cpu_thermal", "soc_thermal", "cpu", "coretemp", "k10temp", "zenpower", "x86_pkg_temp")


def decode_throttled(value: int) -> Throttling:
    """Decode the firmware's ``get_throttled`` bit field (bits 0-3 now, 16-19 since boot)."""

    def flags(shift: int) -> ThrottleFlags:
        return ThrottleFlags(
            under_voltage=bool(value >> shift & 1),
            freq_capped=bool(value >> (shift + 1) & 1),
            throttled=bool(value >> (shift + 2) & 1),
            soft_temp_limit=bool(value >> (shift + 3) & 1),
        )

    return Throttling(now=flags(0), since_boot=flags(16), raw=f"{value:#x}")


class SystemProbe:
    """Measures the machine and the current process; each ``measure`` is a few file reads.

    CPU percentages cover the time since the previous ``measure`` (the first
    one: since the probe was made), so call it once per interval.  ``sysfs``
    is where ``/sys`` is mounted.
    """

    def __init__(self, state_dir: str | Path, *, sysfs: str | Path = "/sys") -> None:
        self.state_dir = Path(state_dir)
        self._sysfs = Path(sysfs)
        self._process = psutil.Process()
        self._started = _safe(self._process.create_time)
        _safe(lambda: psutil.cpu_percent(interval=None))
        _safe(lambda: self._process.cpu_percent(interval=None))
        self._throttled_file = self._find_throttled_file()

    def measure(self) -> SystemReading:
        """One reading of everything; unreadable values are None."""
        now = time.time()
        boot = _safe(psutil.boot_time)
        memory = _safe(psutil.virtual_memory)
        swap = _safe(psutil.swap_memory)
        disk = _safe(lambda: psutil.disk_usage(str(self.state_dir)))
        load = _safe(psutil.getloadavg)
        rss = _safe(lambda: self._process.memory_info().rss)
        own_cpu = _safe(lambda: self._process.cpu_percent(interval=None))
        cpu_percent = _safe(lambda: psutil.cpu_percent(interval=None))
        return SystemReading(
            uptime_s=None if boot is None else round(now - boot, 1),
            agent_uptime_s=None if self._started is None else round(now - self._started, 1),
            cpu=CPU(
                percent=None if cpu_percent is None else round(cpu_percent, 1),
                load=None if load is None else (round(load[0], 2), round(load[1], 2), round(load[2], 2)),
                cores=_safe(psutil.cpu_count),
            ),
            memory=Memory(
                total_mb=None if memory is None else memory.total // _MiB,
                available_mb=None if memory is None else memory.available // _MiB,
                swap_used_mb=None if swap is None else swap.used // _MiB,
            ),
            disk_free_mb=None if disk is None else disk.free // _MiB,
            temperature=self._temperature(),
            throttling=self._throttling(),
            agent=ProcessUsage(
                rss_mb=None if rss is None else round(rss / _MiB, 1),
                cpu_percent=None if own_cpu is None else round(own_cpu, 1),
                threads=_safe(self._process.num_threads),
            ),
        )

    def telemetry(
        self,
        *,
        device_id: str,
        interval_s: float,
        thresholds: HealthThresholds,
        jobs: JobsTelemetry,
        model: ModelInfo | None = None,
        backlog: int | None = None,
        previous: Health | None = None,
        cert_expires_at: float | None = None,
    ) -> Telemetry:
        """A complete message: a fresh reading, the given agent figures, and its health verdict."""
        reading = self.measure()
        message = Telemetry(
            **dict(reading),
            device_id=device_id,
            ts=round(time.time(), 3),
            interval_s=interval_s,
            model=model,
            jobs=jobs,
            broker_backlog=backlog,
            cert_expires_at=cert_expires_at,
        )
        message.health = assess(message, thresholds, backlog, previous)
        return message

    def _temperature(self) -> Temperature:
        readings: dict[str, float] = {}
        found = _safe(psutil.sensors_temperatures) if hasattr(psutil, "sensors_temperatures") else None
        for name, entries in (found or {}).items():
            for entry in entries:
                key = f"{name}/{entry.label}" if entry.label else name
                if key not in readings and _plausible(entry.current):
                    readings[key] = round(float(entry.current), 1)
        # psutil reads thermal zones only where no hwmon device exists; read them too.
        for zone in sorted(self._sysfs.glob("class/thermal/thermal_zone*")):
            kind = _read_text(zone / "type")
            millideg = _read_int(zone / "temp")
            if kind is None or millideg is None or not _plausible(millideg / 1000):
                continue
            key = kind.replace("-", "_")
            if key not in readings:
                readings[key] = round(millideg / 1000, 1)
        if not readings:
            return Temperature()
        soc = next(
            (readings[k] for prefix in _SOC_SENSORS for k in readings if k.lower().startswith(prefix)), None
        )
        hottest = sorted(readings.items(), key=lambda kv: -kv[1])[:MAX_SENSORS]
        return Temperature(
            soc_c=soc, max_c=hottest[0][1], sensors={name[:40]: value for name, value in hottest}
        )

    def _find_throttled_file(self) -> Path | None:
        candidates = [self._sysfs / "devices/platform/soc/soc:firmware/get_throttled"]
        candidates += sorted(self._sysfs.glob("bus/platform/drivers/raspberrypi-firmware/*/get_throttled"))
        return next((path for path in candidates if path.is_file()), None)

    def _throttling(self) -> Throttling | None:
        if self._throttled_file is not None:
            text = _read_text(self._throttled_file)
            try:
                return decode_throttled(int(text or "", 16))
            except ValueError:
                pass
        # Newer Raspberry Pi kernels report under-voltage through the rpi_volt hwmon device only.
        for hwmon in sorted(self._sysfs.glob("class/hwmon/hwmon*")):
            if _read_text(hwmon / "name") == "rpi_volt":
                alarm = _read_int(hwmon / "in0_lcrit_alarm")
                if alarm is not None:
                    return Throttling(
                        now=ThrottleFlags(under_voltage=bool(alarm)), since_boot=ThrottleFlags()
                    )
        return None


def _safe(read: Callable[[], _T]) -> _T | None:
    """The value, or None where the platform cannot give it."""
    try:
        return read()
    except (OSError, RuntimeError, NotImplementedError, AttributeError, ValueError, psutil.Error):
        return None


def _read_text(path: Path) -> str | None:
    try:
        return path.read_text(encoding="ascii", errors="replace").strip()
    except OSError:  # some sysfs attributes fail to read (EINVAL, ENODATA) when a sensor is off
        return None


def _read_int(path: Path) -> int | None:
    text = _read_text(path)
    try:
        return None if text is None else int(text)
    except ValueError:
        return None


def _plausible(celsius: float) -> bool:
    return -50.0 <= celsius <= 200.0
