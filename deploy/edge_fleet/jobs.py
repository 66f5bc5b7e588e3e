"""``edge-fleet submit``: jobs from the command line, streamed back over MQTT 5 request/response.

    edge-fleet submit (--device D | --group G) PROMPT [--stream] [--max-tokens N] …
    edge-fleet submit (--device D | --group G) --file PROMPTS.txt [--concurrency C]

With ``--file`` every line is a prompt; they run ``--concurrency`` at a time
and the command reports throughput and per-job latency percentiles.
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from pydantic import ValidationError

from edge_contract.protocol import Chunk, FleetTopics, JobRequest, Result
from edge_contract.telemetry import percentile

from .broker import FleetError, add_broker_args, options_from
from .inventory import Inventory
from .output import model_label
from .state import add_db_arg
from .submit import JobFailed, Submitter


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``submit``."""
    submit = sub.add_parser("submit", help="run a prompt (or a file of prompts) on a device or a group")
    target = submit.add_mutually_exclusive_group(required=True)
    target.add_argument("--device", help="one device id")
    target.add_argument("--group", help="any one device of the group (shared subscription)")
    submit.add_argument("prompt", nargs="?", metavar="PROMPT")
    submit.add_argument("--file", type=Path, help="one prompt a line; reports throughput and latency")
    submit.add_argument("--stream", action="store_true", help="print the answer as it is generated")
    submit.add_argument(
        "--raw",
        action="store_true",
        help="send PROMPT as is (`prompt`); by default it goes as a user message (`messages`), which the "
        "box renders with its model's chat template",
    )
    submit.add_argument(
        "--chat", action="store_true", help=argparse.SUPPRESS
    )  # the default now; kept for scripts
    submit.add_argument("--max-tokens", type=int, default=256)
    submit.add_argument("--temperature", type=float, default=0.0)
    submit.add_argument("--top-p", type=float, default=1.0)
    submit.add_argument("--top-k", type=int, default=0)
    submit.add_argument("--seed", type=int)
    submit.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    submit.add_argument("--ttl", type=float, help="seconds after which the job must not start")
    submit.add_argument("--timeout", type=float, default=300.0, help="seconds to wait for each result")
    submit.add_argument("--concurrency", type=int, default=4, help="jobs in flight with --file (default 4)")
    submit.add_argument("--json", action="store_true", help="print each result as JSON")
    add_db_arg(submit)
    add_broker_args(submit)
    submit.set_defaults(func=submit_command)


def _request(args: argparse.Namespace, prompt: str, stream: bool) -> JobRequest:
    fields: dict[str, object] = {
        "id": f"cli-{uuid.uuid4().hex[:16]}",
        "max_tokens": args.max_tokens,
        "temperature": args.temperature,
        "top_p": args.top_p,
        "top_k": args.top_k,
        "seed": args.seed,
        "stop": args.stop,
        "stream": stream,
        "ttl_s": args.ttl,
    }
    if args.raw:
        fields["prompt"] = prompt
    else:
        fields["messages"] = [{"role": "user", "content": prompt}]
    try:
        return JobRequest.model_validate(fields)
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
        raise FleetError(f"invalid job: {problems}") from None


def submit_command(args: argparse.Namespace) -> int:
    """``edge-fleet submit``."""
    if (args.prompt is None) == (args.file is None):
        raise FleetError("give a PROMPT or --file (one of them)")
    options = options_from(args)
    fleet = FleetTopics(options.prefix)
    topic = fleet.device(args.device).jobs if args.device else fleet.group(args.group).jobs
    if args.raw and args.chat:
        raise FleetError("--raw and --chat exclude each other")
    try:
        with Submitter(options) as submitter:
            _check_target(submitter, args)
            if args.file is None:
                return _one(submitter, topic, args)
            return _many(submitter, topic, args)
    except JobFailed as exc:
        raise FleetError(str(exc)) from exc


