"""``edge-agent doctor``: can this box run the agent with its configuration?

Each check gives ``ok``, ``warn`` (works, but slower or riskier than it
should) or ``fail`` (the agent will not run well, or at all), with a one-line
detail.  The checks: Python and onnxruntime versions, the CPU features the
int4/int8 kernels use, memory against the model's needs, free disk, the
temperature (and Raspberry Pi throttling), the TLS setup (plain TCP is a
warning; a client or CA certificate expiring within 30 days is a warning, an
expired one a failure), reachability of every broker (with the TLS handshake
when TLS is configured), a real MQTT login with the box's identity whose
subscriptions (own and group topics) the broker must grant, that the model loads and computes a
token, and the job database (intact, writable, or moved aside as corrupt by the agent).

Run it with the agent stopped: a running agent holds the model in memory, which
the memory check would then count twice.  With the agent running, the login check
does not log in (that would take the agent's session): it reports the agent's own
link (``agent.link.presence``).
"""

from __future__ import annotations

import platform
import socket
import ssl
import stat
import sys
import time
from datetime import datetime
from pathlib import Path
from typing import Literal

import psutil
from pydantic import BaseModel, ConfigDict

from agent.config import AgentConfig, HealthThresholds, MQTTConfig, load_config
from agent.engine.kv_choice import choose
from agent.engine.kv_variants import variant_shapes
from agent.engine.memory_plan import MIN_CONTEXT, Budgets, estimate, weights_on_disk
from agent.engine.options import EngineOptions
from agent.health.probe import SystemProbe
from agent.link.login import try_login
from agent.link.presence import read_link, running_agent
from agent.link.tls import CERT_WARN_DAYS, certificate_expiry, client_context, days_left
from agent.updates.store import ModelStore
from edge_contract.errors import AgentError, MemoryFitError
from edge_contract.protocol import Membership, Topics
from edge_contract.telemetry import SystemReading

CheckStatus = Literal["ok", "warn", "fail"]

MIN_PYTHON = (3, 11)
MIN_ONNXRUNTIME = (1, 26)
_MiB = 1024 * 1024
_WARM_C = 10.0  # this close below max_temp_c is a warning


