"""Fleet views: ``edge-fleet status`` (a one-shot table) and ``edge-fleet watch`` (a live one).

Both read what boxes publish — retained status and model state, and, for
``watch``, telemetry as it arrives — into a ``FleetView``; ``status`` adds the
inventory's devices the broker says nothing of (never seen, or offline with a
status that lost its group).  ``render`` is a pure function from rows to text,
so the table is tested without a terminal.
"""

from __future__ import annotations

import argparse
import dataclasses
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

from .broker import BrokerOptions, FleetError, add_broker_args, options_from
from .fleet_view import DeviceRow, FleetFeed, FleetView
from .inventory import Inventory, InventoryRow
from .output import ago, model_label, table
from .state import add_db_arg, open_db

#: Sort keys of ``watch`` (``s`` cycles through them).
SORT_KEYS = ("device", "group", "health", "version", "phase", "temp", "mem", "queue", "tok_s")

#: What separates the frames of ``watch`` written to a pipe or a file (no escape codes there).
FRAME_BREAK = "\f"
#: The first frame waits this long at most for the retained statuses.
_FIRST_FRAME_MAX_S = 3.0

_HEALTH_ORDER = {"degraded": 0, None: 1, "ok": 2}


def sort_rows(rows: list[DeviceRow], key: str, reverse: bool = False) -> list[DeviceRow]:
    """Rows ordered by a ``SORT_KEYS`` column (unknown values last), then by device."""

    def value(row: DeviceRow) -> tuple[Any, ...]:
        column: Any = {
            "device": row.device,
            "group": row.group,
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


def is_problem(row: DeviceRow) -> bool:
    """Offline (or never seen), degraded, or with a failed or rolled-back update."""
    return row.online is not True or row.health == "degraded" or row.update_phase in ("failed", "rolled_back")


def _fmt(value: Any, spec: str = "", none: str = "-") -> str:
    return none if value is None else format(value, spec)


def _online(row: DeviceRow, now: float) -> str:
    if row.revoked:
        return "revoked"
    if row.online:
        return "yes"
    if row.online is None:
        return "never" if row.last_seen == 0 else "?"
    return "no" + (f" {ago(now, row.offline_since).removesuffix(' ago')}" if row.offline_since else "")


def _update(row: DeviceRow, *, message: bool = False) -> str:
    if not row.update_phase:
        return "-"
    text = f"{row.update_version} {row.update_phase}"
    if row.update_phase == "downloading" and row.update_progress is not None:
        text += f" {row.update_progress:.0%}"
    if row.update_error:
        text += f" ({row.update_error}{': ' + row.update_message if message and row.update_message else ''})"
    return text


def render(
    rows: list[DeviceRow],
    *,
    sort: str,
    reverse: bool,
    width: int,
    height: int,
    group: str | None,
    problems: bool = False,
    now: float | None = None,
) -> str:
    """The live screen: summary counts, a header, and as many rows as fit (the update column last,
    so its codes are never cut short of the terminal's edge)."""
    now = time.time() if now is None else now
    counts = FleetView.summary(rows)
    scope = f"group {group}" if group else "all devices"
    shown_rows = [r for r in rows if is_problem(r)] if problems else rows
    filters = "problems only, " if problems else ""
    lines = [
        f"edge-fleet watch — {scope} — {time.strftime('%H:%M:%S', time.localtime(now))}",
        "  ".join(f"{name} {count}" for name, count in counts.items())
        + f"   {filters}sorted by {sort}{' ↓' if reverse else ''}   (s sort, r reverse, p problems, q quit)",
        "",
        f"{'DEVICE':<18} {'GROUP':<10} {'ONLINE':<9} {'HEALTH':<8} {'MODEL':<12} {'VERSION':<9} "
        f"{'TEMP':>5} {'MEM MB':>7} {'QUEUE':>5} {'TOK/S':>6}  UPDATE",
    ]
    shown = sort_rows(shown_rows, sort, reverse)[: max(0, height - len(lines) - 1)]
    for row in shown:
        lines.append(
            f"{row.device:<18} {_fmt(row.group):<10} {_online(row, now):<9} {_fmt(row.health):<8} "
            f"{_fmt(row.model):<12} {_fmt(row.version):<9} {_fmt(row.temp_c, '.0f'):>5} "
            f"{_fmt(row.mem_available_mb):>7} {_fmt(row.queue):>5} {_fmt(row.tok_s, '.1f'):>6}  {_update(row)}"
        )
    if len(shown_rows) > len(shown):
        lines.append(f"… {len(shown_rows) - len(shown)} more (a taller terminal shows more)")
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
    options: BrokerOptions,
    *,
    group: str | None,
    sort: str,
    refresh_s: float,
    duration_s: float | None,
    problems: bool = False,
    known: dict[str, InventoryRow] | None = None,
) -> None:
    """Run the live view until ``q``, Ctrl-C or ``duration_s``; it redraws every ``refresh_s``
    (so its clock ticks) and at once after a key."""
    feed = FleetFeed(options, telemetry=True)
    # The first frame shows the retained statuses, not a fleet that looks offline for a second.
    feed.settle(_FIRST_FRAME_MAX_S)
    terminal = sys.stdout.isatty()
    reverse = False
    end = None if duration_s is None else time.monotonic() + duration_s
    next_frame = 0.0
    try:
        with _keys() as interactive:
            while end is None or time.monotonic() < end:
                feed.pump(0.05)
                if interactive and select.select([sys.stdin], [], [], 0)[0]:
                    key = os.read(sys.stdin.fileno(), 1)
                    if key in (b"q", b"Q"):
                        return
                    if key == b"s":
                        sort = SORT_KEYS[(SORT_KEYS.index(sort) + 1) % len(SORT_KEYS)]
                    elif key == b"r":
                        reverse = not reverse
                    elif key == b"p":
                        problems = not problems
                    next_frame = 0.0
                now = time.monotonic()
                if now >= next_frame:
                    next_frame = now + refresh_s
                    width, height = _screen()
                    screen = render(
                        fleet_rows(feed.view, known or {}, group),
                        sort=sort,
                        reverse=reverse,
                        width=width,
                        height=height,
                        group=group,
                        problems=problems,
                    )
                    # Cursor home and clear only on a terminal; a pipe or a file gets plain frames,
                    # each after a form feed (the plain-text page break).
                    sys.stdout.write(("\x1b[H\x1b[2J" if terminal else FRAME_BREAK) + screen + "\n")
                    sys.stdout.flush()
    except KeyboardInterrupt:
        pass
    finally:
        feed.close()


