"""``edge-fleet simulate``: many simulated devices on one broker — TEST TOOLING, not a device.

Each simulated device is a real MQTT 5 client that speaks the agent's real
protocol with the agent's own models (``Status`` with a Last Will, ``Telemetry``,
``ModelState``; desired-state manifests parsed and checked by
``Manifest.parse``/``Manifest.check``).  What a real box does with a model —
download, load, smoke test, inference — is replaced by a configurable delay and
failure rate.  It exists to test rollouts and fleet views at a scale no lab
has boxes for; nothing here runs on a box.

All clients share one thread: the link's ``SelectorLoop`` (a ``selectors`` loop
in place of a network thread per client), and a heap of timers drives updates and telemetry.  A
thousand devices cost a thousand sockets, not a thousand threads.
"""

from __future__ import annotations

import argparse
import contextlib
import heapq
import itertools
import json
import logging
import random
import resource
import signal
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

from agent.link.mqtt import Client, Message
from agent.link.mqtt.selector import SelectorLoop
from edge_contract import signing
from edge_contract.errors import LinkError, UpdateError
from edge_contract.manifest import Manifest
from edge_contract.protocol import (
    ErrorInfo,
    Health,
    ModelRef,
    ModelState,
    Result,
    Status,
    Topics,
    UpdateErrorCode,
    UpdatePhase,
    UpdateStatus,
)
from edge_contract.telemetry import CPU, JobsTelemetry, Memory, ModelInfo, Telemetry, Temperature

from .broker import BrokerOptions, FleetError, add_broker_args, options_from

log = logging.getLogger(__name__)


class Simulator:
    """``count`` simulated devices named ``{name_prefix}-0000``… in ``group``."""

    def __init__(
        self,
        options: BrokerOptions,
        count: int,
        *,
        group: str | None = None,
        name_prefix: str = "sim",
        update_delay_s: float = 2.0,
        failure_rate: float = 0.0,
        job_delay_s: float = 0.1,
        telemetry_interval_s: float = 10.0,
        trusted: list[signing.PublicKey] | None = None,
        model: ModelRef | None = None,
        seed: int | None = None,
        failing: set[str] | None = None,
    ) -> None:
        self.options = options
        self.group = group
        self.update_delay_s = update_delay_s
        self.failure_rate = failure_rate
        self.failing = failing or set()  # devices whose updates always fail (deterministic tests)
        self.job_delay_s = job_delay_s
        self.telemetry_interval_s = telemetry_interval_s
        self.trusted = trusted
        self.seed = seed
        self.loop = SelectorLoop()
        # One TLS context for every device (the plain-TCP warning is given once, by the command).
        self.tls = None if options.plaintext else options.tls_context()
        self._timers: list[tuple[float, int, Callable[[], None]]] = []
        self._tick = itertools.count()
        self._stop = threading.Event()
        self.connected = 0
        start_model = model or ModelRef(name="sim", version="1.0.0")
        self.devices = [SimulatedDevice(self, f"{name_prefix}-{i:04d}", start_model) for i in range(count)]

    # -- the loop -------------------------------------------------------------------------

    def later(self, delay_s: float, action: Callable[[], None]) -> None:
        """Run ``action`` on the loop thread after ``delay_s``."""
        heapq.heappush(self._timers, (time.monotonic() + delay_s, next(self._tick), action))

    def stop(self) -> None:
        """End ``run`` (thread-safe)."""
        self._stop.set()

    def run(self, duration_s: float | None = None, ready: threading.Event | None = None) -> None:
        """Connect every device and serve until ``stop`` (or ``duration_s``)."""
        _raise_file_limit(len(self.devices) + 64)
        for device in self.devices:
            device.connect()
        end = None if duration_s is None else time.monotonic() + duration_s
        next_misc = 0.0
        while not self._stop.is_set() and (end is None or time.monotonic() < end):
            if ready is not None and not ready.is_set() and self.connected == len(self.devices):
                ready.set()
            wait = 0.05
            if self._timers:
                wait = max(0.0, min(wait, self._timers[0][0] - time.monotonic()))
            self.loop.poll(wait)
            now = time.monotonic()
            while self._timers and self._timers[0][0] <= now:
                _t, _n, action = heapq.heappop(self._timers)
                action()
            if now >= next_misc:  # keepalive pings and retries, once a second
                next_misc = now + 1.0
                self.loop.tick()
        for device in self.devices:
            device.disconnect()


