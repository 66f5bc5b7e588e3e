"""Supervision: health and telemetry, the systemd watchdog and status line, the retained status.

Owned by the intake thread, which calls ``tick`` at least twice a second
between messages; ``publish_status`` also runs on the link's network thread (on
every connect).  It reads the other pieces and never blocks on them for long:
a storage error while counting the queue leaves that figure out, it does not
stop the tick.

The watchdog is fed only while the agent really works: the worker showed life
recently (it keeps doing so while it waits for a failing disk), or is in a
prefill or model swap it announced; the link's thread runs; and this tick runs.
A full disk is not a hang: restarting would not free space.
"""

from __future__ import annotations

import logging
import sqlite3
import time

from agent.config import AgentConfig
from agent.daemon.faults import StorageFaults
from agent.daemon.outbox import Outbox
from agent.daemon.outcome import Models
from agent.daemon.worker import Worker
from agent.health.probe import SystemProbe
from agent.health.sd_notify import Notifier
from agent.health.telemetry import JobStats
from agent.jobs.store import JobStore, corrupt_copies
from agent.link.mqtt import MQTTLink
from agent.link.tls import CERT_WARN_DAYS, certificate_expiry, days_left
from edge_contract import __version__
from edge_contract.protocol import Health, HealthReason, Status, Topics
from edge_contract.telemetry import ModelInfo, PrefixCacheTelemetry

log = logging.getLogger(__name__)

# Until the broker is reached, ask systemd for this much more start time every
# third of it: a box that boots before its broker must not be killed for that.
_START_EXTENSION_S = 15.0
# Delivered results are kept this long (and at most this many) to answer
# duplicates of a finished job from the store; pruned once an hour.
_KEEP_RESULTS_S = 7 * 24 * 3600
_KEEP_RESULTS_MAX = 10_000
_PRUNE_EVERY_S = 3600.0
CAPABILITIES = ["generate", "stream", "chat", "cancel"]


