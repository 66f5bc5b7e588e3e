"""``GET /metrics``: the fleet in Prometheus' text format (a viewer token, or open with
``--metrics-public``).

``edge_device_online{device,group}`` is 1 or 0 for every device of the inventory (never
seen: 0); the gauges from each box's last telemetry carry ``device`` and ``group``; the
model each runs is an info metric; rollouts export their state and targets by state.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from fastapi import APIRouter, Request, Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import GaugeMetricFamily, InfoMetricFamily
from prometheus_client.registry import Collector

from ..auth import Viewer

router = APIRouter(tags=["metrics"])

# (metric, help, how to read it from a DeviceRow or the Telemetry)
_GAUGES: list[tuple[str, str, Any]] = [
    ("edge_device_decode_tokens_per_second", "Mean decode speed of the jobs of the last interval", lambda r, t: r.tok_s),
    ("edge_device_temperature_celsius", "SoC (else hottest) temperature", lambda r, t: r.temp_c),
    ("edge_device_memory_available_bytes", "Memory new allocations can get", lambda r, t: None if r.mem_available_mb is None else r.mem_available_mb * 1048576),
    ("edge_device_queue_depth", "Jobs stored and waiting to run", lambda r, t: r.queue),
    ("edge_device_jobs_succeeded", "Jobs succeeded since the agent started", lambda r, t: t.jobs.total.succeeded),
    ("edge_device_jobs_failed", "Jobs failed since the agent started", lambda r, t: t.jobs.total.failed),
    ("edge_device_cpu_percent", "Whole-machine CPU use", lambda r, t: t.cpu.percent),
    ("edge_device_healthy", "1 when the box says ok, 0 when degraded", lambda r, t: None if r.health is None else int(r.health == "ok")),
]  # fmt: skip


class FleetCollector(Collector):
    """Reads the inventory, the broker's view and the rollouts at every scrape."""

    def __init__(self, app: Any) -> None:
        self.app = app

    def collect(self) -> Iterator[Any]:
        """The metrics of one scrape."""
        store, link, service = self.app.state.store, self.app.state.link, self.app.state.service
        online = GaugeMetricFamily(
            "edge_device_online", "1 while the box's status says online", labels=["device", "group"]
        )
        seen_at = GaugeMetricFamily(
            "edge_device_last_seen_timestamp_seconds",
            "When the box was last seen",
            labels=["device", "group"],
        )
        model = InfoMetricFamily("edge_device_model", "The model the box runs", labels=["device", "group"])
        gauges = {
            name: GaugeMetricFamily(name, text, labels=["device", "group"]) for name, text, _f in _GAUGES
        }
        live: dict[str, Any] = {}
        if link is not None:
            with link.lock:
                for device in link.view.devices.values():
                    if device.last_seen:
                        live[device.device_id] = (link.view.row(device), device.telemetry)
        for record in store.devices():
            row, tele = live.get(record.device_id, (None, None))
            group = (row.group if row and row.group else None) or record.group or ""
            labels = [record.device_id, group]
            is_online = row.online if row is not None and row.online is not None else record.online
            online.add_metric(labels, 1.0 if is_online else 0.0)
            last = max(filter(None, [record.last_seen, row.last_seen if row else None]), default=None)
            if last:
                seen_at.add_metric(labels, last)
            name = (row.model if row else None) or record.model
            if name:
                version = (row.version if row else None) or record.version or ""
                model.add_metric(labels, {"model": name, "version": version})
            if row is None or tele is None or not is_online:
                continue
            for metric, _text, read in _GAUGES:
                value = read(row, tele)
                if value is not None:
                    gauges[metric].add_metric(labels, float(value))
        yield online
        yield seen_at
        yield model
        yield from gauges.values()
        state = GaugeMetricFamily(
            "edge_rollout_state", "1 for the rollout's current state", labels=["rollout", "state"]
        )
        targets = GaugeMetricFamily(
            "edge_rollout_targets", "Devices of a rollout by state", labels=["rollout", "state"]
        )
        wave = GaugeMetricFamily("edge_rollout_wave", "Current wave (1-based)", labels=["rollout"])
        for rollout in service.rollouts.all():
            state.add_metric([rollout.id, rollout.state], 1.0)
            wave.add_metric([rollout.id], float(min(rollout.wave + 1, rollout.wave_count)))
            for target_state, count in service.rollouts.counts(rollout.id).items():
                targets.add_metric([rollout.id, target_state], float(count))
        yield state
        yield targets
        yield wave
        if link is not None:
            up = GaugeMetricFamily(
                "edge_fleet_server_broker_connected", "1 while the server's broker link is up"
            )
            up.add_metric([], 1.0 if link.connected else 0.0)
            yield up


def registry_for(app: Any) -> CollectorRegistry:
    """A registry with the fleet collector (one per app, so tests' apps never share metrics)."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(FleetCollector(app))
    return registry


def _scrape(request: Request) -> Response:
    return Response(generate_latest(request.app.state.registry), media_type=CONTENT_TYPE_LATEST)


@router.get("/metrics", response_class=Response)
def metrics(request: Request, _who: Viewer) -> Response:
    """The Prometheus text format (a viewer token: `authorization: {credentials_file: …}` in Prometheus)."""
    return _scrape(request)


public_router = APIRouter(tags=["metrics"])


@public_router.get("/metrics", response_class=Response)
def public_metrics(request: Request) -> Response:
    """The Prometheus text format, without a token (``--metrics-public``)."""
    return _scrape(request)
