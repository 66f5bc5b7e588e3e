"""``edge-fleet broker init``: a complete mosquitto setup for the fleet, from the fleet CA.

Two listeners, because mosquitto can bind a session to a certificate only by
forcing the client id to the user name (``use_username_as_clientid``), which
allows one connection per identity — right for a device, wrong for an operator
running ``watch`` beside ``rollout``:

* the devices' listener (default 8883): a client certificate of the fleet CA
  (or the operator CA, for identity commands), its CN as user name *and* as
  client id, authorization by the dynamic-security plugin (``dynsec``) checked
  at SUBSCRIBE;
* the operators' listener (default 8884): only certificates of the operator CA,
  any client id, read/write on the fleet's topics (``operators.acl``).

A device's certificate is refused by the operators' listener (another CA), so
it cannot reach a session there either.  ``per_listener_settings true`` is what
keeps these two apart: in mosquitto 2.0 ``use_username_as_clientid``,
``acl_file`` and plugins are otherwise global.

Files under OUT (every path in the configuration is absolute)::

    mosquitto.conf            stand-alone: persistence, log, include_dir OUT/conf.d
    conf.d/edge.conf          the listeners; also works dropped into Debian's /etc/mosquitto/conf.d/
    certs/                    broker.crt, broker.key, ca.crt, operator-ca.crt, clients-ca.crt
    operators.acl             what operators may read and write
    data/                     mosquitto.db and dynamic-security.json (the live authorization state)
    log/                      mosquitto.log
"""

from __future__ import annotations

import argparse
import grp
import json
import os
import pwd
import secrets
import stat
from pathlib import Path

from . import dynsec, flags, pki
from .broker import FleetError