def _check_target(submitter: Submitter, args: argparse.Namespace) -> None:
    """Say within seconds whether the device (or any device of the group) is there at all."""
    prefix = submitter.prefix
    if args.device:
        found = submitter.statuses(FleetTopics(prefix).device(args.device).status)
        if found is None:
            return  # this identity may not read statuses: the job itself will tell
        known = Inventory.open(args.db).get(args.device) if found == [] else None
        if not found and known is None:
            raise FleetError(
                f"device {args.device!r} is unknown: no retained status on the broker and not in the inventory "
                "(`edge-fleet devices` lists the known ones; check the name)"
            )
        status = found[0] if found else None
        if status is None or not status.online:
            since = ""
            when = (
                status.since
                if status is not None
                else (known.offline_since or known.last_seen if known else None)
            )
            if when:
                since = f" since {time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(when))}"
            print(
                f"edge-fleet: device {args.device} is offline{since}: the job waits in its session on the broker "
                f"until it returns (this command waits --timeout {args.timeout:g} s for the result)",
                file=sys.stderr,
                flush=True,
            )
        return
    seen = submitter.statuses(FleetTopics(prefix).any_status)
    if seen is None:
        return
    statuses = [s for s in seen if s.group == args.group]
    members = set(Inventory.open(args.db).members(args.group)) | {
        s.device_id for s in statuses if s.device_id
    }
    if not members:
        raise FleetError(
            f"group {args.group!r} is unknown: no device of it has a retained status or is in the inventory"
        )
    if not any(s.online for s in statuses):
        print(
            f"edge-fleet: no device of group {args.group} is online ({len(members)} known): the job waits "
            f"until one of them takes it (this command waits --timeout {args.timeout:g} s)",
            file=sys.stderr,
            flush=True,
        )


def _answered_by(result: Result) -> str:
    """``by DEVICE (MODEL@VERSION)`` as far as the result says."""
    device = getattr(result, "device_id", None)  # Result.device_id: from agents that send it
    model = model_label(result.model.name, result.model.version) if result.model else None
    parts = [f"by {device}" if device else None, f"({model})" if model else None]
    return " ".join(p for p in parts if p)


def _one(submitter: Submitter, topic: str, args: argparse.Namespace) -> int:
    request = _request(args, args.prompt, args.stream)

    def on_chunk(chunk: Chunk) -> None:
        sys.stdout.write(chunk.text)
        sys.stdout.flush()

    result = submitter.run(topic, request, on_chunk=on_chunk if args.stream else None, timeout=args.timeout)
    if args.json:
        print(("\n" if args.stream else "") + result.model_dump_json(exclude_none=True))
    elif result.status == "succeeded":
        print("" if args.stream else result.text)
        if args.group or getattr(result, "device_id", None):
            print(
                f"[{result.usage.completion_tokens} tokens, answered {_answered_by(result)}]",
                file=sys.stderr,
            )
    if result.status != "succeeded":
        error = result.error
        hint = ""
        if error is not None and "chat template" in error.message and not args.raw:
            hint = " (pass --raw to send the prompt as is)"
        print(
            f"job {result.id} {result.status} {_answered_by(result)}: "
            f"{error.code if error else ''} {error.message if error else ''}{hint}",
            file=sys.stderr,
        )
        return 1
    return 0


def _many(submitter: Submitter, topic: str, args: argparse.Namespace) -> int:
    prompts = [line.strip() for line in args.file.read_text(encoding="utf-8").splitlines() if line.strip()]
    if not prompts:
        raise FleetError(f"{args.file} holds no prompts")
    lock = threading.Lock()
    latencies: list[float] = []
    statuses: dict[str, int] = {}
    tokens = 0

    def run(prompt: str) -> Result:
        nonlocal tokens
        started = time.perf_counter()
        result = submitter.run(topic, _request(args, prompt, False), timeout=args.timeout)
        with lock:
            latencies.append(time.perf_counter() - started)
            statuses[result.status] = statuses.get(result.status, 0) + 1
            tokens += result.usage.completion_tokens
        if args.json:
            with lock:
                print(result.model_dump_json(exclude_none=True), flush=True)
        return result

    started = time.perf_counter()
    with ThreadPoolExecutor(max_workers=max(1, args.concurrency)) as pool:
        list(pool.map(run, prompts))
    elapsed = time.perf_counter() - started
    ordered = sorted(latencies)
    report = {
        "jobs": len(prompts),
        "statuses": statuses,
        "seconds": round(elapsed, 3),
        "jobs_per_s": round(len(prompts) / elapsed, 2),
        "tokens_per_s": round(tokens / elapsed, 1),
        "latency_p50_s": round(percentile(ordered, 0.5) or 0.0, 3),
        "latency_p95_s": round(percentile(ordered, 0.95) or 0.0, 3),
        "latency_max_s": round(ordered[-1], 3),
    }
    if args.json:
        print(json.dumps(report), file=sys.stderr)
    else:
        by_status = ", ".join(f"{n} {status}" for status, n in sorted(statuses.items()))
        print(
            f"{report['jobs']} jobs ({by_status}) in {report['seconds']} s: {report['jobs_per_s']} jobs/s, "
            f"{report['tokens_per_s']} tokens/s; latency p50 {report['latency_p50_s']} s, "
            f"p95 {report['latency_p95_s']} s, max {report['latency_max_s']} s",
            file=sys.stderr,
        )
    return 0 if statuses.get("succeeded", 0) == len(prompts) else 1