# -- status ---------------------------------------------------------------------------------------------


def _from_inventory(known: InventoryRow) -> DeviceRow:
    """A device the broker said nothing of, as far as the inventory knows it."""
    return DeviceRow(
        device=known.device,
        online=None if known.online is None else False,
        group=known.group,
        health=None,
        model=known.model,
        version=known.version,
        previous=None,
        update_version=None,
        update_phase=None,
        update_progress=None,
        update_error=None,
        update_message=None,
        temp_c=None,
        mem_available_mb=None,
        queue=None,
        tok_s=None,
        last_seen=known.last_seen or 0.0,
        offline_since=known.offline_since,
        revoked=known.revoked,
    )


def fleet_rows(view: FleetView, known: dict[str, InventoryRow], group: str | None) -> list[DeviceRow]:
    """The broker's devices and the inventory's (``known``), each once, by name; groups and
    last-seen times completed from the inventory (an offline box's status may not say its group)."""
    rows = {}
    for row in view.rows():
        inv = known.get(row.device)
        if inv is not None:
            row = dataclasses.replace(
                row,
                group=row.group or inv.group,
                last_seen=row.last_seen if row.online else (inv.last_seen or 0.0),
                offline_since=row.offline_since or inv.offline_since,
            )
        rows[row.device] = row
    for name, inv in known.items():
        rows.setdefault(name, _from_inventory(inv))
    return [rows[d] for d in sorted(rows) if group is None or rows[d].group == group]


def _presence(row: DeviceRow) -> str:
    if row.revoked:
        return "revoked"
    return "yes" if row.online else ("never seen" if row.online is None else "no")


def _status_table(rows: list[DeviceRow], now: float) -> str:
    body = []
    for r in rows:
        seen = "now" if r.online else ("never" if not r.last_seen else ago(now, r.last_seen))
        online = _presence(r)
        body.append(
            [
                r.device,
                _fmt(r.group),
                online,
                seen,
                _fmt(r.health),
                model_label(r.model, r.version),
                _update(r),
            ]
        )
    return table(["DEVICE", "GROUP", "ONLINE", "LAST SEEN", "HEALTH", "MODEL", "UPDATE"], body)