class SimulatedDevice:
    """One simulated box (see the module docstring)."""

    def __init__(self, sim: Simulator, device_id: str, model: ModelRef) -> None:
        self.sim = sim
        self.device_id = device_id
        prefix = sim.options.prefix
        own = Topics(prefix, device_id, sim.group)
        self.topics = {
            "status": own.status,
            "telemetry": own.telemetry,
            "state": own.model_state,
            "desired": own.model_desired,
            "jobs": own.jobs,
            "group_desired": own.group_model_desired or "",
        }
        self.active = model
        # Each device draws from its own generator: with a seed, which devices fail does not
        # depend on the order messages happen to arrive in.
        self.random = random.Random(f"{sim.seed}/{device_id}") if sim.seed is not None else random.Random()
        self.noise = random.Random()  # telemetry values and timing jitter: never affects outcomes
        self.previous: ModelRef | None = None
        self.update: UpdateStatus | None = None
        self.desired: dict[str, bytes] = {}
        self.working_on: str | None = None
        self.refused: set[str] = set()
        offline = Status(online=False, device_id=device_id, group=sim.group)
        self.client = Client(
            device_id,
            tls=sim.tls,
            username=sim.options.username,
            password=sim.options.password,
            will=(self.topics["status"], offline.model_dump_json()),
            on_connect=self._on_connect,
            on_drop=self._on_disconnect,
        )
        self.client.route("#", self._on_message)
        sim.loop.add(self.client)

    def connect(self) -> None:
        """Open the connection (the loop completes the handshake)."""
        host, port = self.sim.options.address
        self.sim.loop.connect(self.client, host, port)

    def disconnect(self) -> None:
        """Leave cleanly: the retained status says offline."""
        offline = Status(online=False, device_id=self.device_id, group=self.sim.group)
        self.client.publish(self.topics["status"], offline.model_dump_json(), qos=0, retain=True)
        self.sim.loop.leave(self.client)

    def _on_connect(self, _session_present: bool) -> None:
        self.sim.connected += 1
        self.client.subscribe([self.topics["desired"], self.topics["jobs"]])
        if self.topics["group_desired"]:
            self.client.subscribe(self.topics["group_desired"])
        self._publish_status()
        self._publish_state()
        # Spread the fleet's telemetry over the interval, as boxes booted at random times would.
        self.sim.later(self.noise.uniform(0, self.sim.telemetry_interval_s), self._telemetry)

    def _on_disconnect(self, _reason: str) -> None:
        self.sim.connected -= 1
        if not self.sim._stop.is_set():
            self.sim.later(1.0 + self.noise.random(), self._reconnect)

    def _reconnect(self) -> None:
        try:
            self.sim.loop.reconnect(self.client)
        except LinkError:
            self.sim.later(2.0, self._reconnect)

    def _on_message(self, msg: Message) -> None:
        if msg.topic == self.topics["jobs"]:
            self._on_job(msg)
            return
        source = "device" if msg.topic == self.topics["desired"] else "group"
        if msg.payload:
            self.desired[source] = msg.payload
        else:
            self.desired.pop(source, None)
        self._converge()

    # -- model updates, simulated ------------------------------------------------------------

    def _converge(self) -> None:
        payload = self.desired.get("device") or self.desired.get("group")
        if payload is None or self.working_on is not None:
            return
        try:
            manifest = Manifest.parse(payload)
        except UpdateError as exc:
            self._report("?", "?", "failed", error=(exc.code, exc.message))
            return
        if (manifest.name, manifest.version) == (self.active.name, self.active.version):
            return
        if manifest.signature in self.refused:
            return
        try:
            if self.sim.trusted is not None:
                manifest.check(self.sim.trusted, active=self.active.version)
        except UpdateError as exc:
            self.refused.add(manifest.signature)
            self._report(manifest.name, manifest.version, "failed", error=(exc.code, exc.message))
            return
        self.working_on = manifest.signature
        delay = self.sim.update_delay_s * self.random.uniform(0.8, 1.2)
        self._report(manifest.name, manifest.version, "downloading", progress=0.0)
        self.sim.later(delay * 0.5, lambda: self._report(manifest.name, manifest.version, "verifying"))
        self.sim.later(delay * 0.7, lambda: self._report(manifest.name, manifest.version, "testing"))
        self.sim.later(delay, lambda: self._finish(manifest))

    def _finish(self, manifest: Manifest) -> None:
        self.working_on = None
        if self.device_id in self.sim.failing or self.random.random() < self.sim.failure_rate:
            self.refused.add(manifest.signature)
            self._report(
                manifest.name,
                manifest.version,
                "failed",
                error=("smoke_test_failed", "simulated failure"),
            )
        else:
            self.previous, self.active = self.active, ModelRef(name=manifest.name, version=manifest.version)
            self._report(manifest.name, manifest.version, "active")
            self._publish_status()
        self._converge()  # the desired state may have moved on meanwhile

    def _report(
        self,
        name: str,
        version: str,
        phase: UpdatePhase,
        *,
        progress: float | None = None,
        error: tuple[UpdateErrorCode, str] | None = None,
    ) -> None:
        self.update = UpdateStatus(
            name=name,
            version=version,
            phase=phase,
            progress=progress,
            error=ErrorInfo(code=error[0], message=error[1]) if error else None,
        )
        self._publish_state()

    def _publish_state(self) -> None:
        state = ModelState(
            device_id=self.device_id, active=self.active, previous=self.previous, update=self.update
        )
        self.client.publish(self.topics["state"], state.model_dump_json(), qos=1, retain=True)

    def _publish_status(self) -> None:
        status = Status(
            online=True,
            device_id=self.device_id,
            group=self.sim.group,
            agent_version="simulated",
            model=self.active,
            capabilities=["generate", "simulated"],
            health=Health(verdict="ok"),
        )
        self.client.publish(self.topics["status"], status.model_dump_json(), qos=1, retain=True)

    # -- jobs and telemetry, simulated -----------------------------------------------------------

    def _on_job(self, msg: Message) -> None:
        try:
            job_id = str(json.loads(msg.payload)["id"])[:128]
        except (ValueError, KeyError, TypeError):
            return
        reply = msg.response_topic or Topics(self.sim.options.prefix, self.device_id).result(job_id)
        correlation = msg.correlation

        def answer() -> None:
            # (device_id: with the agents' protocol that names the device that answered)
            fields: dict[str, Any] = {
                "id": job_id,
                "status": "succeeded",
                "text": "(simulated)",
                "model": self.active,
            }
            if "device_id" in Result.model_fields:
                fields["device_id"] = self.device_id
            result = Result.model_validate(fields)
            self.client.publish(reply, result.model_dump_json(exclude_none=True), correlation=correlation)

        self.sim.later(self.sim.job_delay_s, answer)

    def _telemetry(self) -> None:
        rnd = self.noise
        message = Telemetry(
            device_id=self.device_id,
            ts=time.time(),
            interval_s=self.sim.telemetry_interval_s,
            cpu=CPU(percent=round(rnd.uniform(5, 60), 1), cores=4),
            memory=Memory(total_mb=8064, available_mb=rnd.randint(2500, 6000), swap_used_mb=0),
            temperature=Temperature(soc_c=round(rnd.uniform(45, 72), 1)),
            model=ModelInfo(name=self.active.name, version=self.active.version),
            jobs=JobsTelemetry(queue_depth=rnd.randint(0, 3), decode_tok_s=round(rnd.uniform(6, 12), 1)),
            health=Health(verdict="ok"),
        )
        self.client.publish(self.topics["telemetry"], message.model_dump_json(exclude_none=True), qos=0)
        self.sim.later(self.sim.telemetry_interval_s, self._telemetry)


