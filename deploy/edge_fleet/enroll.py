"""Enrollment from a claim: the box makes its own key, the fleet signs its CSR (``docs/identity.md``).

``edge-fleet claim create NAME --group G --count N`` issues a *claim identity*
``claim-NAME`` (a certificate of the fleet CA, baked into the image) and registers
it on the broker with one right: publish ``PREFIX/enroll/claim-NAME/csr/+`` and read
``PREFIX/enroll/claim-NAME/answer/+``.  Its policy (group, how many boxes, until
when) is kept in the CA folder (``claims/NAME.json``).

``edge-fleet enroll serve`` (next to the CA key) takes each request on the
operators' listener: the broker guarantees that only the claim's certificate
published it; the claim must be known, unexpired and not used up; the name free
in the one name space; the CSR's signature sound and its CN the name.  It then
issues a device certificate for the CSR's public key, registers the device and
its group on the broker, pushes its membership, and answers with the certificate
(retained: a box that was disconnected meanwhile finds it when it subscribes
again).  Requests are retained too, so they wait for an approver that was not
running; each is cleared once answered.  The private key never leaves the box.

A claim made with ``--approve manual`` files each sound request for an operator
(``approval``): ``edge-fleet enroll pending`` lists them, ``edge-fleet approve
NAME`` signs, ``edge-fleet reject NAME`` refuses; the box waits on ``pending``.
A claim's ``--label KEY=VALUE`` labels travel with its group in the membership.
"""

from __future__ import annotations

import argparse
import json
import queue
import sys
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

from agent.link.mqtt import Client
from edge_contract.names import TLS_PORT as DEVICE_PORT
from edge_contract.protocol import EnrollAnswer, FleetTopics, Topics, enroll_topics

from . import approval, broker, claims, pki
from .broker import BrokerOptions, FleetError, add_broker_args, open_client, options_from
from .claims import CLAIM_PREFIX, CLAIMS_DIR, check, decide, issue, renew
from .dynsec import DynSec, _acl
from .flags import file_text
from .identity import membership_message, publish_retained
from .output import ago

#: Seconds before a request whose handling failed (the broker did not answer in time) is tried again.
RETRY_S = 5.0