class Supervisor:
    """Health, telemetry, watchdog and status; see the module docstring."""

    def __init__(
        self,
        config: AgentConfig,
        topics: Topics,
        *,
        link: MQTTLink,
        store: JobStore,
        outbox: Outbox,
        worker: Worker,
        models: Models,
        stats: JobStats,
        faults: StorageFaults,
        notifier: Notifier | None = None,
        probe: SystemProbe | None = None,
    ) -> None:
        self.config = config
        self.topics = topics
        self.link = link
        self.store = store
        self.outbox = outbox
        self.worker = worker
        self.models = models
        self.stats = stats
        self.faults = faults
        self.notifier = notifier or Notifier()
        self.probe = probe or SystemProbe(config.state_dir, sysfs=config.telemetry.sysfs_root)
        self.health: Health | None = None
        self.labels: dict[str, str] = {}  # pushed by the fleet with the membership
        self.ready = False
        self._next_telemetry = 0.0
        self._next_watchdog = 0.0
        self._next_extension = 0.0
        self._next_prune = time.monotonic() + _PRUNE_EVERY_S
        self.cert_expires_at = _certificate_expiry(config)

    def _cert_expires_at(self) -> float | None:
        """The certificate in use: a renewed one, loaded by the link on reconnection, replaces the first."""
        renewed = self.link.cert_expiry
        return renewed.timestamp() if renewed is not None else self.cert_expires_at

    # -- called by the intake thread ------------------------------------------------------------

    def tick(self, now: float | None = None) -> None:
        """Feed systemd, publish telemetry when due, prune, retry interrupted bookkeeping."""
        now = time.monotonic() if now is None else now
        self.outbox.retry(now)
        if not self.ready:
            if self.link.connected.is_set():
                self.ready = True
                self.notifier.ready(self.status_line())
            elif now >= self._next_extension:
                self._next_extension = now + _START_EXTENSION_S / 3
                self.notifier.extend_timeout(_START_EXTENSION_S)
        interval = self.notifier.watchdog_interval_s
        if interval is not None and now >= self._next_watchdog and self.working(now, 2 * interval):
            self._next_watchdog = now + interval
            self.notifier.watchdog()
        if now >= self._next_telemetry:
            self._next_telemetry = now + self.config.telemetry.interval_s
            self.publish_telemetry()
        if now >= self._next_prune:
            self._next_prune = now + _PRUNE_EVERY_S
            try:
                self.store.prune(keep_s=_KEEP_RESULTS_S, keep_max=_KEEP_RESULTS_MAX)
            except sqlite3.Error as exc:
                self.faults.failed("pruning delivered results", exc)

    def working(self, now: float, patience_s: float) -> bool:
        """The worker showed life recently (or announced a long silence) and the link's thread runs."""
        worker = self.worker
        worker_ok = now - worker.beat < patience_s or now < worker.quiet_until
        return worker_ok and worker.alive and self.link.alive

    def shedding(self) -> list[str] | None:
        """Reasons to turn new jobs away now (``shed_load = "reject"`` while overloaded), else None."""
        health = self.health
        if health is not None and health.overloaded and self.config.health.shed_load == "reject":
            return list(health.reasons)
        return None

    def holding(self) -> bool:
        """Whether the worker should start no job now (``shed_load = "queue"`` while overloaded)."""
        health = self.health
        return health is not None and health.overloaded and self.config.health.shed_load == "queue"

    def store_resets(self) -> int:
        """Corrupt job databases moved aside and still in state_dir."""
        return len(corrupt_copies(self.store.path))

    def publish_telemetry(self) -> None:
        """Measure, assess and publish one telemetry message; republish the status if health changed."""
        serving = self.models.serving
        resets = self.store_resets()
        try:
            depth: int | None = self.store.queued_count()
        except sqlite3.Error as exc:
            self.faults.failed("counting queued jobs", exc)
            depth = None
        jobs = self.stats.snapshot_and_reset(depth).model_copy(
            update={"store_errors": self.faults.total, "store_resets": resets}
        )
        message = self.probe.telemetry(
            device_id=self.config.device_id,
            interval_s=self.config.telemetry.interval_s,
            thresholds=self.config.health,
            jobs=jobs,
            model=ModelInfo(
                name=serving.ref.name,
                version=serving.ref.version,
                precision=getattr(serving, "precision", None),
                prefix_cache=PrefixCacheTelemetry.of(serving.engine.prefix_cache_stats()),
            ),
            backlog=self.outbox.backlog,
            previous=self.health,
            cert_expires_at=self._cert_expires_at(),
        )
        health = message.health
        if health is not None and (self.faults.failing or resets):
            reasons: list[HealthReason] = [*health.reasons, "storage"]
            health = message.health = Health(verdict="degraded", reasons=reasons)
        changed = health != self.health
        self.health = health
        if changed and health is not None:
            level = logging.WARNING if health.verdict == "degraded" else logging.INFO
            log.log(level, "health: %s %s", health.verdict, ", ".join(health.reasons))
        self.link.publish(self.topics.telemetry, message.model_dump_json().encode(), qos=0)
        if changed and self.ready:
            self.publish_status()
        self.notifier.status(self.status_line())

    def status_line(self) -> str:
        """One line for ``systemctl status``."""
        health: str = self.health.verdict if self.health is not None else "unknown"
        if self.health is not None and self.health.reasons:
            health += " (" + ", ".join(self.health.reasons) + ")"
        link = "connected" if self.link.connected.is_set() else "broker unreachable"
        try:
            queued = f"{self.store.queued_count()} queued"
        except sqlite3.Error:
            queued = "queue unreadable"
        running = self.worker.running  # the running jobs' ids, comma-separated (several when batching)
        busy = f"{len(running.split(', '))} running" if running else "idle"
        engine = getattr(self.models.serving, "engine", None)  # None while an update replaces it in place
        shape = f" ({engine.kv_cache} KV, {engine.context_length} tokens)" if engine is not None else ""
        line = f"serving {self.models.serving.ref.name}{shape}: {busy}, {queued}, health {health}, {link}"
        if self.faults.failing:
            line += "; JOB STORE FAILING (disk full?)"
        resets = corrupt_copies(self.store.path)
        if resets:
            line += f"; JOB DATABASE WAS CORRUPT: moved to {resets[-1].name}, queue started empty"
        return line

    # -- any thread ----------------------------------------------------------------------------------

    def publish_status(self) -> None:
        """The retained presence message (online, with the model, its KV cache and health)."""
        # None while an update replaces the model in place (the old engine unloaded first).
        engine = getattr(self.models.serving, "engine", None)
        status = Status(
            online=True,
            device_id=self.config.device_id,
            group=self.config.group,
            labels=self.labels,
            agent_version=__version__,
            model=self.models.serving.ref,
            context_tokens=engine.context_length if engine is not None else None,
            kv_cache=engine.kv_cache if engine is not None else None,
            kv_cache_reason=_clip(engine.kv_reason, 400) if engine is not None else None,
            capabilities=CAPABILITIES,
            health=self.health,
        )
        self.link.publish(self.topics.status, status.model_dump_json().encode(), retain=True)


def _clip(text: str | None, limit: int) -> str | None:
    """``text`` cut to ``limit`` characters (a telemetry field's bound)."""
    return text if text is None or len(text) <= limit else text[: limit - 1] + "…"


def offline_status(config: AgentConfig) -> bytes:
    """The Last Will and the clean-shutdown status: offline, naming the device and its group."""
    return Status(online=False, device_id=config.device_id, group=config.group).model_dump_json().encode()


def _certificate_expiry(config: AgentConfig) -> float | None:
    """When the client certificate expires (loaded once, at start, like the TLS context); warns early."""
    tls = config.mqtt.tls
    if tls is None or tls.cert is None:
        return None
    expiry = certificate_expiry(tls.cert)
    left = days_left(expiry)
    if left < 0:
        log.error("the client certificate %s expired on %s: the broker will refuse it", tls.cert, expiry)
    elif left < CERT_WARN_DAYS:
        log.warning("the client certificate %s expires on %s: provision a new one", tls.cert, expiry)
    return expiry.timestamp()


__all__ = ["CAPABILITIES", "Supervisor", "offline_status"]
