"""Fleet views: ``edge-fleet status`` (one snapshot) and ``edge-fleet watch`` (live table).

Both read what boxes publish — retained status and model state, and, for
``watch``, telemetry as it arrives — into a ``FleetView``.  ``render`` is a
pure function from rows to text, so the table is tested without a terminal.
"""

from __future__ import annotations

import argparse
import json
import os
import select
import shutil
import sys
import termios
import time
import tty
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from .broker import BrokerOptions, add_broker_args, options_from
from .fleet_view import DeviceRow, FleetFeed, FleetView

#: Sort keys of ``watch`` (``s`` cycles through them).
SORT_KEYS = ("device", "health", "version", "phase", "temp", "mem", "queue", "tok_s")

_HEALTH_ORDER = {"degraded": 0, None: 1, "ok": 2}


def sort_rows(rows: list[DeviceRow], key: str, reverse: bool = False) -> list[DeviceRow]:
    """Rows ordered by a ``SORT_KEYS`` column (unknown values last), then by device."""

    def value(row: DeviceRow) -> tuple[Any, ...]:
        column: Any = {
            "device": row.device,
            "health": _HEALTH_ORDER.get(row.health, 1),
            "version": row.version or "",
            "phase": row.update_phase or "",
            "temp": row.temp_c,
            "mem": row.mem_available_mb,
            "queue": row.queue,
            "tok_s": row.tok_s,
        }[key]
        return (column is None, column if column is not None else 0)

    known = sorted(rows, key=lambda r: r.device)
    known.sort(key=value, reverse=reverse)
    if reverse:  # unknown values stay last either way
        known.sort(key=lambda r: value(r)[0])
    return known


def _fmt(value: Any, spec: str = "", none: str = "-") -> str:
    return none if value is None else format(value, spec)


def render(
    rows: list[DeviceRow], *, sort: str, reverse: bool, width: int, height: int, group: str | None
) -> str:
    """The whole screen: summary counts, a header, and as many rows as fit."""
    counts = FleetView.summary(rows)
    scope = f"group {group}" if group else "all devices"
    lines = [
        f"edge-fleet watch — {scope} — {time.strftime('%H:%M:%S')}",
        "  ".join(f"{name} {count}" for name, count in counts.items())
        + f"   sorted by {sort}{' ↓' if reverse else ''}   (s sort, r reverse, q quit)",
        "",
        f"{'DEVICE':<18} {'ONLINE':<6} {'HEALTH':<8} {'MODEL':<14} {'VERSION':<10} {'UPDATE':<22} "
        f"{'TEMP':>5} {'MEM MB':>7} {'QUEUE':>5} {'TOK/S':>6}",
    ]
    shown = sort_rows(rows, sort, reverse)[: max(0, height - len(lines) - 1)]
    for row in shown:
        update = "-"
        if row.update_phase:
            update = f"{row.update_version} {row.update_phase}"
            if row.update_phase == "downloading" and row.update_progress is not None:
                update += f" {row.update_progress:.0%}"
            if row.update_error:
                update += f" ({row.update_error})"
        online = "yes" if row.online else ("no" if row.online is False else "?")
        lines.append(
            f"{row.device[:18]:<18} {online:<6} {_fmt(row.health):<8} {_fmt(row.model)[:14]:<14} "
            f"{_fmt(row.version)[:10]:<10} {update[:22]:<22} {_fmt(row.temp_c, '.0f'):>5} "
            f"{_fmt(row.mem_available_mb):>7} {_fmt(row.queue):>5} {_fmt(row.tok_s, '.1f'):>6}"
        )
    if len(rows) > len(shown):
        lines.append(f"… {len(rows) - len(shown)} more (a taller terminal shows more)")
    return "\n".join(line[:width] for line in lines)


def _screen() -> tuple[int, int]:
    """Columns and lines to fill; output to a pipe or file is never cut."""
    if not sys.stdout.isatty():
        return 10_000, 10_000
    size = shutil.get_terminal_size()
    return size.columns, size.lines


@contextmanager
def _keys() -> Iterator[bool]:
    """Single-key input while the view runs (when stdin is a terminal)."""
    if not sys.stdin.isatty():
        yield False
        return
    fd = sys.stdin.fileno()
    saved = termios.tcgetattr(fd)
    try:
        tty.setcbreak(fd)
        yield True
    finally:
        termios.tcsetattr(fd, termios.TCSADRAIN, saved)


def watch(
    options: BrokerOptions, *, group: str | None, sort: str, refresh_s: float, duration_s: float | None
) -> None:
    """Run the live view until ``q``, Ctrl-C or ``duration_s``."""
    feed = FleetFeed(options, telemetry=True)
    reverse = False
    end = None if duration_s is None else time.monotonic() + duration_s
    next_frame = 0.0
    changed = True
    try:
        with _keys() as interactive:
            while end is None or time.monotonic() < end:
                changed |= feed.pump(0.05) > 0
                if interactive and select.select([sys.stdin], [], [], 0)[0]:
                    key = os.read(sys.stdin.fileno(), 1)
                    if key in (b"q", b"Q"):
                        return
                    if key == b"s":
                        sort = SORT_KEYS[(SORT_KEYS.index(sort) + 1) % len(SORT_KEYS)]
                    elif key == b"r":
                        reverse = not reverse
                    changed = True
                now = time.monotonic()
                if now >= next_frame and changed:
                    next_frame = now + refresh_s
                    changed = False
                    width, height = _screen()
                    screen = render(
                        feed.view.rows(group),
                        sort=sort,
                        reverse=reverse,
                        width=width,
                        height=height,
                        group=group,
                    )
                    sys.stdout.write("\x1b[H\x1b[2J" + screen + "\n")
                    sys.stdout.flush()
    except KeyboardInterrupt:
        pass
    finally:
        feed.close()


# -- command line -----------------------------------------------------------------------------------------


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``status`` and ``watch``."""
    status = sub.add_parser("status", help="per device: online, health, active model, update phase")
    status.add_argument("--group", help="only devices of this group")
    status.add_argument("--json", action="store_true", help="one JSON object per device, for scripts")
    status.add_argument("--wait", type=float, default=3.0, help="seconds at most to collect retained state")
    add_broker_args(status)
    status.set_defaults(func=status_command)

    live = sub.add_parser("watch", help="live table of the fleet: health, model, update, temperature, load")
    live.add_argument("--group", help="only devices of this group")
    live.add_argument("--sort", choices=SORT_KEYS, default="device", help="initial sort column")
    live.add_argument("--refresh", type=float, default=1.0, help="seconds between redraws (default 1)")
    live.add_argument("--duration", type=float, help="stop after this many seconds")
    add_broker_args(live)
    live.set_defaults(func=watch_command)


def status_command(args: argparse.Namespace) -> int:
    """``edge-fleet status [--group G] [--json]``."""
    feed = FleetFeed(options_from(args), telemetry=False)
    try:
        feed.settle(args.wait)
    finally:
        feed.close()
    rows = feed.view.rows(args.group)
    if args.json:
        for row in rows:
            print(json.dumps(row.as_json()))
        return 0
    if not rows:
        print("no devices found")
        return 0
    size = shutil.get_terminal_size((160, 10 + len(rows)))
    print(
        render(
            rows, sort="device", reverse=False, width=size.columns, height=len(rows) + 10, group=args.group
        )
    )
    return 0


def watch_command(args: argparse.Namespace) -> int:
    """``edge-fleet watch [--group G]``."""
    watch(
        options_from(args), group=args.group, sort=args.sort, refresh_s=args.refresh, duration_s=args.duration
    )
    return 0