class Check(BaseModel):
    """The outcome of one check."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str
    status: CheckStatus
    detail: str


def run_checks(
    config: AgentConfig | str | Path,
    *,
    thresholds: HealthThresholds | None = None,
    broker_timeout_s: float = 3.0,
) -> list[Check]:
    """Every check, in order, for a configuration (or the path of its TOML file).

    ``thresholds`` are the health limits the agent will run with (defaults if
    None).  The host checks run even when the configuration is invalid.
    """
    checks = [check_python(), check_onnxruntime(), check_cpu()]
    if not isinstance(config, AgentConfig):
        try:
            config = load_config(config)
        except AgentError as exc:
            return [*checks, Check(name="config", status="fail", detail=exc.message)]
        checks.append(Check(name="config", status="ok", detail="valid"))
    limits = thresholds or HealthThresholds()
    reading = SystemProbe(config.state_dir).measure()
    memory, options = _memory(config, reading, limits)
    checks += [memory, check_disk(config.state_dir, limits), check_job_store(config.state_dir)]
    checks += check_temperature(reading, limits)
    checks += check_tls(config.mqtt)
    broker = check_broker(config.mqtt, timeout_s=broker_timeout_s)
    checks.append(broker)
    if broker.status != "fail":
        checks.append(check_login(config, timeout_s=max(broker_timeout_s, 5.0)))
    checks.append(check_updates(config))
    if options is not None:
        checks.append(check_model(config, options))
    else:  # loading it could get the box's other processes killed
        checks.append(Check(name="model", status="fail", detail="not loaded: not enough memory"))
    return checks


def worst(checks: list[Check]) -> CheckStatus:
    """The most serious status among ``checks`` (``ok`` when empty)."""
    statuses = {check.status for check in checks}
    return "fail" if "fail" in statuses else "warn" if "warn" in statuses else "ok"


def format_report(checks: list[Check]) -> str:
    """The checks as aligned lines, then a summary line."""
    width = max((len(check.name) for check in checks), default=0)
    lines = [f"{check.status:<4}  {check.name:<{width}}  {check.detail}" for check in checks]
    failed = sum(check.status == "fail" for check in checks)
    warned = sum(check.status == "warn" for check in checks)
    if failed or warned:
        lines.append(f"{_count(failed, 'failure')}, {_count(warned, 'warning')}")
    else:
        lines.append(f"all {_count(len(checks), 'check')} passed")
    return "\n".join(lines)


# -- the checks ------------------------------------------------------------------------------


def check_python() -> Check:
    """The interpreter is one the agent supports."""
    version = platform.python_version()
    detail = f"{version} ({platform.python_implementation()}, {sys.executable})"
    if sys.version_info[:2] < MIN_PYTHON:
        return Check(name="python", status="fail", detail=f"{detail}: needs {_dotted(MIN_PYTHON)} or newer")
    return Check(name="python", status="ok", detail=detail)


def check_onnxruntime() -> Check:
    """onnxruntime imports, is recent enough, and has its CPU execution provider."""
    try:
        import onnxruntime as ort
    except ImportError as exc:
        return Check(name="onnxruntime", status="fail", detail=f"cannot import: {exc}")
    version = str(ort.__version__)
    if _version_tuple(version) < MIN_ONNXRUNTIME:
        return Check(
            name="onnxruntime", status="fail", detail=f"{version}: needs {_dotted(MIN_ONNXRUNTIME)} or newer"
        )
    if "CPUExecutionProvider" not in ort.get_available_providers():
        return Check(name="onnxruntime", status="fail", detail=f"{version}: no CPUExecutionProvider")
    return Check(name="onnxruntime", status="ok", detail=version)


def check_cpu(cpuinfo: str | None = None, machine: str | None = None) -> Check:
    """The SIMD features onnxruntime's int4/int8 matrix kernels use (from /proc/cpuinfo by default)."""
    machine = machine or platform.machine()
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace")
        except OSError as exc:
            return Check(name="cpu", status="warn", detail=f"{machine}: /proc/cpuinfo unreadable: {exc}")
    flags: set[str] = set()
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            flags = set(value.split())
            break

    def listing(names: dict[str, str]) -> str:
        return ", ".join(f"{label} {'yes' if flag in flags else 'no'}" for flag, label in names.items())

    if machine in ("aarch64", "arm64"):
        detail = f"{machine}: " + listing({"asimd": "NEON", "asimddp": "dotprod", "i8mm": "i8mm"})
        if "asimd" not in flags:
            return Check(name="cpu", status="fail", detail=detail + " (onnxruntime's Arm kernels need NEON)")
        if "asimddp" not in flags:
            return Check(name="cpu", status="warn", detail=detail + " (int8 matmuls take a slower path)")
        return Check(name="cpu", status="ok", detail=detail)
    if machine in ("x86_64", "AMD64"):
        detail = f"{machine}: " + listing(
            {"avx2": "avx2", "avx512f": "avx512", "avx512_vnni": "avx512_vnni", "avx_vnni": "avx_vnni"}
        )
        if "avx2" not in flags:
            return Check(name="cpu", status="warn", detail=detail + " (no AVX2: slow kernels)")
        return Check(name="cpu", status="ok", detail=detail)
    return Check(name="cpu", status="warn", detail=f"{machine}: not an architecture the agent is tested on")


def check_memory(config: AgentConfig, reading: SystemReading, thresholds: HealthThresholds) -> Check:
    """The model's expected peak (``memory_plan``) beside the box's available memory."""
    return _memory(config, reading, thresholds)[0]


