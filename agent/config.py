"""The agent's configuration: one TOML file, every key overridable from the environment.

``EDGE_AGENT_MQTT__HOST=broker.local`` overrides ``[mqtt] host``: the prefix is
``EDGE_AGENT_`` and ``__`` separates a section from its key.  Values from the
environment win over the file.  Every field has bounds and a description here,
and nowhere else; an invalid value fails at start with the key named.
"""

from __future__ import annotations

import grp
import os
import pwd
import re
import tomllib
from pathlib import Path
from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

from agent.errors import ConfigError, SignatureError
from agent.updates.signing import PublicKey
from edge_contract.params import MaxTokens

# Matched with fullmatch: ``re.match(...$)`` would accept a trailing newline ("box\n").
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")


def _topic_safe(value: str) -> str:
    """Names that become MQTT topic levels: no wildcards, separators or '$' prefixes."""
    if not _NAME.fullmatch(value):
        raise ValueError("must be 1-64 of A-Z a-z 0-9 _ . - and start with a letter or digit")
    return value


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class TLSConfig(_Section):
    """TLS towards the broker: TLS 1.2 or newer, the broker's certificate and host name always verified."""

    ca: Path | None = Field(
        None, description="CA bundle that signs the broker's certificate (the system's CAs when unset)."
    )
    cert: Path | None = Field(
        None, description="Client certificate (per-device identity; its CN is the device id)."
    )
    key: Path | None = Field(None, description="Private key of the client certificate (mode 0600).")

    @model_validator(mode="after")
    def _pair(self) -> TLSConfig:
        if (self.cert is None) != (self.key is None):
            raise ValueError("give both cert and key, or neither")
        return self


#: Topic levels under the prefix that belong to the fleet, not to a device: no device may be named so.
RESERVED_NAMES = frozenset({"groups", "replies", "operator", "enroll"})
_ENDPOINT = re.compile(r"(?:\[(?P<v6>[0-9A-Fa-f:.]+)\]|(?P<host>[A-Za-z0-9_.-]+))(?::(?P<port>\d{1,5}))?")
#: The IANA ports of MQTT over TLS and plain MQTT: an endpoint without a port gets the one that fits.
TLS_PORT, PLAIN_PORT = 8883, 1883


def parse_endpoint(text: str, default_port: int) -> tuple[str, int]:
    """``HOST``, ``HOST:PORT`` or ``[IPV6]:PORT`` as a (host, port) pair."""
    found = _ENDPOINT.fullmatch(text.strip())
    port = int(found.group("port")) if found and found.group("port") else default_port
    if found is None or not 1 <= port <= 65535:
        raise ValueError(f"{text!r}: expected HOST, HOST:PORT or [IPV6]:PORT with a port in 1-65535")
    return found.group("v6") or found.group("host"), port