#: Where Debian/Ubuntu and other distributions put the plugin (first match wins).
PLUGIN_PATHS = (
    "/usr/lib/x86_64-linux-gnu/mosquitto_dynamic_security.so",
    "/usr/lib/aarch64-linux-gnu/mosquitto_dynamic_security.so",
    "/usr/lib/arm-linux-gnueabihf/mosquitto_dynamic_security.so",
    "/usr/lib/mosquitto_dynamic_security.so",
    "/usr/local/lib/mosquitto_dynamic_security.so",
)
DEVICE_PORT, OPERATOR_PORT = 8883, 8884
#: A crash loses at most this many seconds of sessions, queued jobs and retained desired state.
AUTOSAVE_S = 5
MOSQUITTO_USER = "mosquitto"


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``broker init``."""
    broker = sub.add_parser("broker", help="set up the fleet's mosquitto broker")
    broker_sub = broker.add_subparsers(dest="broker_command", required=True)
    init = broker_sub.add_parser(
        "init", help="write a complete mosquitto setup (config, certificates, authorization state)"
    )
    init.add_argument("--ca", type=Path, required=True, metavar="DIR", help="the CA folder of `ca init`")
    init.add_argument(
        "--hostname",
        action="append",
        required=True,
        metavar="HOST",
        help="name or IP devices and operators use for the broker (repeat for several)",
    )
    init.add_argument("--out", type=Path, required=True, metavar="DIR")
    init.add_argument("--port", type=int, default=DEVICE_PORT, help=f"devices' port (default {DEVICE_PORT})")
    init.add_argument(
        "--operator-port", type=int, default=OPERATOR_PORT, help=f"operators' port (default {OPERATOR_PORT})"
    )
    init.add_argument("--bind", metavar="ADDRESS", help="listen on this address only (default: all)")
    init.add_argument(
        "--operator",
        action="append",
        metavar="NAME",
        help="operator allowed to manage identities (repeatable; default: operator)",
    )
    init.add_argument("--topic-prefix", default="edge", help="first level of every topic (default: edge)")
    init.add_argument("--plugin", type=Path, help="mosquitto_dynamic_security.so (default: found)")
    init.add_argument(
        "--device-logins",
        action="store_true",
        help="devices log in with a user name and password (provision --login) instead of a client "
        "certificate; operators keep theirs",
    )
    init.add_argument("--force", action="store_true", help="rewrite an existing setup (keeps data/)")
    init.set_defaults(func=init_command)
    from .retained import register as register_sweep

    register_sweep(broker_sub)


def init_command(args: argparse.Namespace) -> int:
    """``edge-fleet broker init --ca DIR --hostname HOST --out DIR``."""
    out: Path = args.out.resolve()
    operators = args.operator or [pki.OPERATOR]
    try:
        written = _init_from(args, out, operators)
    except OSError as exc:
        raise FleetError(
            f"{exc.filename or out}: {exc.strerror or exc} — run `broker init` as root (sudo) for a folder "
            "like /etc/mosquitto/edge, or choose another --out"
        ) from exc
    for path in written:
        print(f"wrote {path}")
    for warning in traversal_problems(out) + ownership_problems(out):
        print(f"warning: {warning}")
    _print_next_steps(args, out, operators)
    return 0


def _init_from(args: argparse.Namespace, out: Path, operators: list[str]) -> list[Path]:
    return init(
        args.ca,
        out,
        hosts=args.hostname,
        port=args.port,
        operator_port=args.operator_port,
        bind=args.bind,
        operators=operators,
        prefix=args.topic_prefix,
        plugin=args.plugin,
        force=args.force,
        device_logins=args.device_logins,
    )


def _print_next_steps(args: argparse.Namespace, out: Path, operators: list[str]) -> None:
    host = args.hostname[0]
    print(
        f"\nstart it:   mosquitto -c {out / 'mosquitto.conf'}\n"
        f"(as root it drops to the user {MOSQUITTO_USER}; the files above are readable by it)\n"
        f"Debian's service instead: cp {out / 'conf.d' / 'edge.conf'} /etc/mosquitto/conf.d/ "
        "&& systemctl restart mosquitto\n"
        f"\ndevices connect to {host}:{args.port}; operators' tools to {host}:{args.operator_port} with\n"
        f"  edge-fleet provision {operators[0]} --operator --ca {args.ca} --out OPDIR\n"
        f"  edge-fleet ... --broker {host}:{args.operator_port} --tls-ca OPDIR/ca.crt "
        f"--tls-cert OPDIR/{operators[0]}.crt --tls-key OPDIR/{operators[0]}.key"
    )


def find_plugin(given: Path | None) -> Path:
    """The dynamic-security plugin: ``given``, or the first of ``PLUGIN_PATHS`` present."""
    if given is not None:
        if not given.is_file():
            raise FleetError(f"--plugin {given}: no such file")
        return given
    for candidate in PLUGIN_PATHS:
        if Path(candidate).is_file():
            return Path(candidate)
    raise FleetError(
        "mosquitto_dynamic_security.so not found (Debian: apt-get install mosquitto, 2.0 or newer); "
        "name it with --plugin PATH"
    )


def init(
    ca_dir: Path,
    out: Path,
    *,
    hosts: list[str],
    port: int = DEVICE_PORT,
    operator_port: int = OPERATOR_PORT,
    bind: str | None = None,
    operators: list[str] | None = None,
    prefix: str = "edge",
    plugin: Path | None = None,
    force: bool = False,
    device_logins: bool = False,
) -> list[Path]:
    """Write the setup into ``out``; returns the files written.

    ``device_logins``: the devices' listener takes logins (checked by the plugin, each bound to
    its client id) instead of certificates; each operator's password for the identity commands
    there goes to ``out/operator-NAME.password`` (0600).
    """
    operators = operators or [pki.OPERATOR]
    for name in operators:
        pki.check_name(name, "--operator")
    devices = pki.device_names(ca_dir) & set(operators)
    if devices:
        raise FleetError(
            f"--operator {', '.join(sorted(devices))}: a device of this CA has that name "
            f"({ca_dir / pki.DEVICES_FILE}); operators and devices share one name space — choose another name"
        )
    flags.topic_level(prefix, "--topic-prefix")
    flags.file_text(str(out), "--out")
    for host in hosts:
        flags.host_name(host, "--hostname")
    if bind is not None:
        flags.host_name(bind, "--bind")
    if plugin is not None:
        flags.file_text(str(plugin), "--plugin")
    if port == operator_port:
        raise FleetError("--port and --operator-port must differ")
    plugin_path = find_plugin(plugin)
    conf = out / "mosquitto.conf"
    if conf.exists() and not force:
        raise FleetError(f"{conf} exists; pass --force to rewrite the setup (data/ is kept)")
    certs, data, log_dir, conf_d = out / "certs", out / "data", out / "log", out / "conf.d"
    for folder in (out, certs, data, log_dir, conf_d):
        folder.mkdir(parents=True, exist_ok=True)
        # data/ holds the authorization state (password hashes) and the persisted messages;
        # mosquitto rewrites dynamic-security.json with its own mode, so the folder is what keeps
        # other local users out.
        folder.chmod(0o700 if folder == data else 0o755)
    written = pki.provision("broker", ca_dir, certs, kind="broker", hosts=hosts, force=True)
    operator_ca = pki.ensure_operator_ca(ca_dir)
    (certs / "operator-ca.crt").write_bytes(operator_ca.read_bytes())
    bundle = certs / "clients-ca.crt"
    bundle.write_bytes((ca_dir / pki.CA_CERT).read_bytes() + operator_ca.read_bytes())
    written += [certs / "operator-ca.crt", bundle]

    acl = out / "operators.acl"
    acl.write_text(
        "# Written by `edge-fleet broker init`. Every client of the operators' listener holds a\n"
        "# certificate of the operator CA: each may read and write the whole fleet tree.\n"
        f"pattern readwrite {prefix}/#\n"
        "pattern read $SYS/#\n"
    )
    state = data / "dynamic-security.json"
    if state.exists():
        print(f"kept {state} (the live authorization state)")
    else:
        passwords: dict[str, str] = {}
        if device_logins:
            for name in operators:
                passwords[name] = new_password()
                secret = out / f"operator-{name}.password"
                fd = os.open(secret, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
                with os.fdopen(fd, "w") as f:
                    f.write(passwords[name] + "\n")
                written.append(secret)
        fd = os.open(state, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(json.dumps(dynsec.initial_state(operators, passwords), indent=2) + "\n")
        state.chmod(0o600)
        written.append(state)
    snippet = conf_d / "edge.conf"
    snippet.write_text(
        listeners_conf(
            certs,
            data,
            acl,
            plugin_path,
            port=port,
            operator_port=operator_port,
            bind=bind,
            device_logins=device_logins,
        )
    )
    conf.write_text(main_conf(out))
    written += [acl, snippet, conf]
    _hand_to_mosquitto(certs / "broker.key", [data, log_dir, state])
    return written


def main_conf(out: Path) -> str:
    """The stand-alone ``mosquitto.conf``: what Debian's stock file holds, pointed into ``out``."""
    return f"""\
# Written by `edge-fleet broker init`. Start: mosquitto -c {out / "mosquitto.conf"}
# (as root, mosquitto drops to the user {MOSQUITTO_USER}, who can read every file here).
persistence true
persistence_location {out / "data"}/
log_dest file {out / "log" / "mosquitto.log"}
log_dest stderr
include_dir {out / "conf.d"}
"""