def _memory(
    config: AgentConfig, reading: SystemReading, thresholds: HealthThresholds
) -> tuple[Check, EngineOptions | None]:
    """The memory check, and the options the daemon would load the model with (None: known not to fit)."""
    try:
        shapes = variant_shapes(served_model(config))
    except AgentError as exc:
        return Check(
            name="memory", status="fail", detail=f"cannot size the model: {exc.message}"
        ), config.engine
    shape = next(iter(shapes.values()))
    available = reading.memory.available_mb
    if available is None:
        smallest = Budgets(
            context_tokens=min(MIN_CONTEXT, shape.context_length),
            max_batch=1,
            prefix_cache_mb=0,
            prefill_chunk_tokens=config.engine.prefill_chunk_tokens,
        )
        peak = estimate(shape, smallest, weights_mapped=weights_on_disk(config.engine))
        return Check(
            name="memory", status="warn", detail=f"model expects {peak.describe()}; available memory unknown"
        ), config.engine
    margin = thresholds.min_mem_available_mb
    try:
        choice = choose(
            shapes,
            config.engine,
            (available - margin) * _MiB,
            machine=platform.machine(),
            name=served_model(config).name,
        )
    except MemoryFitError as exc:
        return Check(name="memory", status="fail", detail=f"{exc.message} ({available} MiB available)"), None
    except AgentError as exc:  # a kv_cache the folder lacks: the load check says so too
        return Check(name="memory", status="fail", detail=exc.message), config.engine
    peak, sized = choice.peak, choice.options
    detail = (
        f"model expects peak {peak.describe()} at a {sized.context_tokens}-token context, "
        f"prefix cache {sized.prefix_cache_mb} MiB, {choice.describe()}; {available} MiB available"
    )
    if peak.total > (available - margin) * _MiB:
        return Check(
            name="memory",
            status="warn",
            detail=f"{detail}: the mapped model's pages do not fit beside it (they are read again from disk)",
        ), sized
    if choice.warning is not None:
        return Check(name="memory", status="warn", detail=f"{detail}: {choice.warning}"), sized
    if (sized.context_tokens or 0) < choice.shape.context_length:
        cut = f"the context is cut from the model's {choice.shape.context_length} to fit"
        return Check(name="memory", status="warn", detail=f"{detail}: {cut}"), sized
    return Check(name="memory", status="ok", detail=detail), sized


def check_disk(state_dir: Path, thresholds: HealthThresholds) -> Check:
    """Free space where the job queue and model store live (or will, before the first start)."""
    where = state_dir
    while not where.exists() and where != where.parent:
        where = where.parent
    try:
        free = psutil.disk_usage(str(where)).free // _MiB
    except OSError as exc:
        return Check(name="disk", status="warn", detail=f"{where}: {exc}")
    detail = f"{free} MiB free at {where}"
    if free < thresholds.min_disk_free_mb:
        return Check(name="disk", status="fail", detail=f"{detail} (below {thresholds.min_disk_free_mb} MiB)")
    return Check(name="disk", status="ok", detail=detail)


def check_job_store(state_dir: Path) -> Check:
    """The job queue: state_dir writable, the database intact, no corrupt one moved aside unseen."""
    import sqlite3
    import tempfile

    from agent.jobs.store import CorruptStoreError, corrupt_copies, inspect_file

    name, path = "job store", state_dir / "jobs.sqlite3"
    if not state_dir.exists():
        return Check(
            name=name, status="ok", detail=f"{state_dir} does not exist yet (created at first start)"
        )
    try:
        with tempfile.TemporaryFile(dir=state_dir, prefix=".write-test-"):
            pass
    except OSError as exc:
        return Check(
            name=name,
            status="fail",
            detail=f"state_dir {state_dir} is not writable ({exc.strerror}): make it writable by the agent's user",
        )
    if path.is_dir():
        return Check(name=name, status="fail", detail=f"{path} is a directory: move it away")
    moved = corrupt_copies(path)
    if path.exists():
        try:
            waiting, kept = inspect_file(path)
        except CorruptStoreError as exc:
            return Check(
                name=name,
                status="fail",
                detail=f"{path} is corrupt ({exc.message}): the agent will move it aside and start with an empty queue",
            )
        except AgentError as exc:  # a newer agent's database: the fix is in the message
            return Check(name=name, status="fail", detail=f"{path}: {exc.message}")
        except sqlite3.Error as exc:
            return Check(name=name, status="fail", detail=f"{path}: {exc}")
        detail = f"{waiting} jobs waiting, {kept} results kept"
    else:
        detail = "no database yet (created at first start)"
    if moved:
        return Check(
            name=name,
            status="warn",
            detail=(
                f"{detail}; the job database was CORRUPT and moved to {moved[-1]} (the queue restarted empty): "
                "inspect it, then delete it to clear this warning"
            ),
        )
    return Check(name=name, status="ok", detail=detail)


