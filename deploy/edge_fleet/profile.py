"""The operator's profile: broker, TLS and state-file settings typed once.

A small TOML file, ``$EDGE_FLEET_PROFILE`` or else
``$XDG_CONFIG_HOME/edge-fleet/profile.toml`` (``~/.config/edge-fleet/profile.toml``)::

    broker = "mq-1.lan:8883"
    tls_ca = "fleet-ca/ca.crt"          # relative paths: from the profile's folder
    tls_cert = "operator/operator.crt"
    tls_key = "operator/operator.key"

Each key can also come from an ``EDGE_FLEET_<KEY>`` variable (``EDGE_FLEET_BROKER``,
``EDGE_FLEET_TLS_CA``, …), which wins over the file; a command-line flag wins over both.
"""

from __future__ import annotations

import os
import tomllib
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, ValidationError

from .errors import FleetError

Protocol = Literal["5", "3.1.1"]
_PATH_KEYS = ("tls_ca", "tls_cert", "tls_key", "db")
_TRUE = ("1", "true", "yes", "on")


class Profile(BaseModel):
    """Defaults for every ``edge-fleet`` command (all optional)."""

    model_config = ConfigDict(extra="forbid", strict=True)

    broker: str | None = None
    topic_prefix: str | None = None
    tls_ca: Path | None = None
    tls_cert: Path | None = None
    tls_key: Path | None = None
    username: str | None = None
    plaintext: bool | None = None
    protocol: Protocol | None = None
    db: Path | None = None
    server: str | None = None  # http(s)://HOST:PORT of `edge-fleet server`: commands become its clients
    token: str | None = None  # the API token (better from EDGE_FLEET_TOKEN)


def profile_path() -> Path:
    """Where the profile is read from (it need not exist)."""
    if os.environ.get("EDGE_FLEET_PROFILE"):
        return Path(os.environ["EDGE_FLEET_PROFILE"])
    config = Path(os.environ.get("XDG_CONFIG_HOME") or Path.home() / ".config")
    return config / "edge-fleet" / "profile.toml"


def _from_file(path: Path) -> dict[str, object]:
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return {}
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise FleetError(
            f"cannot read the profile {path}: {exc} (fix it, or point EDGE_FLEET_PROFILE elsewhere)"
        ) from None
    for key in _PATH_KEYS:
        if isinstance(data.get(key), str):
            data[key] = (path.parent / Path(data[key]).expanduser()).resolve()
    return data


def _from_environment() -> dict[str, object]:
    found: dict[str, object] = {}
    for key in Profile.model_fields:
        value = os.environ.get(f"EDGE_FLEET_{key.upper()}")
        if not value:
            continue
        if key == "plaintext":
            found[key] = value.strip().lower() in _TRUE
        elif key in _PATH_KEYS:
            found[key] = Path(value).expanduser()
        else:
            found[key] = value
    return found


def load_profile() -> Profile:
    """The profile file with the ``EDGE_FLEET_*`` variables over it."""
    path = profile_path()
    data = {**_from_file(path), **_from_environment()}
    try:
        return Profile.model_validate(data)
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
        raise FleetError(f"profile {path} (or EDGE_FLEET_* variables): {problems}") from None
