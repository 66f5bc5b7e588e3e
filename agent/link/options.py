"""``[mqtt]`` and ``[mqtt.tls]``: how the link reaches the broker (composed by ``agent.config``)."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator, model_validator

from edge_contract.names import PLAIN_PORT, TLS_PORT, parse_endpoint, topic_safe


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
    username: str | None = Field(None, description="A login over TLS, instead of or besides a certificate.")
    password: SecretStr | None = Field(
        None, description="The login's password; better from the environment (EDGE_AGENT_MQTT__PASSWORD)."
    )
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

    _prefix_ok = field_validator("topic_prefix")(topic_safe)

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
