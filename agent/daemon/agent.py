"""``Agent``: the composition root that builds the pieces, wires them and runs the intake loop."""

from __future__ import annotations

import logging
import queue
import signal
import sqlite3
import threading
import time
from collections.abc import Callable
from types import FrameType

from agent.config import AgentConfig
from agent.daemon import membership
from agent.daemon.faults import StorageFaults
from agent.daemon.http.server import HTTPServer
from agent.daemon.inbox import Inbox, rules_for
from agent.daemon.outbox import Outbox
from agent.daemon.renewal import Renewal
from agent.daemon.replies import Replies, cancel_local_orphans
from agent.daemon.supervisor import Supervisor, offline_status
from agent.daemon.worker import Worker
from agent.health.telemetry import JobStats
from agent.jobs.store import open_store
from agent.link.mqtt import MQTTLink, Published
from agent.link.presence import AgentLock, LinkRecorder
from agent.updates.updater import Updater
from edge_contract import __version__
from edge_contract.errors import StorageError
from edge_contract.protocol import ModelState, Topics

log = logging.getLogger("agent.daemon")
# At a clean stop, how long queued prefix-cache blocks may take to reach the disk: systemd's 30 s
# TimeoutStopSec also covers the running job's grace period (20 s by default) and the last messages.
PREFIX_FLUSH_S = 3.0

#: Builds the model source: ``(config, publish=..., between_jobs=...)``; tests inject their own.
UpdaterFactory = Callable[..., Updater]