class MQTTConfig(_Section):
    """How to reach the broker (or brokers, in the order they are tried)."""

    host: str = Field("127.0.0.1", min_length=1, description="Broker host name or address (single broker).")
    port: int | None = Field(
        None, ge=1, le=65535, description="Broker port; default 8883 with TLS, 1883 with allow_plaintext."
    )
    brokers: list[str] = Field(
        default_factory=list,
        max_length=16,
        description=(
            "Several brokers, tried in order: 'HOST:PORT' each. When the current one fails the agent "
            "moves to the next (with backoff). Replaces host/port; give one form or the other."
        ),
    )
    username: str | None = None
    password: SecretStr | None = None
    tls: TLSConfig | None = Field(None, description="TLS settings; required unless allow_plaintext is true.")
    allow_plaintext: bool = Field(
        False,
        description=(
            "Connect over plain TCP, unencrypted and unauthenticated by certificate. Only for a broker on "
            "the same machine or in a lab; the agent logs a warning at start. Excludes [mqtt.tls]."
        ),
    )
    keepalive: int = Field(
        30,
        ge=5,
        le=3600,
        description="Seconds between pings; the broker declares the agent gone after 1.5x this.",
    )
    protocol: Literal["5", "3.1.1"] = Field(
        "5", description="MQTT version. Under 3.1.1 response topics and shared subscriptions are unavailable."
    )
    topic_prefix: str = Field("edge", description="First level of every topic.")
    session_expiry_s: int = Field(
        7 * 24 * 3600,
        ge=0,
        le=2**32 - 1,
        description="How long the broker keeps the agent's session and queued jobs while it is offline.",
    )

    _prefix_ok = field_validator("topic_prefix")(_topic_safe)

    @field_validator("brokers")
    @classmethod
    def _endpoints_ok(cls, value: list[str]) -> list[str]:
        for text in value:
            parse_endpoint(text, TLS_PORT)
        return value

    @model_validator(mode="after")
    def _transport(self) -> MQTTConfig:
        if self.tls is None and not self.allow_plaintext:
            raise ValueError(
                "no [mqtt.tls] section: configure TLS (ca, cert, key), or set allow_plaintext = true "
                "to connect unencrypted (a broker on this machine or in a lab only)"
            )
        if self.tls is not None and self.allow_plaintext:
            raise ValueError("allow_plaintext = true and [mqtt.tls] exclude each other: keep one")
        if self.brokers and ({"host", "port"} & self.model_fields_set):
            raise ValueError("give either host/port or brokers, not both")
        return self

    @property
    def endpoints(self) -> list[tuple[str, int]]:
        """Every broker as (host, port), in the order they are tried."""
        default = PLAIN_PORT if self.allow_plaintext else TLS_PORT
        if not self.brokers:
            return [(self.host, self.port or default)]
        return [parse_endpoint(text, default) for text in self.brokers]


class ModelConfig(_Section):
    """The model served until an update installs one (and the last resort after a failed one)."""

    path: Path = Field(description="Model folder (genai_config.json, model.onnx, tokenizer.json).")
    name: str | None = Field(
        None,
        pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$",
        description=(
            "Its model name, as releases name it (default: the folder's name). A release of another "
            "name replaces it only when signed with --replace-model NAME."
        ),
    )
    version: str | None = Field(
        None,
        description="Its version, if known: updates of the same name must carry a higher one (semantic versions).",
    )


class JobsConfig(_Section):
    """Limits on what the agent accepts."""

    max_queue: int = Field(64, ge=1, le=100_000, description="Jobs waiting beyond this are rejected as busy.")
    max_payload_bytes: int = Field(
        64 * 1024, ge=256, le=16 * 1024 * 1024, description="Larger messages are rejected unread."
    )
    max_tokens_limit: MaxTokens = Field(2048, description="Upper bound on a job's max_tokens.")
    reply_topic_prefix: str | None = Field(
        None,
        min_length=2,
        max_length=256,
        pattern=r"^[^$+#\x00][^+#\x00]*/$",
        description=(
            "Response topics must start with this (a topic subtree ending in '/'); others are refused "
            "with invalid_request. Default: '{topic_prefix}/replies/', the subtree the shipped ACL opens."
        ),
    )

    shutdown_grace_s: float = Field(
        20.0,
        ge=0,
        le=600,
        description=(
            "On SIGTERM the running job may finish within this time; past it, it is put back in "
            "the queue and runs again after the restart. Keep it below systemd's TimeoutStopSec."
        ),
    )