def _device_detail(row: DeviceRow, desired: str | None, now: float) -> str:
    fields = [
        ("device", row.device),
        ("group", _fmt(row.group)),
        ("labels", ",".join(f"{k}={v}" for k, v in sorted(row.labels.items())) or "-"),
        ("online", _presence(row)),
        ("offline since", ago(now, row.offline_since) if row.offline_since and not row.online else "-"),
        ("last seen", "now" if row.online else ago(now, row.last_seen or None)),
        ("health", _fmt(row.health)),
        ("model", model_label(row.model, row.version)),
        ("previous", _fmt(row.previous)),
        ("desired (own)", desired or "-"),
        ("update", _update(row)),
        ("update error", f"{row.update_error}: {row.update_message}" if row.update_error else "-"),
    ]
    return "\n".join(f"{name + ':':<15}{value}" for name, value in fields)


def status_command(args: argparse.Namespace) -> int:
    """``edge-fleet status [--group G | --device D] [--json]`` (from the server when the profile names one)."""
    from . import server_cmd
    from .client import server_client

    client = server_client()
    desired: str | None = None
    if client is not None:
        rows = server_cmd.status_rows(client, args.group)
    else:
        inventory = Inventory(open_db(args.db))
        feed = FleetFeed(options_from(args), telemetry=False, desired=bool(args.device))
        try:
            feed.settle(args.wait)
        finally:
            feed.close()
        inventory.observe(feed.view.devices.values())
        rows = fleet_rows(feed.view, {r.device: r for r in inventory.rows()}, args.group)
        if args.device:
            seen = feed.view.devices.get(args.device)
            desired = seen.desired if seen else None
    if args.device:
        rows = [r for r in rows if r.device == args.device]
        if not rows:
            raise FleetError(
                f"device {args.device!r} is unknown: not in the inventory and no retained status on the broker "
                "(`edge-fleet devices` lists the known ones)"
            )
    now = time.time()
    if args.json:
        for row in rows:
            print(json.dumps(row.as_json()))
        return 0
    if args.device:
        print(_device_detail(rows[0], desired, now))
        return 0
    if not rows:
        print("no devices found" + (f" in group {args.group}" if args.group else ""))
        return 0
    counts = FleetView.summary(rows)
    scope = f"group {args.group}" if args.group else "all devices"
    print(f"edge-fleet status — {scope} — {time.strftime('%Y-%m-%d %H:%M:%S')}")
    print("  ".join(f"{name} {count}" for name, count in counts.items()))
    print(_status_table(rows, now))
    return 0


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``status`` and ``watch``."""
    status = sub.add_parser("status", help="per device: online, last seen, health, model, update phase")
    scope = status.add_mutually_exclusive_group()
    scope.add_argument("--group", help="only devices of this group")
    scope.add_argument("--device", help="one device in full, with whole error messages")
    status.add_argument("--json", action="store_true", help="one JSON object per device, for scripts")
    status.add_argument("--wait", type=float, default=3.0, help="seconds at most to collect retained state")
    add_db_arg(status)
    add_broker_args(status)
    status.set_defaults(func=status_command)

    live = sub.add_parser("watch", help="live table of the fleet: health, model, update, temperature, load")
    live.add_argument("--group", help="only devices of this group")
    live.add_argument("--sort", choices=SORT_KEYS, default="device", help="initial sort column")
    live.add_argument(
        "--problems", action="store_true", help="only offline, degraded or failed devices (key p)"
    )
    live.add_argument("--refresh", type=float, default=1.0, help="seconds between redraws (default 1)")
    live.add_argument("--duration", type=float, help="stop after this many seconds")
    add_db_arg(live)
    add_broker_args(live)
    live.set_defaults(func=watch_command)


def watch_command(args: argparse.Namespace) -> int:
    """``edge-fleet watch [--group G] [--problems]``."""
    watch(
        options_from(args),
        group=args.group,
        sort=args.sort,
        refresh_s=args.refresh,
        duration_s=args.duration,
        problems=args.problems,
        known={r.device: r for r in Inventory(open_db(args.db)).rows()},
    )
    return 0