def check_temperature(reading: SystemReading, thresholds: HealthThresholds) -> list[Check]:
    """The SoC temperature against ``max_temp_c``; on a Raspberry Pi also the throttling flags."""
    temp = reading.temperature
    celsius = temp.soc_c if temp.soc_c is not None else temp.max_c
    limit = thresholds.max_temp_c
    if celsius is None:
        checks = [Check(name="temperature", status="warn", detail="no temperature sensor is readable")]
    else:
        which = "SoC" if temp.soc_c is not None else "hottest sensor"
        detail = f"{which} {celsius:.1f} °C (limit {limit:.0f} °C)"
        status: CheckStatus = "fail" if celsius >= limit else "warn" if celsius >= limit - _WARM_C else "ok"
        checks = [Check(name="temperature", status=status, detail=detail)]
    throttling = reading.throttling
    if throttling is not None:
        now = [name for name, on in throttling.now.model_dump().items() if on]
        past = [name for name, on in throttling.since_boot.model_dump().items() if on]
        raw = f" ({throttling.raw})" if throttling.raw else ""
        if now:
            checks.append(Check(name="throttling", status="fail", detail=f"now: {', '.join(now)}{raw}"))
        elif past:
            checks.append(
                Check(name="throttling", status="warn", detail=f"since boot: {', '.join(past)}{raw}")
            )
        else:
            checks.append(Check(name="throttling", status="ok", detail=f"none{raw}"))
    return checks


def check_tls(mqtt: MQTTConfig, now: datetime | None = None) -> list[Check]:
    """How the link is protected, and how long the client and CA certificates stay valid."""
    if mqtt.tls is None:
        return [
            Check(
                name="tls",
                status="warn",
                detail="plain TCP (allow_plaintext = true): the link is neither encrypted nor authenticated",
            )
        ]
    how = "client certificate" if mqtt.tls.cert else "no client certificate (username/password or none)"
    checks = [Check(name="tls", status="ok", detail=f"TLS 1.2+, host name verified, {how}")]
    for name, path in (("certificate", mqtt.tls.cert), ("ca certificate", mqtt.tls.ca)):
        if path is not None:
            checks.append(check_certificate(name, path, now))
    if mqtt.tls.key is not None:
        try:
            mode = mqtt.tls.key.stat().st_mode
        except OSError as exc:
            checks.append(Check(name="key", status="fail", detail=f"{mqtt.tls.key}: {exc.strerror or exc}"))
        else:
            if mode & stat.S_IROTH:
                detail = (
                    f"{mqtt.tls.key} is readable by every user: chmod 0600 (or 0640 for the agent's group)"
                )
                checks.append(Check(name="key", status="warn", detail=detail))
    return checks


def check_certificate(name: str, path: Path, now: datetime | None = None) -> Check:
    """``fail`` once the certificate at ``path`` expired, ``warn`` within ``CERT_WARN_DAYS`` of it."""
    try:
        expiry = certificate_expiry(path)
    except AgentError as exc:
        return Check(name=name, status="fail", detail=exc.message)
    left = days_left(expiry, now)
    detail = f"{path} expires {expiry:%Y-%m-%d %H:%M} UTC"
    if left < 0:
        return Check(name=name, status="fail", detail=f"{detail}: expired {-left:.0f} days ago")
    if left < CERT_WARN_DAYS:
        return Check(name=name, status="warn", detail=f"{detail}: {left:.0f} days left, provision a new one")
    return Check(name=name, status="ok", detail=f"{detail} ({left:.0f} days left)")