class UpdateConfig(_Section):
    """``[update]``: over-the-air model updates (see ``updater``)."""

    trusted_keys: list[str] = Field(
        default_factory=list,
        max_length=16,
        description=(
            "Public keys whose signed releases this box installs, one OpenSSH line each "
            "(edge-fleet keygen writes fleet.pub in this form). Empty: every update is refused."
        ),
    )
    keep_versions: int = Field(
        3, ge=2, le=20, description="Installed versions kept on disk (the active and previous included)."
    )
    bandwidth_kbps: int | None = Field(
        None, ge=8, le=10_000_000, description="Cap on download speed, in kilobytes per second."
    )
    ca: Path | None = Field(
        None, description="CA bundle that signs the HTTPS release servers (default: the system's CAs)."
    )
    memory_reserve_mb: int = Field(
        256,
        ge=0,
        le=1 << 20,
        description=(
            "Memory to keep free while a new model is loaded beside the old one; when that does not "
            "fit, the old model is unloaded first (a short pause in service)."
        ),
    )
    probation_jobs: int = Field(
        5, ge=1, le=1000, description="The first jobs on a new model that may trigger an automatic rollback."
    )
    max_failed_jobs: int = Field(
        2, ge=1, le=1000, description="This many failed jobs among the probation jobs roll the model back."
    )
    probation_s: float = Field(
        3600.0, ge=1.0, le=30 * 24 * 3600, description="Probation ends after this long even with few jobs."
    )

    @field_validator("trusted_keys")
    @classmethod
    def _keys_parse(cls, keys: list[str]) -> list[str]:
        for index, key in enumerate(keys):
            try:
                PublicKey.from_line(key)
            except SignatureError as exc:
                raise ValueError(f"entry {index}: {exc.message}") from exc
        return keys

    def public_keys(self) -> list[PublicKey]:
        """The trusted keys, parsed."""
        return [PublicKey.from_line(k) for k in self.trusted_keys]


class EngineOptions(_Section):
    """How the onnxruntime session is set up."""

    threads: int = Field(0, ge=0, le=256, description="Intra-op threads; 0 means one per physical core.")
    spin_us: int = Field(
        1000,
        ge=0,
        le=100_000,
        description=(
            "How long idle worker threads busy-wait for the next operator, in microseconds "
            "(0: never). A short spin keeps decode fast (the next token's work arrives within "
            "microseconds) while a bounded one never burns cores between requests."
        ),
    )
    prefix_cache_mb: int = Field(
        256,
        ge=0,
        le=1_048_576,
        description=(
            "Memory for the keys and values of recent prompt prefixes, MiB (0: no prefix cache). "
            "256 MiB holds about 4,000 tokens of a Llama-3.2-1B or 340 of Phi-3-mini (float32 KV): "
            "affordable beside a 2.3 GB int4 model on a 4 GB box."
        ),
    )
    prefix_cache_disk_mb: int = Field(
        1024,
        ge=0,
        le=1_048_576,
        description="Disk for prefixes kept across restarts (under state_dir/prefix_cache), MiB.",
    )
    prefix_block_tokens: int = Field(
        16,
        ge=2,
        le=4096,
        description="Granularity of the prefix cache: prefixes are reused in blocks this long.",
    )
    prefill_chunk_tokens: int = Field(
        512,
        ge=2,
        le=65_536,
        description=(
            "Longest prefill pass: a long prompt is prefilled in chunks this long, which bounds "
            "its memory and lets cancellation act between chunks."
        ),
    )
    speculate: bool = Field(
        False,
        description=(
            "Prompt-lookup speculative decoding (see agent.engine.speculate): fewer passes when the "
            "output copies spans of the prompt. Every pass then has two rows or more, so the output "
            "never depends on what was drafted; it equals plain decoding's except where two candidates "
            "tie within the float rounding that separates one-row from multi-row passes."
        ),
    )
    speculate_max_k: int = Field(8, ge=1, le=32, description="Most draft tokens verified in one pass.")
    max_batch: int = Field(
        1, ge=1, le=64, description="Most sequences decoded together in one pass (see agent.engine.batch)."
    )


class TelemetryConfig(_Section):
    """``[telemetry]``: how often the agent reports."""

    interval_s: float = Field(
        10.0, ge=1.0, le=3600.0, description="Seconds between telemetry messages (and health checks)."
    )
    sysfs_root: Path = Field(
        Path("/sys"),
        description=(
            "Where sysfs is mounted. Only containers with a bind-mounted host sysfs, and tests that "
            "simulate a thermal sensor on machines without one, change it."
        ),
    )


