"""``edge-fleet server`` (run it; ``server token create|list|revoke``) and ``edge-fleet audit``."""

from __future__ import annotations

import argparse
import datetime
import getpass
import json
import logging
import os
import socket
import sys
import threading
from dataclasses import replace
from pathlib import Path
from typing import Any

from edge_contract.names import TLS_PORT

from ..broker import add_broker_args, options_from
from ..client import server_client
from ..errors import FleetError
from ..output import table

_ROLES = ("viewer", "operator", "admin")


def default_server_db() -> str:
    """``$XDG_STATE_HOME/edge-fleet/server.sqlite3`` (the lab state file is another one)."""
    state = Path(os.environ.get("XDG_STATE_HOME") or Path.home() / ".local" / "state")
    return str(state / "edge-fleet" / "server.sqlite3")


def _add_db(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--db",
        default=None,
        metavar="PATH|postgresql://…",
        help="the server's database: a SQLite file (default ~/.local/state/edge-fleet/server.sqlite3, or "
        "$EDGE_FLEET_SERVER_DB) or a PostgreSQL DSN",
    )


def _db_of(args: argparse.Namespace) -> str:
    return str(args.db or os.environ.get("EDGE_FLEET_SERVER_DB") or default_server_db())


def _listen(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise argparse.ArgumentTypeError(f"{text!r}: expected HOST:PORT, e.g. 127.0.0.1:8080")
    return host.strip("[]") or "127.0.0.1", int(port)


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``server`` and ``audit``."""
    server = sub.add_parser(
        "server",
        help="run the fleet server (API, rollouts, metrics); or: server token create|list|revoke",
        description="The control plane as a long-running process: it owns the fleet's state in its database "
        "and drives rollouts unattended. See docs/fleet-server.md.",
    )
    server.add_argument("--listen", type=_listen, default=("127.0.0.1", 8080), metavar="HOST:PORT",
                        help="where the API listens (default 127.0.0.1:8080)")  # fmt: skip
    server.add_argument("--server-id", default=None, help="this server's name in leases (default HOST:PORT)")
    server.add_argument(
        "--tick", type=float, default=0.5, help="seconds between controller passes (default 0.5)"
    )
    server.add_argument("--metrics-public", action="store_true", help="serve /metrics without a token")
    server.add_argument("--log-level", default="info", choices=("debug", "info", "warning", "error"))
    _add_db(server)
    add_broker_args(server)
    server.add_argument(
        "--enroll-ca",
        type=Path,
        metavar="DIR",
        help="the fleet CA: pending enrollments are listed, approved and rejected in the API and dashboard",
    )
    server.add_argument(
        "--enroll-admin-port", type=int, default=TLS_PORT, help="with --enroll-ca: the devices' listener"
    )
    server.set_defaults(func=serve_command)
    actions = server.add_subparsers(dest="server_action", required=False, metavar="token")
    tokens = actions.add_parser("token", help="API tokens: create NAME --role R | list | revoke NAME")
    tokens.add_argument("token_action", choices=("create", "list", "revoke"))
    tokens.add_argument("name", nargs="?", help="who the token is for (create, revoke)")
    tokens.add_argument("--role", choices=_ROLES, default=None, help="create: viewer, operator or admin")
    tokens.add_argument("--json", action="store_true", help="list: one JSON object per token")
    _add_db(tokens)
    tokens.set_defaults(func=token_command)

    audit = sub.add_parser("audit", help="the server's audit log: who changed what, when")
    audit.add_argument("--json", action="store_true", help="one JSON object per entry")
    audit.add_argument("--after", type=int, default=0, help="entries after this sequence number")
    _add_db(audit)
    audit.set_defaults(func=audit_command)


def _local_actor() -> str:
    return f"local:{getpass.getuser()}"


def _store(args: argparse.Namespace) -> Any:
    from .db import Database
    from .store import Store

    return Store(Database(_db_of(args)))


def token_command(args: argparse.Namespace) -> int:
    """``edge-fleet server token create NAME --role R | list | revoke NAME``."""
    store = _store(args)
    if args.token_action == "list":
        rows = store.tokens()
        if args.json:
            for row in rows:
                print(json.dumps(row))
        elif rows:
            print(table(["NAME", "ROLE", "CREATED", "BY", "STATE"], [
                [r["name"], r["role"], _when(r["created"]), r["created_by"], "revoked" if r["revoked"] else "live"]
                for r in rows
            ]))  # fmt: skip
        else:
            raise FleetError("no tokens yet: edge-fleet server token create NAME --role admin")
        return 0
    if not args.name:
        raise FleetError(f"server token {args.token_action} needs the NAME")
    if args.token_action == "revoke":
        store.revoke_token(args.name, _local_actor())
        print(f"token of {args.name} revoked")
        return 0
    if args.role is None:
        raise FleetError("server token create needs --role viewer|operator|admin")
    token = store.create_token(args.name, args.role, _local_actor())
    print(token)
    print(f"(a {args.role} token for {args.name}: shown once, only its hash is kept)", file=sys.stderr)
    return 0


def _when(at: float) -> str:
    return datetime.datetime.fromtimestamp(at).strftime("%Y-%m-%d %H:%M:%S")


def audit_command(args: argparse.Namespace) -> int:
    """``edge-fleet audit``: from the server (profile's server) or its database (``--db``)."""
    client = server_client() if args.db is None else None
    if client is not None:
        entries = client.call("GET", "/api/v1/audit", after=args.after)
    else:
        entries = [e.as_json() for e in _store(args).audit_log(after=args.after)]
    if args.json:
        for entry in entries:
            print(json.dumps(entry))
        return 0
    if not entries:
        raise FleetError("the audit log has no entries" + (f" after {args.after}" if args.after else ""))
    print(table(["SEQ", "WHEN", "WHO", "WHAT", "TARGET", "DETAIL"], [
        [str(e["seq"]), _when(e["at"]), e["actor"], e["action"], e["target"], json.dumps(e["detail"])[:80]]
        for e in entries
    ]))  # fmt: skip
    return 0


def serve_command(args: argparse.Namespace) -> int:
    """``edge-fleet server``: the API, the broker link and the controller, until SIGTERM or SIGINT."""
    import uvicorn

    from .app import create_app
    from .broker_link import BrokerLink
    from .controller import Controller
    from .service import FleetService

    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    host, port = args.listen
    store = _store(args)
    link = BrokerLink(options_from(args))
    controller = Controller(
        FleetService(store, link), link, args.server_id or f"{socket.gethostname()}:{port}", tick_s=args.tick
    )
    desk = None
    if args.enroll_ca is not None:
        from .api.enrollments import EnrollmentDesk

        options = options_from(args)
        desk = EnrollmentDesk(args.enroll_ca, options, replace(options, port=args.enroll_admin_port))
    app = create_app(store, link, controller=controller, metrics_public=args.metrics_public, enroll=desk)
    loop = threading.Thread(target=controller.run, name="controller", daemon=True)
    loop.start()
    config = uvicorn.Config(app, host=host, port=port, log_level=args.log_level, access_log=False)
    server = uvicorn.Server(config)
    print(f"edge-fleet server: listening on http://{host}:{port} (database {store.db.where})", flush=True)
    try:
        server.run()
    finally:
        controller.stop()
        loop.join(timeout=10)
        link.close()
        store.db.close()
    if not server.started:
        raise FleetError(f"the server could not listen on {host}:{port} (is the port taken? see --listen)")
    return 0