def _raise_file_limit(needed: int) -> None:
    """Each simulated device holds a socket: lift the soft descriptor limit (up to the hard one)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < needed:
        target = needed if hard == resource.RLIM_INFINITY else min(needed, hard)
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))


# -- command line ------------------------------------------------------------------------------------


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``simulate``."""
    sim = sub.add_parser(
        "simulate", help="TEST TOOLING: run N simulated devices (real MQTT clients, fake models) on a broker"
    )
    sim.add_argument("--devices", type=int, required=True, help="how many")
    sim.add_argument("--group", help="the group of every simulated device")
    sim.add_argument("--name-prefix", default="sim", help="device ids are PREFIX-0000, PREFIX-0001, …")
    sim.add_argument("--update-delay", type=float, default=5.0, help="seconds a simulated update takes")
    sim.add_argument("--failure-rate", type=float, default=0.0, help="share of updates that fail (0-1)")
    sim.add_argument("--telemetry-interval", type=float, default=10.0, help="seconds between telemetry")
    sim.add_argument("--trust", metavar="PUBLIC_KEY_FILE", help="verify manifests against this fleet.pub")
    sim.add_argument("--duration", type=float, help="stop after this many seconds (default: until Ctrl-C)")
    sim.add_argument("--seed", type=int)
    sim.add_argument(
        "--model",
        default="sim@1.0.0",
        metavar="NAME@VERSION",
        help="what every device runs at start (default sim@1.0.0)",
    )
    add_broker_args(sim)
    sim.set_defaults(func=simulate_command)


def simulate_command(args: argparse.Namespace) -> int:
    """``edge-fleet simulate --devices N [--group G]``."""
    trusted = None
    if args.trust:
        with open(args.trust, encoding="utf-8") as f:
            trusted = [signing.PublicKey.from_line(f.read())]
    name, at, version = args.model.partition("@")
    if not (name and at and version):
        raise FleetError(f"--model {args.model!r}: expected NAME@VERSION")
    options = options_from(args)
    if options.plaintext:
        print("edge-fleet: warning: plain TCP (--plaintext) for every simulated device", file=sys.stderr)
    sim = Simulator(
        options,
        args.devices,
        group=args.group,
        name_prefix=args.name_prefix,
        update_delay_s=args.update_delay,
        failure_rate=args.failure_rate,
        telemetry_interval_s=args.telemetry_interval,
        trusted=trusted,
        seed=args.seed,
        model=ModelRef(name=name, version=version),
    )
    signal.signal(signal.SIGTERM, lambda *_a: sim.stop())
    ready = threading.Event()
    threading.Thread(
        target=lambda: (ready.wait(), print(f"simulating {args.devices} devices (test tooling)", flush=True)),
        daemon=True,
    ).start()
    with contextlib.suppress(KeyboardInterrupt):
        sim.run(args.duration, ready=ready)
    return 0
