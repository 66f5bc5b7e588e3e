"""Selectors over devices' labels and groups: ``region=north,hw=pi5``, ``group=shop-3,hw!=pi4``.

Terms are joined by commas and all must hold: ``KEY=VALUE``, ``KEY!=VALUE``, ``KEY`` (the
label is set), ``!KEY`` (it is not).  ``group`` is the device's group (the one its agent
reports, or the inventory's), not a label; so are the facts boxes report: ``model``,
``version`` and ``agent_version`` (operators' labels cannot shadow them).  ``normalize`` spells a selector one way (terms
sorted), which is what a selector rollout's id carries.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

from ..errors import FleetError

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$")
_VALUE = re.compile(r"^[A-Za-z0-9_.:-]{0,63}$")
Op = Literal["=", "!=", "exists", "absent"]
#: Keys a selector reads from what the box reports, not from labels.
FACTS = ("model", "version", "agent_version")
RESERVED = ("group", *FACTS)


@dataclass(frozen=True, order=True)
class Term:
    """One condition."""

    key: str
    op: Op
    value: str = ""

    def __str__(self) -> str:
        if self.op == "exists":
            return self.key
        if self.op == "absent":
            return f"!{self.key}"
        return f"{self.key}{self.op}{self.value}"

    def holds(
        self, labels: dict[str, str], group: str | None, facts: dict[str, str | None] | None = None
    ) -> bool:
        """Whether a device with ``labels`` in ``group`` (and reported ``facts``) satisfies this term."""
        if self.key == "group":
            value = group
        elif self.key in FACTS:
            value = (facts or {}).get(self.key)
        else:
            value = labels.get(self.key)
        if self.op == "exists":
            return value is not None
        if self.op == "absent":
            return value is None
        if self.op == "=":
            return value == self.value
        return value != self.value


def parse(text: str) -> tuple[Term, ...]:
    """The terms of a selector; a ``FleetError`` naming the bad term otherwise."""
    terms = []
    for part in (p.strip() for p in text.split(",")):
        if not part:
            continue
        if "!=" in part:
            key, value = part.split("!=", 1)
            term = Term(key.strip(), "!=", value.strip())
        elif "=" in part:
            key, value = part.split("=", 1)
            term = Term(key.strip(), "=", value.strip())
        elif part.startswith("!"):
            term = Term(part[1:].strip(), "absent")
        else:
            term = Term(part, "exists")
        if not _NAME.match(term.key) or not _VALUE.match(term.value):
            raise FleetError(
                f"selector term {part!r}: expected KEY=VALUE, KEY!=VALUE, KEY or !KEY "
                "(keys and values: letters, digits, _ . - and : in values)"
            )
        terms.append(term)
    if not terms:
        raise FleetError(f"selector {text!r} is empty: give terms like region=north,hw=pi5")
    return tuple(sorted(set(terms)))


def normalize(text: str) -> str:
    """One spelling of a selector (terms sorted, duplicates dropped)."""
    return ",".join(str(t) for t in parse(text))


def matches(
    terms: tuple[Term, ...],
    labels: dict[str, str],
    group: str | None,
    facts: dict[str, str | None] | None = None,
) -> bool:
    """Whether every term holds for a device."""
    return all(t.holds(labels, group, facts) for t in terms)