def listeners_conf(
    certs: Path,
    data: Path,
    acl: Path,
    plugin: Path,
    *,
    port: int,
    operator_port: int,
    bind: str | None,
    device_logins: bool = False,
) -> str:
    """The two listeners; no ``persistence_location``, so Debian's stock file can include it."""
    where = f" {bind}" if bind else ""
    tls = f"""\
certfile {certs / "broker.crt"}
keyfile {certs / "broker.key"}
tls_version tlsv1.2
require_certificate true
use_identity_as_username true
allow_anonymous false"""
    devices = f"""\
# A fleet certificate's CN is the user name AND the client id: a certificate can only
# ever hold its own session. Authorization (checked at SUBSCRIBE and at delivery) is the
# dynamic-security plugin's state, changed live by `edge-fleet provision/move/revoke`.
# Operators' certificates are accepted here only for those identity commands.
listener {port}{where}
cafile {certs / "clients-ca.crt"}
{tls}"""
    if device_logins:
        devices = f"""\
# Devices log in with a user name and password, checked by the dynamic-security plugin
# (which binds each login to its client id and refuses a disabled client at CONNECT);
# the user name is also the client id, so a login can only hold its own session.
listener {port}{where}
certfile {certs / "broker.crt"}
keyfile {certs / "broker.key"}
tls_version tlsv1.2
allow_anonymous false"""
    return f"""\
# Written by `edge-fleet broker init`: an edge-agent fleet on mosquitto 2.0.
# Works on its own (mosquitto.conf next to conf.d/) and dropped into Debian's
# /etc/mosquitto/conf.d/ (the stock mosquitto.conf sets persistence and the log).

# Each listener has its own authentication and authorization (mosquitto 2.0 makes
# use_username_as_clientid, acl_file and plugins global otherwise).
per_listener_settings true
# The persistence database is written every {AUTOSAVE_S} s: a crash loses seconds of
# sessions, queued jobs and retained desired state (mosquitto's default is 30 min).
autosave_interval {AUTOSAVE_S}
# Jobs for boxes that are offline wait in their persistent sessions.
max_queued_messages 10000
# The agent's jobs are at most 64 KiB by default; the broker drops packets over 1 MiB.
max_packet_size 1048576
# Small packets (acks, chunks) must not wait for Nagle + delayed ACK (~40 ms each).
set_tcp_nodelay true

# -- devices ----------------------------------------------------------------------
{devices}
use_username_as_clientid true
plugin {plugin}
plugin_opt_config_file {data / "dynamic-security.json"}

# -- operators (edge-fleet) ---------------------------------------------------------
# Only the operator CA: device certificates are refused during the TLS handshake.
# Any client id, so `watch`, `rollout` and `submit` run side by side.
listener {operator_port}{where}
cafile {certs / "operator-ca.crt"}
{tls}
acl_file {acl}
"""