def check_broker(mqtt: MQTTConfig, *, timeout_s: float = 3.0) -> Check:
    """Every configured broker accepts a TCP connection within ``timeout_s`` (and, with TLS, a
    verified handshake; the MQTT login is not tried).

    ``ok`` when all answer, ``warn`` when only some do (failover still has somewhere to go),
    ``fail`` when none does.  The timeout bounds the connection, not the name lookup, which
    takes as long as the resolver does.
    """
    context = None
    if mqtt.tls is not None:
        try:
            context = client_context(mqtt.tls.ca, mqtt.tls.cert, mqtt.tls.key)
        except AgentError as exc:
            return Check(name="broker", status="fail", detail=exc.message)
    details, reached = [], 0
    for host, port in mqtt.endpoints:
        where = f"{host}:{port}"
        started = time.perf_counter()
        try:
            with socket.create_connection((host, port), timeout=timeout_s) as sock:
                if context is not None:
                    with context.wrap_socket(sock, server_hostname=host):
                        pass
        except ssl.SSLError as exc:  # before OSError: it is one
            details.append(f"{where} TLS handshake failed: {exc.reason or exc}")
            continue
        except OSError as exc:
            reason = exc.strerror or str(exc) or type(exc).__name__
            details.append(f"{where} unreachable: {reason}")
            continue
        reached += 1
        elapsed_ms = (time.perf_counter() - started) * 1e3
        how = "TLS verified" if context is not None else "over TCP"
        details.append(f"{where} reachable {how} ({elapsed_ms:.0f} ms)")
    status: CheckStatus = "ok" if reached == len(details) else "warn" if reached else "fail"
    return Check(name="broker", status=status, detail="; ".join(details))


def agent_subscriptions(config: AgentConfig) -> list[str]:
    """The topic filters the daemon subscribes to with this configuration (and the group the fleet
    pushed, kept in ``STATE_DIR/membership.json``: it wins over agent.toml's)."""
    topics = Topics(config.mqtt.topic_prefix, config.device_id, pushed_group(config))
    filters = [topics.jobs, topics.cancel, topics.model_desired]
    if topics.group_model_desired:
        filters.append(topics.group_model_desired)
    if topics.shared_group_jobs and config.mqtt.protocol == "5":
        filters.append(topics.shared_group_jobs)
    return filters


def pushed_group(config: AgentConfig) -> str | None:
    """The group the agent serves: the fleet's membership when it pushed one, else agent.toml's."""
    try:
        pushed = Membership.model_validate_json((config.state_dir / "membership.json").read_bytes())
    except (OSError, ValueError):
        return config.group
    return pushed.group if pushed.device_id == config.device_id else config.group


def check_login(config: AgentConfig, *, timeout_s: float = 5.0) -> Check:
    """An MQTT CONNECT as the box on each broker, and a SUBSCRIBE to every topic the agent needs.

    ``fail`` names the refusal (CONNACK or SUBACK reason, in words, with the fix) on any broker.
    With the agent running, no login at all: it would take the agent's session (the client id is
    the certificate's name) — the running agent's own link state is reported instead.
    """
    pid = running_agent(config.state_dir)
    if pid is not None:
        return running_login(config, pid)
    wanted = agent_subscriptions(config)
    details, failed = [], False
    for host, port in config.mqtt.endpoints:
        report = try_login(config.mqtt, config.device_id, (host, port), wanted, timeout_s=timeout_s)
        where = f"{host}:{port}"
        if report.problem:
            failed = True
            details.append(f"{where} as {config.device_id}: {report.problem}")
        elif report.refused:
            failed = True
            refused = "; ".join(f"{topic} refused: {why}" for topic, why in report.refused.items())
            details.append(f"{where} as {config.device_id}: {refused}")
        else:
            details.append(
                f"{where} login as {config.device_id} accepted, {len(report.granted)} subscriptions granted"
            )
    return Check(name="login", status="fail" if failed else "ok", detail="; ".join(details))