class Agent:
    """One box's daemon. ``serve`` runs until ``shutdown`` (or SIGTERM/SIGINT)."""

    worker: Worker
    supervisor: Supervisor

    def __init__(self, config: AgentConfig, *, updater_factory: UpdaterFactory = Updater) -> None:
        """Open the job store (a corrupt one is moved aside), load the model, set up the link.

        Raises ``StorageError`` naming the path and the fix when state_dir cannot be used.
        """
        self.config = config
        self.configured_group = config.group
        # The fleet's word (membership pushed by `edge-fleet move`) wins over agent.toml's group.
        pushed = membership.load(config.state_dir, config.device_id)
        if pushed is not None:
            config = self.config = config.model_copy(update={"group": pushed.group})
        self.labels: dict[str, str] = dict(pushed.labels) if pushed else {}
        self.topics = topics = Topics(config.mqtt.topic_prefix, config.device_id, config.group)
        self.store, self.store_moved = open_store(config.state_dir / "jobs.sqlite3")
        # Held for the agent's life: a second agent is refused, `doctor` knows not to log in.
        self.lock = AgentLock(config.state_dir)
        self.lock.acquire()
        self.faults = StorageFaults()
        self.stats = JobStats(http=config.http.listen is not None)
        # Loads the active model (or falls back to the previous or configured one).
        self.updater = updater_factory(
            config,
            publish=self._publish_model_state,
            between_jobs=lambda task: self.worker.between_jobs(task),
        )
        subscriptions, limits = membership.subscriptions_for(config, topics)
        self.link = MQTTLink(
            config.mqtt,
            client_id=config.device_id,
            subscriptions=subscriptions,
            will=(topics.status, offline_status(config)),
            # Let the broker drop absurd messages itself; oversized-but-sane ones
            # still arrive (cut to their head) and get a precise "payload_too_large" answer.
            max_packet_bytes=max(4 * config.jobs.max_payload_bytes, 1 << 20),
            on_connect=self._on_connect,
            payload_limits=limits,
            subscriptions_file=config.state_dir / "subscriptions.json",
            recorder=LinkRecorder(config.state_dir),
            optional={
                topics.membership: "this box's broker role predates membership pushes: it keeps the "
                "group of its agent.toml (`edge-fleet move NAME --group G` grants the topic)",
                topics.renew_answer: "this box's broker role predates renewal over the link: renew its "
                "certificate with `edge-fleet renew` (`edge-fleet move NAME --group G` grants the topic)",
            },
        )
        self.renewal = Renewal(config, topics, self.link)
        self.outbox = Outbox(self.link, self.store, self.faults)
        # The reply sink of every job: MQTT topics to the outbox, HTTP jobs to the HTTP server.
        self.replies = Replies(
            self.outbox,
            lambda topic, payload, corr: self.link.publish(topic, payload, correlation=corr),
            self.store,
            self.faults,
        )
        self.worker = Worker(
            self.store,
            self.replies,
            self.updater,
            device_id=config.device_id,
            stats=self.stats,
            faults=self.faults,
            publish_chunk=self.replies.publish_chunk,
            hold=lambda: self.supervisor.holding(),
        )
        self.supervisor = Supervisor(
            config,
            topics,
            link=self.link,
            store=self.store,
            outbox=self.outbox,
            worker=self.worker,
            models=self.updater,
            stats=self.stats,
            faults=self.faults,
        )
        self.inbox = Inbox(
            rules_for(config, topics),
            store=self.store,
            outbox=self.outbox,
            replies=self.replies,
            worker=self.worker,
            updater=self.updater,
            ack=self.link.ack,
            shedding=self.supervisor.shedding,
            model=lambda: self.updater.serving.ref,
            device_id=config.device_id,
            stats=self.stats,
            faults=self.faults,
            pushed={topics.membership: self.apply_membership, topics.renew_answer: self.renewal.answer},
        )
        # HTTP jobs left queued or interrupted by the previous process have no client any more.
        try:
            cancel_local_orphans(
                self.store, model=self.updater.serving.ref, device_id=config.device_id, stats=self.stats
            )
        except sqlite3.Error as exc:  # they would run for nobody: late, harmless
            self.faults.failed("canceling HTTP jobs left from before the restart", exc)
        # The second job source: the OpenAI- and Ollama-compatible HTTP API, when [http] listen is set.
        self.http: HTTPServer | None = None
        if config.http.listen is not None:
            self.http = HTTPServer(
                config.http,
                inbox=self.inbox,
                model=lambda: self.updater.serving.ref,
                stats=self.stats,
                max_body_bytes=config.jobs.max_payload_bytes,
                max_tokens_limit=config.jobs.max_tokens_limit,
                overloaded_retry_s=max(1, round(config.telemetry.interval_s)),
            )
            self.replies.attach(self.http.sink)
        self._stopping = threading.Event()

    # -- lifecycle ---------------------------------------------------------------------------

    def serve(self) -> None:
        """Run until shut down: connect, take jobs, answer them; then finish cleanly."""
        config = self.config
        ref = self.updater.serving.ref
        log.info(
            "edge-agent %s starting: device %s, group %s, model %s@%s, broker(s) %s",
            __version__,
            config.device_id,
            config.group or "(none)",
            ref.name,
            ref.version or "unversioned",
            ", ".join(f"{host}:{port}" for host, port in config.mqtt.endpoints),
        )
        if self.store_moved is not None:
            log.critical("the job queue starts EMPTY: the corrupt database was moved to %s", self.store_moved)
        self.worker.start()
        self.link.start()
        self.updater.start()
        if self.http is not None:
            self.http.start()
            host, port = self.http.address
            log.info(
                "HTTP API on http://%s:%d (OpenAI /v1, Ollama /api)%s",
                f"[{host}]" if ":" in host else host,
                port,
                "" if self.config.http.api_keys else ", no key asked",
            )
        while not self._stopping.is_set():
            if self.faults.corrupt is not None:
                self.shutdown()  # the damaged file is moved aside by the next start (systemd restarts us)
            try:
                event = self.link.events.get(timeout=0.5)
            except queue.Empty:
                event = None
            self.inbox.handle(event)
            try:
                self.supervisor.tick()
                self.renewal.tick()
            except Exception:  # telemetry, systemd or renewal trouble must not stop the intake
                log.exception("supervision tick failed")
        self._finish()
        if self.faults.corrupt is not None:
            raise StorageError(
                f"job database {self.store.path} became corrupt ({self.faults.corrupt}): start again to move "
                "it aside (systemd does so by itself)"
            )

    def _finish(self) -> None:
        self.supervisor.notifier.stopping("finishing the running job, then disconnecting")
        self.updater.stop()
        if self.http is not None:
            self.http.stop_accepting()
        self.worker.join(timeout=self.config.jobs.shutdown_grace_s + 5)
        self._flush_prefix_cache()
        if self.http is not None:
            self.http.close()  # requests still waiting (their jobs stay queued) get a 503
        self._drain_acks(timeout=3.0)
        self.link.stop(final=(self.topics.status, offline_status(self.config)))
        self.store.close()
        self.lock.release()

    def _flush_prefix_cache(self) -> None:
        """Let the prompts' blocks still queued for the disk reach it, so the next start finds them warm."""
        cache = self.updater.serving.engine.prefix_cache
        if cache is not None and not cache.flush(timeout=PREFIX_FLUSH_S):
            log.warning(
                "prefix cache: blocks still queued for the disk after %.0f s were dropped; "
                "the next start computes those prefixes again",
                PREFIX_FLUSH_S,
            )

    def apply_membership(self, payload: bytes) -> None:
        """The fleet's membership message (intake thread): switch group without a restart."""
        pushed, problem = membership.parse(payload, self.config.device_id)
        if problem is not None:
            log.warning("ignoring the membership message: %s", problem)
            return
        group = pushed.group if pushed is not None else self.configured_group
        labels = dict(pushed.labels) if pushed is not None else {}
        membership.save(self.config.state_dir, pushed)
        if group == self.config.group and labels == self.labels:
            return
        log.warning(
            "membership from the fleet: %s (was %s); applied without a restart",
            membership.describe(group, labels),
            membership.describe(self.config.group, self.labels),
        )
        self.labels = labels
        if group != self.config.group:
            config = self.config = self.config.model_copy(update={"group": group})
            self.topics = Topics(config.mqtt.topic_prefix, config.device_id, group)
            subscriptions, limits = membership.subscriptions_for(config, self.topics)
            self.link.set_subscriptions(subscriptions, limits)
            self.inbox.rules = rules_for(config, self.topics)
            self.supervisor.config, self.supervisor.topics = config, self.topics
            self.updater.offer("group", b"")  # the old group's desired model no longer applies
        self.supervisor.labels = labels
        if self.link.connected.is_set():
            self.supervisor.publish_status()

    def shutdown(self, grace_s: float | None = None) -> None:
        """Stop taking jobs; let the running one finish within ``grace_s`` (default: from config)."""
        self.worker.stop(self.config.jobs.shutdown_grace_s if grace_s is None else grace_s)
        self._stopping.set()

    def install_signal_handlers(self) -> None:
        """SIGTERM and SIGINT start a clean shutdown."""

        def handler(signum: int, _frame: FrameType | None) -> None:
            log.info("signal %s: shutting down", signum)
            self.shutdown()

        signal.signal(signal.SIGTERM, handler)
        signal.signal(signal.SIGINT, handler)

    # -- wiring --------------------------------------------------------------------------------

    def _drain_acks(self, timeout: float) -> None:
        end = time.monotonic() + timeout
        while time.monotonic() < end and self.outbox.backlog:
            try:
                event = self.link.events.get(timeout=0.1)
            except queue.Empty:
                continue
            if isinstance(event, Published):
                self.outbox.acked(event.mid)

    def _on_connect(self) -> None:
        """Paho's thread, on every connect: presence and model state, retained."""
        self.supervisor.publish_status()
        self._publish_model_state(self.updater.state())

    def _publish_model_state(self, state: ModelState) -> None:
        """Retained model state; the status carries the model too, so it follows a switch."""
        self.link.publish(self.topics.model_state, state.model_dump_json().encode(), retain=True)
        if self.supervisor.ready:
            self.supervisor.publish_status()
