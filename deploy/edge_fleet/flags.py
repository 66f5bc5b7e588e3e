"""Checks of command-line values that end up in a broker file, an ``agent.toml`` or a topic.

A newline in ``--out`` or ``--topic-prefix`` used to add lines to ``mosquitto.conf``
and ``operators.acl`` (``allow_anonymous true``); ``#`` or ``+`` in a prefix made
broker roles like ``#/box/…``.  Every such value is checked where the command starts,
and the error names the flag.
"""

from __future__ import annotations

import re

from .errors import FleetError

#: A topic level the agent accepts too (``agent.config``): no wildcard, no separator, no ``$``.
_LEVEL = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
#: What a host name or an IP address is made of (IPv6 too).
_HOST = re.compile(r"[A-Za-z0-9_.:-]{1,253}")


def topic_level(value: str, flag: str) -> str:
    """``value`` as one topic level (e.g. ``--topic-prefix``), or a ``FleetError`` naming ``flag``."""
    if not _LEVEL.fullmatch(value):
        raise FleetError(
            f"{flag} {value!r}: must be 1-64 of A-Z a-z 0-9 _ . - starting with a letter or digit "
            "(it becomes a topic level and part of the broker's rules: no '#', '+', '/', '$' or control "
            "characters)"
        )
    return value


def file_text(value: str, flag: str) -> str:
    """``value`` written into a configuration file: no control characters (a newline adds a line)."""
    if _CONTROL.search(value):
        raise FleetError(
            f"{flag} {value!r}: contains a control character (a newline or tab, say); it would be "
            "written into a configuration file as is — give it without one"
        )
    return value


def host_name(value: str, flag: str) -> str:
    """A host name or an IP address."""
    if not _HOST.fullmatch(value):
        raise FleetError(
            f"{flag} {value!r}: not a host name or an IP address (letters, digits, '.', '-', ':')"
        )
    return value
