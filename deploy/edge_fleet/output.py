"""Plain-text reports: aligned tables that never cut a value, and ages ("3 min ago")."""

from __future__ import annotations

from collections.abc import Sequence


def table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """Columns as wide as their widest value (nothing is cut; the last column is not padded)."""
    widths = [max([len(h), *(len(r[i]) for r in rows)]) for i, h in enumerate(headers)]
    lines = []
    for row in [list(headers), *rows]:
        cells = [cell.ljust(width) for cell, width in zip(row, widths, strict=True)]
        lines.append("  ".join(cells).rstrip())
    return "\n".join(lines)


def ago(now: float, then: float | None) -> str:
    """``"now"``, ``"42 s ago"``, ``"3 min ago"``, ``"5 h ago"``, ``"2 d ago"`` (or ``-``)."""
    if then is None:
        return "-"
    seconds = max(0.0, now - then)
    if seconds < 2:
        return "now"
    for unit, size in (("d", 86400), ("h", 3600), ("min", 60)):
        if seconds >= size:
            return f"{seconds // size:.0f} {unit} ago"
    return f"{seconds:.0f} s ago"


def model_label(name: str | None, version: str | None) -> str:
    """``NAME@VERSION`` as the agent logs it (``demo@unversioned``), or ``-`` without a model."""
    return f"{name}@{version or 'unversioned'}" if name else "-"