class HealthThresholds(_Section):
    """``[health]``: when the box counts as degraded, and what the agent does about it."""

    max_temp_c: float = Field(
        80.0,
        ge=30.0,
        le=125.0,
        description="At or above this SoC temperature the box is hot (a Raspberry Pi throttles at 80-85).",
    )
    temp_hysteresis_c: float = Field(
        5.0, ge=0.0, le=30.0, description="A hot box counts as cool again only this far below max_temp_c."
    )
    min_mem_available_mb: int = Field(
        200, ge=0, le=1 << 20, description="Below this much available memory (MiB) memory is low."
    )
    mem_hysteresis_mb: int = Field(
        50, ge=0, le=1 << 20, description="Low memory ends only this far above min_mem_available_mb."
    )
    min_disk_free_mb: int = Field(
        500, ge=0, le=1 << 30, description="Below this much free space (MiB) in state_dir disk is low."
    )
    max_backlog: int = Field(
        1000, ge=1, le=10_000_000, description="More unacknowledged publications than this is a backlog."
    )
    shed_load: Literal["reject", "queue"] = Field(
        "reject",
        description=(
            "While hot or short of memory: 'reject' answers new jobs at once with code 'overloaded' "
            "(a caller can go elsewhere); 'queue' stores them and starts none until the box recovers."
        ),
    )


class AgentConfig(BaseSettings):
    """Everything the daemon needs, from the TOML file and ``EDGE_AGENT_*`` variables."""

    model_config = SettingsConfigDict(
        env_prefix="EDGE_AGENT_", env_nested_delimiter="__", extra="forbid", frozen=True
    )

    device_id: str = Field(description="This box's name: a topic level, unique in the fleet.")
    group: str | None = Field(None, description="Pool of boxes that share group jobs.")
    state_dir: Path = Field(description="Where the job queue and model store live.")
    mqtt: MQTTConfig = Field(default_factory=MQTTConfig)
    model: ModelConfig
    jobs: JobsConfig = Field(default_factory=JobsConfig)
    engine: EngineOptions = Field(default_factory=EngineOptions)
    telemetry: TelemetryConfig = Field(default_factory=TelemetryConfig)
    health: HealthThresholds = Field(default_factory=HealthThresholds)
    update: UpdateConfig = Field(default_factory=UpdateConfig)

    _names_ok = field_validator("device_id", "group")(lambda v: v if v is None else _topic_safe(v))

    @field_validator("device_id")
    @classmethod
    def _not_reserved(cls, value: str) -> str:
        # The ACL gives "operator" the whole tree, and groups/replies are fleet-wide levels.
        if value in RESERVED_NAMES:
            raise ValueError(f"{value!r} is reserved (one of {', '.join(sorted(RESERVED_NAMES))})")
        return value

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # The environment wins over the file (passed as init values).
        return (env_settings, init_settings)


def load_config(path: str | Path) -> AgentConfig:
    """Read and validate the TOML file at ``path`` (plus the environment)."""
    path = Path(path)
    try:
        data: dict[str, Any] = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise ConfigError(f"{path}: file not found") from exc
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: unreadable: {exc}") from exc
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from exc
    try:
        return AgentConfig(**data)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc']) or '(top level)'}: {err['msg']}" for err in exc.errors()
        )
        raise ConfigError(f"{path}: {problems}") from exc


def _unreadable(path: Path, *, folder: bool) -> str | None:
    """Why ``path`` cannot be read as a file (or listed as a folder), or None when it can."""
    try:
        if folder:
            if not path.is_dir():
                return "does not exist" if not path.exists() else "is not a folder"
            next(path.iterdir(), None)
        else:
            with path.open("rb") as handle:
                handle.read(1)
    except FileNotFoundError:
        return "does not exist"
    except IsADirectoryError:
        return "is a folder, not a file"
    except PermissionError:
        return _NOT_READABLE
    except OSError as exc:
        return f"cannot be read: {exc.strerror or exc}"
    return None