def running_login(config: AgentConfig, pid: int) -> Check:
    """The login check from a running agent's ``link.json`` (``agent.link.presence``)."""
    state = read_link(config.state_dir)
    head = f"the agent (pid {pid}) is running, so doctor did not log in (that would take its session)"
    if state is None:
        return Check(name="login", status="warn", detail=f"{head}; it has not reported its link yet")
    if state.refused:
        refused = "; ".join(f"{topic} refused: {why}" for topic, why in state.refused.items())
        return Check(name="login", status="fail", detail=f"{head}; {refused}")
    if not state.connected:
        return Check(
            name="login",
            status="fail",
            detail=f"{head}; it is not connected: {state.problem or 'no reason known'}",
        )
    detail = f"{head}; connected to {state.endpoint} as {config.device_id}, {len(state.granted)} subscriptions granted"
    if state.problem:
        return Check(name="login", status="warn", detail=f"{detail}; {state.problem}")
    return Check(name="login", status="ok", detail=detail)


def served_model(config: AgentConfig) -> Path:
    """The folder the agent serves at start: the store's active version, else ``[model] path``."""
    root = config.state_dir / "models"
    if (root / "store.json").is_file():  # only then: the doctor must not create the agent's folders
        store = ModelStore(root)
        active = store.pointer().active
        if active is not None:
            return store.path(active)
    return config.model.path


def check_updates(config: AgentConfig) -> Check:
    """Over-the-air updates: trusted keys, the installed versions and how the last update went."""
    keys = len(config.update.trusted_keys)
    if not keys:
        return Check(name="updates", status="warn", detail="off: [update] trusted_keys is empty")
    detail = f"{keys} trusted key{'s' if keys > 1 else ''}"
    root = config.state_dir / "models"
    if not (root / "store.json").is_file():
        return Check(name="updates", status="ok", detail=f"{detail}; no update installed yet")
    store = ModelStore(root)
    pointer = store.pointer()
    detail += f"; active {pointer.active or 'the configured model'}, previous {pointer.previous or 'none'}"
    last = store.read_record().update
    if last is not None and last.phase in ("failed", "rolled_back"):
        error = f"{last.error.code}: {last.error.message}" if last.error else "no error recorded"
        return Check(
            name="updates",
            status="warn",
            detail=f"{detail}; last update {last.name}@{last.version} {last.phase}: {error}",
        )
    if last is not None:
        detail += f"; last update {last.name}@{last.version} {last.phase}"
    return Check(name="updates", status="ok", detail=detail)


def check_model(config: AgentConfig, options: EngineOptions | None = None) -> Check:
    """The model the agent would serve loads and computes one token.

    ``options``: the engine options the daemon would take (its KV cache chosen and budgets sized,
    ``_memory``); default: the configured ones.
    """
    from agent.engine.engine import Engine
    from agent.engine.sampling import SamplingParams

    started = time.perf_counter()
    try:
        engine = Engine(served_model(config), options or config.engine)
        loaded = time.perf_counter()
        engine.generate(engine.prompt_ids("Hello"), SamplingParams(max_tokens=1))
    except AgentError as exc:
        return Check(name="model", status="fail", detail=exc.message)
    except Exception as exc:  # anything else onnxruntime or numpy raise (e.g. MemoryError)
        return Check(name="model", status="fail", detail=f"{type(exc).__name__}: {exc}")
    first_ms = (time.perf_counter() - loaded) * 1e3
    return Check(
        name="model",
        status="ok",
        detail=(
            f"{engine.name} loaded in {loaded - started:.1f} s, first token in {first_ms:.0f} ms "
            f"({engine.threads} threads, context {engine.context_length}, {engine.kv_cache} KV)"
        ),
    )


def _version_tuple(version: str) -> tuple[int, ...]:
    parts = []
    for part in version.split(".")[:3]:
        digits = "".join(ch for ch in part if ch.isdigit())
        parts.append(int(digits or 0))
    return tuple(parts)


def _dotted(version: tuple[int, ...]) -> str:
    return ".".join(str(v) for v in version)


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}{'' if n == 1 else 's'}"