def _hand_to_mosquitto(key: Path, writable: list[Path]) -> None:
    """As root: the broker's key readable by group mosquitto, its data writable by it.

    mosquitto started as root reads its files only after switching to the user
    mosquitto.  As anyone else mosquitto stays that user, who owns the files already.
    """
    if os.geteuid() != 0:
        return
    try:
        user = pwd.getpwnam(MOSQUITTO_USER)
        group = grp.getgrnam(MOSQUITTO_USER).gr_gid
    except KeyError:
        print(f"note: no user {MOSQUITTO_USER}: mosquitto will run as root (its `user` option)")
        return
    os.chown(key, 0, group)
    key.chmod(0o640)
    for path in writable:
        os.chown(path, user.pw_uid, group)


def traversal_problems(out: Path) -> list[str]:
    """Folders above ``out`` the user mosquitto cannot enter (e.g. /root), each with its fix."""
    if os.geteuid() != 0:
        return []
    problems = []
    for folder in [*reversed(out.parents), out]:
        mode = folder.stat().st_mode
        if not mode & stat.S_IXOTH:
            problems.append(
                f"{folder} is not searchable by the user {MOSQUITTO_USER}: mosquitto cannot read "
                f"its files (chmod o+x {folder}, or choose --out under /etc/mosquitto)"
            )
    return problems


def ownership_problems(out: Path) -> list[str]:
    """Written by someone other than root: a mosquitto started as root (which then becomes the
    user mosquitto) could not read the key nor write its data."""
    if os.geteuid() == 0:
        return []
    try:
        pwd.getpwnam(MOSQUITTO_USER)
    except KeyError:
        return []
    return [
        f"not run as root: {out / 'certs' / 'broker.key'} is yours, mode 0600. Start mosquitto as this "
        f"user (it then stays this user), or run `broker init` as root so the user {MOSQUITTO_USER} "
        "can read it when mosquitto is started as root"
    ]


def new_password() -> str:
    """A random password for a broker login that never starts with "-".

    Operators pass it on command lines (``--password VALUE``), where a leading dash reads as
    an option: ``token_urlsafe`` begins with one once in 64 draws.
    """
    while True:
        password = secrets.token_urlsafe(24)
        if not password.startswith("-"):
            return password
