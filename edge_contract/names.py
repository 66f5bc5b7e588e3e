"""Names that become topic levels, and broker endpoints: the rules both sides of the wire apply."""

from __future__ import annotations

import re

# Matched with fullmatch: ``re.match(...$)`` would accept a trailing newline ("box\n").
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")


def topic_safe(value: str) -> str:
    """Names that become MQTT topic levels: no wildcards, separators or '$' prefixes."""
    if not _NAME.fullmatch(value):
        raise ValueError("must be 1-64 of A-Z a-z 0-9 _ . - and start with a letter or digit")
    return value


#: Topic levels under the prefix that belong to the fleet, not to a device: no device may be named so.
RESERVED_NAMES = frozenset({"groups", "replies", "operator"})
_ENDPOINT = re.compile(r"(?:\[(?P<v6>[0-9A-Fa-f:.]+)\]|(?P<host>[A-Za-z0-9_.-]+))(?::(?P<port>\d{1,5}))?")
#: The IANA ports of MQTT over TLS and plain MQTT: an endpoint without a port gets the one that fits.
TLS_PORT, PLAIN_PORT = 8883, 1883


def parse_endpoint(text: str, default_port: int, *, any_port: bool = False) -> tuple[str, int]:
    """``HOST``, ``HOST:PORT`` or ``[IPV6]:PORT`` as a (host, port) pair (``any_port``: 0 allowed)."""
    found = _ENDPOINT.fullmatch(text.strip())
    port = int(found.group("port")) if found and found.group("port") else default_port
    if found is None or not (0 if any_port else 1) <= port <= 65535:
        raise ValueError(f"{text!r}: expected HOST, HOST:PORT or [IPV6]:PORT with a port in 1-65535")
    return found.group("v6") or found.group("host"), port