def check_files(config: AgentConfig) -> list[str]:
    """Every file and folder ``config`` names that this box lacks or cannot read: one line each.

    Each line names the key, the path and the fix.  ``edge-agent config check``
    prints them (and fails); the agent itself would only fail later, at connect
    or model load.  ``state_dir`` must be a folder or creatable; the others must
    exist and be readable by the user running the check (run it as the
    service's user: root reads every file).
    """
    named: list[tuple[str, Path | None, bool, str]] = [
        ("model.path", config.model.path, True, "copy a model folder there or point [model] path at one"),
        ("telemetry.sysfs_root", config.telemetry.sysfs_root, True, "fix [telemetry] sysfs_root"),
        (
            "update.ca",
            config.update.ca,
            False,
            "copy the release servers' CA bundle there or fix [update] ca",
        ),
    ]
    tls = config.mqtt.tls
    if tls is not None:
        fix = "copy it there (edge-fleet provision writes ca.crt, NAME.crt, NAME.key) or fix [mqtt.tls] {}"
        named += [
            (f"mqtt.tls.{key}", getattr(tls, key), False, fix.format(key)) for key in ("ca", "cert", "key")
        ]
    problems = []
    for key, path, folder, fix in named:
        why = None if path is None else _unreadable(path, folder=folder)
        if why is not None and path is not None and why == _NOT_READABLE:
            # It is there: copying it again is not the fix, its owner, group or mode is.
            fix = _permission_fix(path, folder=folder)
        if why is not None:
            problems.append(f"{key}: {path} {why}: {fix}")
    if config.model.path.is_dir() and _unreadable(config.model.path / "genai_config.json", folder=False):
        problems.append(
            f"model.path: {config.model.path} has no readable genai_config.json: point [model] path at a "
            "model folder (genai_config.json, model.onnx, tokenizer.json)"
        )
    existing = config.state_dir
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    user = _user_name()
    if not existing.is_dir():
        problems.append(f"state_dir: {existing} is not a folder: fix state_dir")
    elif not os.access(existing, os.W_OK | os.X_OK, effective_ids=True) and existing == config.state_dir:
        problems.append(
            f"state_dir: {existing} is not writable by {user}: make it the service's "
            f"(chown {user} {existing}), or fix state_dir"
        )
    elif not os.access(existing, os.W_OK | os.X_OK, effective_ids=True):
        # Never "chown /var/lib": create the one folder the agent needs, owned by its user.
        problems.append(
            f"state_dir: {config.state_dir} does not exist and {user} cannot create it in {existing}: "
            f"create it for the service (install -d -o {user} -m 0750 {config.state_dir}; systemd's "
            "StateDirectory= does so), or fix state_dir"
        )
    return problems


_NOT_READABLE = "is not readable by this user"


def _user_name() -> str:
    try:
        return pwd.getpwuid(os.geteuid()).pw_name
    except KeyError:
        return str(os.geteuid())


def _permission_fix(path: Path, *, folder: bool) -> str:
    """What makes ``path`` readable by this user: its group and mode (a key stays 0640, not world-readable)."""
    try:
        info = path.stat()
        owner = pwd.getpwuid(info.st_uid).pw_name
        group = grp.getgrgid(info.st_gid).gr_name
        where = f"it is {owner}:{group} mode {info.st_mode & 0o777:04o}"
    except (OSError, KeyError):
        where = "its owner or mode keeps this user out"
    user = _user_name()
    try:
        own_group = grp.getgrgid(os.getegid()).gr_name
    except KeyError:
        own_group = str(os.getegid())
    mode = "0750" if folder else "0640"
    return (
        f"{where} and this check runs as {user}: give it the service's group and a group-readable mode "
        f"(chgrp {own_group} {path} && chmod {mode} {path}); every folder above it must be searchable by {user}"
    )