def claim_acls(claim: str, prefix: str) -> list[dict[str, Any]]:
    """What a claim identity may do: ask for certificates, read the answers, nothing else."""
    requests, answers = FleetTopics(prefix).claim(claim)
    return [
        _acl("publishClientSend", requests),
        _acl("subscribePattern", answers),
        _acl("publishClientReceive", answers),
    ]


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``claim create`` and ``enroll serve``."""
    claim = sub.add_parser("claim", help="enrollment claims: boxes that enroll themselves")
    claim_sub = claim.add_subparsers(dest="claim_command", required=True)
    create = claim_sub.add_parser("create", help="issue a claim identity for a batch of boxes")
    create.add_argument("name", metavar="NAME", help="the batch (its identity is claim-NAME)")
    create.add_argument("--ca", type=Path, required=True, metavar="DIR")
    create.add_argument("--out", type=Path, required=True, metavar="DIR", help="where the claim's files go")
    create.add_argument("--group", help="the group every box of the batch joins")
    create.add_argument("--count", type=int, default=1, help="how many boxes may enroll with it (default 1)")
    create.add_argument("--days", type=int, default=30, help="how long it may be used (default 30)")
    create.add_argument(
        "--label",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a label every box of the batch gets with its membership (repeat for more)",
    )
    create.add_argument(
        "--approve",
        choices=["auto", "manual"],
        default="auto",
        help="auto: a valid request is signed at once (default); manual: it waits for `edge-fleet approve`",
    )
    _admin_args(create)
    create.set_defaults(func=claim_command)

    enroll = sub.add_parser("enroll", help="sign the certificate requests of claimed boxes")
    enroll_sub = enroll.add_subparsers(dest="enroll_command", required=True)
    serve = enroll_sub.add_parser("serve", help="answer enrollment requests (until Ctrl-C or --count)")
    serve.add_argument("--ca", type=Path, required=True, metavar="DIR")
    serve.add_argument("--count", type=int, help="stop after this many answers")
    _admin_args(serve)
    serve.set_defaults(func=serve_command)
    pending = enroll_sub.add_parser("pending", help="enrollments waiting for `edge-fleet approve`")
    pending.add_argument("--ca", type=Path, required=True, metavar="DIR")
    pending.add_argument("--json", action="store_true", help="as JSON")
    pending.set_defaults(func=pending_command)
    for verb, text in (("approve", "sign a pending enrollment"), ("reject", "refuse a pending enrollment")):
        decide_cmd = sub.add_parser(verb, help=f"{text} (claims made with --approve manual)")
        decide_cmd.add_argument("name", metavar="NAME", help="the box's name, as `enroll pending` lists it")
        decide_cmd.add_argument("--ca", type=Path, required=True, metavar="DIR")
        if verb == "reject":
            decide_cmd.add_argument("--reason", help="told to the box with the refusal")
        _admin_args(decide_cmd)
        decide_cmd.set_defaults(func=approve_command if verb == "approve" else reject_command)


def _admin_args(parser: argparse.ArgumentParser) -> None:
    add_broker_args(parser)
    parser.add_argument("--admin-port", type=int, default=DEVICE_PORT, help="the devices' listener")


def claim_command(args: argparse.Namespace) -> int:
    """``edge-fleet claim create NAME``."""
    pki.check_name(args.name, "a claim name")
    if args.group:
        pki.check_name(args.group, "--group")
    if args.count < 1 or args.days < 1:
        raise FleetError("--count and --days must be at least 1")
    labels = parse_labels(args.label)
    identity = f"{CLAIM_PREFIX}{args.name}"
    written = pki.provision(identity, args.ca, args.out, kind="claim", days=args.days)
    record = {
        "group": args.group,
        "labels": labels,
        "approve": args.approve,
        "left": args.count,
        "expires": time.time() + args.days * 86400,
    }
    claims = args.ca / CLAIMS_DIR
    claims.mkdir(exist_ok=True)
    (claims / f"{args.name}.json").write_text(json.dumps(record))
    options = options_from(args)
    with DynSec(replace(options, port=args.admin_port)) as api:
        api.run(
            {"command": "createRole", "rolename": identity, "acls": claim_acls(identity, options.prefix)},
            {"command": "createClient", "username": identity, "roles": [{"rolename": identity}]},
            allow=["already exists"],
        )
    for path in written:
        print(f"wrote {path}")
    print(
        f"claim {identity}: {args.count} box(es) until {time.strftime('%Y-%m-%d', time.localtime(record['expires']))}"
        f"{' into group ' + args.group if args.group else ''}"
        f"{', each approved by an operator (`edge-fleet approve`)' if args.approve == 'manual' else ''}; "
        f"put {args.out} on the boxes' image and run `edge-fleet enroll serve` beside the CA"
    )
    return 0


def parse_labels(items: list[str]) -> dict[str, str]:
    """``--label KEY=VALUE`` flags as a dict (a key is a name, a value has no control character)."""
    labels: dict[str, str] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep:
            raise FleetError(f"--label {item!r}: give KEY=VALUE")
        pki.check_name(key, "a --label key")
        labels[key] = file_text(value, f"--label {key}")[:256]
    if len(labels) > 64:
        raise FleetError("--label: at most 64 labels")
    return labels


def serve_command(args: argparse.Namespace) -> int:
    """``edge-fleet enroll serve --ca DIR``."""
    options = options_from(args)
    admin = replace(options, port=args.admin_port)
    inbox: queue.SimpleQueue[tuple[str, bytes]] = queue.SimpleQueue()
    client = open_client(options, name="edge-fleet-enroll")
    answered = 0
    decided: dict[tuple[str, str], EnrollAnswer] = {}  # every request decided, by (claim, nonce)
    sent: set[tuple[str, str]] = set()  # ... and answered
    try:
        fleet = FleetTopics(options.prefix)
        for topic_filter in (fleet.enroll_requests, fleet.any_renew_csr):
            client.route(topic_filter, lambda message: inbox.put((message.topic, message.payload)))
        client.subscribed([(fleet.enroll_requests, 1), (fleet.any_renew_csr, 1)])
        print(f"answering enrollment requests under {options.prefix}/enroll/ (Ctrl-C stops)", flush=True)
        later: list[tuple[float, str, bytes]] = []  # requests whose handling failed, tried again
        while args.count is None or answered < args.count:
            now = time.monotonic()
            for item in [r for r in later if r[0] <= now]:
                later.remove(item)
                inbox.put(item[1:])
            try:
                topic, payload = inbox.get(timeout=1.0)
            except queue.Empty:
                continue
            if not payload:
                continue  # a request this loop cleared
            try:
                if _handle(client, admin, args.ca, options.prefix, topic, payload, decided, sent):
                    answered += 1
            except FleetError as exc:
                # A busy broker (a batch booting at once) may not answer in time: the request
                # stays retained and is tried again, the server keeps serving.
                print(f"{topic}: {exc}; trying again in {RETRY_S:.0f} s", file=sys.stderr, flush=True)
                later.append((time.monotonic() + RETRY_S, topic, payload))
    except KeyboardInterrupt:
        pass
    finally:
        client.close()
    return 0


def _handle(
    client: Client,
    admin: BrokerOptions,
    ca_dir: Path,
    prefix: str,
    topic: str,
    payload: bytes,
    decided: dict[tuple[str, str], EnrollAnswer],
    sent: set[tuple[str, str]],
) -> bool:
    """Answer one request (renewal or enrollment); False when it was a repeat, only cleared."""

    def publish(messages: list[tuple[str, bytes]]) -> None:
        broker.publish_retained(client, messages, timeout=DynSec.TIMEOUT_S)

    parts = topic.split("/")
    if parts[2:] == ["renew", "csr"]:
        with DynSec(admin) as api:
            answer = renew(ca_dir, parts[1], payload, api.get_client(parts[1]))
        answer_topic = Topics(prefix, parts[1], None).renew_answer
        publish([(answer_topic, answer.model_dump_json(exclude_none=True).encode()), (topic, b"")])
        print(f"renewal: {parts[1]}: {answer.error or 'renewed'}", flush=True)
        return True
    claim, nonce = parts[2], parts[4]
    if (claim, nonce) in sent:
        # The box sent it again (its connection was taken before the broker's ack reached it):
        # answering twice would replace its certificate with "name taken".
        publish([(topic, b"")])
        return False
    answer = take_request(publish, admin, ca_dir, prefix, (claim, nonce), payload, decided)
    sent.add((claim, nonce))
    print(f"{claim}: {answer.name}: {_outcome(answer)}", flush=True)
    return True


def _outcome(answer: EnrollAnswer) -> str:
    if answer.pending:
        return f"waiting for approval (`edge-fleet approve {answer.name}` or `reject`)"
    return answer.error or "enrolled"


Publish = Callable[[list[tuple[str, bytes]]], None]


def take_request(
    publish: Publish,
    admin: BrokerOptions,
    ca_dir: Path,
    prefix: str,
    request_id: tuple[str, str],
    payload: bytes,
    decided: dict[tuple[str, str], EnrollAnswer],
) -> EnrollAnswer:
    """Decide one request ``(claim, nonce)`` (sign it, file it for approval, or refuse it), answer
    the box (retained) and clear the request.  The decision is kept in ``decided`` first: when the
    broker fails to take the answer, the retry sends the same certificate again (deciding anew
    would find the name taken by this very box)."""
    claim, nonce = request_id
    answer = decided.get(request_id)
    if answer is None:
        checked = check(ca_dir, claim, payload)
        if isinstance(checked, EnrollAnswer):
            answer = checked
        else:
            request, key, record = checked
            if record.get("approve") == "manual":
                problem = approval.file_request(ca_dir, claim, nonce, request, key)
                answer = EnrollAnswer(name=request.name, error=problem or None, pending=not problem)
            else:
                answer = issue(ca_dir, claim, request, key, record)
        decided[request_id] = answer
    _admit(publish, admin, prefix, answer, claims.claim_record(ca_dir, claim) or {})
    _answer(publish, prefix, claim, nonce, answer, clear=True)
    return answer


def _admit(
    publish: Publish, admin: BrokerOptions, prefix: str, answer: EnrollAnswer, record: dict[str, Any]
) -> None:
    """A box just issued its certificate: registered on the broker, its membership pushed."""
    if answer.cert is None:
        return
    group = record.get("group")
    with DynSec(admin) as api:
        api.add_device(answer.name, group, prefix)
    publish([membership_message(prefix, answer.name, group, dict(record.get("labels") or {}))])


def _answer(
    publish: Publish, prefix: str, claim: str, nonce: str, answer: EnrollAnswer, *, clear: bool
) -> None:
    request_topic, answer_topic = enroll_topics(prefix, claim, nonce)
    messages = [(answer_topic, answer.model_dump_json(exclude_none=True).encode())]
    publish([*messages, (request_topic, b"")] if clear else messages)


def pending_command(args: argparse.Namespace) -> int:
    """``edge-fleet enroll pending --ca DIR``."""
    if args.json:
        print(approval.dumps(args.ca))
        return 0
    rows = approval.rows(args.ca)
    if not rows:
        print("no enrollment is waiting for approval")
    for row in rows:
        print(
            f"{row['name']:<24} {row['claim']:<20} {row['fingerprint']:<42} waiting {ago(time.time(), row['since'])}"
        )
    return 0


def approve_command(args: argparse.Namespace) -> int:
    """``edge-fleet approve NAME --ca DIR``: sign a pending enrollment (its checks run again)."""
    options = options_from(args)
    entry, answer = approve_pending(args.ca, args.name, options, replace(options, port=args.admin_port))
    print(f"{entry.claim}: {answer.name}: {_outcome(answer)}")
    return 0 if answer.cert is not None else 1


def reject_command(args: argparse.Namespace) -> int:
    """``edge-fleet reject NAME --ca DIR``: refuse a pending enrollment; the box is told why."""
    entry = reject_pending(args.ca, args.name, args.reason, options_from(args))
    print(f"{entry.claim}: {entry.name}: rejected; the box was told")
    return 0


def approve_pending(
    ca_dir: Path, name: str, options: BrokerOptions, admin: BrokerOptions
) -> tuple[approval.Pending, EnrollAnswer]:
    """Sign ``name``'s pending request (the claim's checks run again), register it on the broker,
    push its membership and answer the box (``approve``, and the fleet server's API)."""
    entry = approval.take(ca_dir, name)
    answer = decide(ca_dir, entry.claim, entry.request.encode())

    def publish(messages: list[tuple[str, bytes]]) -> None:
        publish_retained(options, messages)

    _admit(publish, admin, options.prefix, answer, claims.claim_record(ca_dir, entry.claim) or {})
    _answer(publish, options.prefix, entry.claim, entry.nonce, answer, clear=False)
    return entry, answer


def reject_pending(ca_dir: Path, name: str, reason: str | None, options: BrokerOptions) -> approval.Pending:
    """Refuse ``name``'s pending request; the box is told who, why and what to do."""
    entry = approval.take(ca_dir, name)
    answer = approval.rejected(entry.name, entry.claim, reason)
    _answer(
        lambda m: publish_retained(options, m), options.prefix, entry.claim, entry.nonce, answer, clear=False
    )
    return entry
