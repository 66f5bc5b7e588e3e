"""The agent's configuration: one TOML file, every key overridable from the environment.

``EDGE_AGENT_MQTT__HOST=broker.local`` overrides ``[mqtt] host``: the prefix is
``EDGE_AGENT_`` and ``__`` separates a section from its key.  Values from the
environment win over the file.  Every field has bounds and a description here,
and nowhere else; an invalid value fails at start with the key named.
"""

from __future__ import annotations

import grp
import ipaddress
import os
import pwd
import tomllib
from pathlib import Path
from typing import Any

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

from agent.engine.options import EngineOptions as EngineOptions
from agent.health.options import HealthThresholds as HealthThresholds
from agent.health.options import TelemetryConfig as TelemetryConfig
from agent.link.options import MQTTConfig as MQTTConfig
from agent.link.options import TLSConfig as TLSConfig
from agent.updates.options import UpdateConfig as UpdateConfig
from edge_contract.errors import ConfigError
from edge_contract.names import RESERVED_NAMES, parse_endpoint, topic_safe
from edge_contract.params import MaxTokens


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


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


_LOOPBACK_NAMES = frozenset({"localhost", "ip6-localhost"})


def is_loopback(host: str) -> bool:
    """Whether ``host`` (a name or an address) names this machine's loopback interface only."""
    if host.lower() in _LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class HTTPConfig(_Section):
    """``[http]``: the OpenAI- and Ollama-compatible HTTP API on the box (see docs/http-api.md)."""

    listen: str | None = Field(
        None,
        description=(
            "HOST:PORT (or [IPV6]:PORT) to serve the HTTP API on, e.g. '127.0.0.1:8080' for apps on this "
            "box (port 0: any free port, logged at start). Unset: no HTTP server. Any address other than "
            "loopback needs api_keys. Its jobs go through the same queue and limits as MQTT jobs."
        ),
    )
    api_keys: list[SecretStr] = Field(
        default_factory=list,
        max_length=64,
        description=(
            "Bearer tokens a request must carry (Authorization: Bearer KEY), 16-256 printable characters "
            "each; compared in constant time and never logged. Required unless listen is a loopback "
            "address; empty on loopback: no key asked. Better from the environment: "
            "EDGE_AGENT_HTTP__API_KEYS='[\"...\"]'."
        ),
    )
    max_connections: int = Field(
        32,
        ge=1,
        le=1024,
        description=(
            "Open connections served at once (each holds a thread); more are answered 503 at once. "
            "Jobs beyond [jobs] max_queue are refused as for MQTT (429)."
        ),
    )

    @field_validator("listen")
    @classmethod
    def _endpoint(cls, value: str | None) -> str | None:
        if value is not None:
            try:
                parse_endpoint(value, -1, any_port=True)  # no default: a port must be given (0: any free one)
            except ValueError:
                raise ValueError(f"{value!r}: give HOST:PORT or [IPV6]:PORT, e.g. 127.0.0.1:8080") from None
        return value

    @field_validator("api_keys")
    @classmethod
    def _keys(cls, keys: list[SecretStr]) -> list[SecretStr]:
        for index, key in enumerate(keys):
            text = key.get_secret_value()
            if not 16 <= len(text) <= 256 or not text.isprintable() or " " in text:
                raise ValueError(f"entry {index}: a key is 16-256 printable characters without spaces")
        return keys

    @model_validator(mode="after")
    def _keys_off_loopback(self) -> HTTPConfig:
        if self.listen is not None and not self.api_keys and not is_loopback(self.endpoint[0]):
            raise ValueError(
                f"listen = {self.listen!r} is reachable from other machines: set api_keys "
                '(api_keys = ["<a long random key>"], e.g. from `openssl rand -hex 24`), '
                "or listen on 127.0.0.1"
            )
        return self

    @property
    def endpoint(self) -> tuple[str, int]:
        """(host, port) to bind (port 0: any free one); only meaningful when ``listen`` is set."""
        assert self.listen is not None
        return parse_endpoint(self.listen, -1, any_port=True)


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
    http: HTTPConfig = Field(default_factory=HTTPConfig)

    _names_ok = field_validator("device_id", "group")(lambda v: v if v is None else topic_safe(v))

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
