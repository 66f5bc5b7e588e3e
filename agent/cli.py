"""The ``edge-agent`` command line.

``generate`` and ``bench`` are contracts other tools rely on: keep their flags
and their ``--json`` fields stable.
"""

from __future__ import annotations

import argparse
import json
import logging
import resource
import statistics
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from agent.config import check_files, load_config
from agent.engine.engine import Engine, EngineOptions
from agent.engine.weight_traffic import model_weight_traffic
from edge_contract import __version__, params
from edge_contract.errors import AgentError
from edge_contract.params import SamplingParams


def _add_engine_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "model_dir", metavar="MODEL_DIR", help="model folder (genai_config.json, model.onnx, tokenizer.json)"
    )
    parser.add_argument(
        "--threads", type=int, default=0, help="intra-op threads (default: one per physical core)"
    )


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="edge-agent", description="Run small language models on edge boxes."
    )
    parser.add_argument("--version", action="version", version=f"edge-agent {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    gen = sub.add_parser("generate", help="generate text for a prompt, streaming it to stdout")
    _add_engine_flags(gen)
    gen.add_argument("prompt", metavar="PROMPT")
    # Sampling flags: bounds, descriptions and defaults from edge_contract.params, as on the wire.
    for flag, annotated in (
        ("--max-tokens", params.MaxTokens),
        ("--temperature", params.Temperature),
        ("--top-k", params.TopK),
        ("--top-p", params.TopP),
        ("--repetition-penalty", params.RepetitionPenalty),
        ("--seed", params.Seed),
    ):
        default = getattr(params.DEFAULTS, flag[2:].replace("-", "_"))
        gen.add_argument(
            flag,
            type=params.cli_type(annotated),
            default=default,
            help=params.describe(annotated) + ("" if default is None else f" Default: {default}."),
        )
    gen.add_argument(
        "--stop",
        action="append",
        default=[],
        type=params.cli_type(params.StopString),
        help="stop string (repeatable)",
    )
    gen.add_argument(
        "--raw",
        action="store_true",
        help="tokenize PROMPT as is; by default it is a user message in the model's chat template, if it has one",
    )
    gen.add_argument(
        "--chat", action="store_true", help=argparse.SUPPRESS
    )  # the default now; kept for scripts
    gen.add_argument("--json", action="store_true", help="print one JSON object instead of streaming text")

    bench = sub.add_parser(
        "bench",
        help="measure prefill and decode speed and peak memory; count the weights read per token",
    )
    _add_engine_flags(bench)
    bench.add_argument("--prompt-tokens", type=int, default=64)
    bench.add_argument("--new-tokens", type=int, default=64)
    bench.add_argument(
        "--repeat", type=int, default=3, help="measured runs after one warm-up (median reported)"
    )
    bench.add_argument(
        "--bandwidth-gbs",
        type=float,
        default=None,
        metavar="GB/S",
        help=(
            "memory read bandwidth of the target box in 10^9 bytes/s: also report the decode speed "
            "it allows at most (weights read per token / bandwidth; a projection, not a measurement)"
        ),
    )
    bench.add_argument(
        "--prefix-tokens",
        type=int,
        default=0,
        metavar="N",
        help=(
            "also measure the prefix cache: N shared instruction tokens before the --prompt-tokens "
            "input, first cold, then warm with a new input each run (time to first token)"
        ),
    )
    bench.add_argument(
        "--concurrency",
        type=int,
        default=1,
        metavar="N",
        help="decode N jobs together (continuous batching); reports aggregate and per-job speed",
    )
    bench.add_argument(
        "--speculate",
        action="store_true",
        help="prompt-lookup speculative decoding; reports drafted and accepted tokens",
    )
    bench.add_argument("--json", action="store_true")
    run = sub.add_parser("run", help="run the daemon: take jobs over MQTT and answer them")
    run.add_argument("--config", required=True, metavar="FILE", help="TOML configuration file")
    run.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])

    doctor = sub.add_parser("doctor", help="check this box: versions, CPU features, memory, broker, model")
    doctor.add_argument("--config", required=True, metavar="FILE", help="TOML configuration file")

    enroll = sub.add_parser("enroll", help="make this box's key and get its certificate from a claim")
    enroll.add_argument("name", metavar="NAME", help="this box's device id")
    enroll.add_argument(
        "--claim", type=Path, required=True, metavar="DIR", help="claim-NAME.crt/.key and ca.crt"
    )
    enroll.add_argument("--broker", required=True, metavar="HOST[:PORT]", help="the devices' listener (8883)")
    enroll.add_argument(
        "--out", type=Path, required=True, metavar="DIR", help="where NAME.key and NAME.crt go"
    )
    enroll.add_argument("--topic-prefix", default="edge")
    enroll.add_argument("--timeout", type=float, default=120.0, help="seconds to wait for the answer")
    enroll.add_argument(
        "--approval-timeout",
        type=float,
        default=24 * 3600.0,
        help="seconds to wait once told the claim needs an operator's approval (default a day)",
    )

    config = sub.add_parser("config", help="configuration tools")
    config_sub = config.add_subparsers(dest="config_command", required=True)
    check = config_sub.add_parser("check", help="validate a configuration file without starting")
    check.add_argument("file", metavar="FILE")
    return parser


def _run(args: argparse.Namespace) -> int:
    logging.basicConfig(
        level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr
    )
    from agent.daemon import Agent

    agent = Agent(load_config(args.config))
    agent.install_signal_handlers()
    agent.serve()
    return 0


def _doctor(args: argparse.Namespace) -> int:
    from agent.doctor import format_report, run_checks, worst

    config = load_config(args.config)
    checks = run_checks(config, thresholds=config.health)
    print(format_report(checks))
    return 1 if worst(checks) == "fail" else 0


def _enroll(args: argparse.Namespace) -> int:
    from agent.enroll import enroll
    from edge_contract.names import TLS_PORT, parse_endpoint

    try:
        broker = parse_endpoint(args.broker, TLS_PORT)
    except ValueError as exc:
        print(f"edge-agent: error: --broker {exc}", file=sys.stderr)
        return 2
    cert = enroll(
        args.name,
        args.claim,
        broker,
        args.out,
        prefix=args.topic_prefix,
        timeout_s=args.timeout,
        approval_timeout_s=args.approval_timeout,
        notify=lambda text: print(f"edge-agent: {text}", file=sys.stderr, flush=True),
    )
    key = cert.with_suffix(".key")
    print(
        f"enrolled as {args.name}: {cert} and {key} (made here, never sent), {args.out / 'ca.crt'}; "
        f'[mqtt.tls] ca = "{args.out / "ca.crt"}", cert = "{cert}", key = "{key}"'
    )
    return 0


def _config_check(args: argparse.Namespace) -> int:
    config = load_config(args.file)
    problems = check_files(config)
    for problem in problems:
        print(f"edge-agent: {args.file}: {problem}", file=sys.stderr)
    if problems:
        return 1
    brokers = ", ".join(f"{host}:{port}" for host, port in config.mqtt.endpoints)
    print(f"{args.file}: OK (device {config.device_id}, broker {brokers})")
    return 0


def _engine(args: argparse.Namespace, **options: Any) -> Engine:
    speculate = bool(getattr(args, "speculate", False))
    return Engine(args.model_dir, EngineOptions(threads=args.threads, speculate=speculate, **options))


def _generate(args: argparse.Namespace) -> int:
    params = SamplingParams(
        max_tokens=args.max_tokens,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        repetition_penalty=args.repetition_penalty,
        seed=args.seed,
        stop=tuple(args.stop),
    )
    engine = _engine(args)
    if args.chat or (not args.raw and engine.tokenizer.has_chat_template):
        ids = engine.prompt_ids(messages=[{"role": "user", "content": args.prompt}])
    else:
        ids = engine.prompt_ids(args.prompt)

    def stream(text: str) -> None:
        sys.stdout.write(text)
        sys.stdout.flush()

    completion = engine.generate(ids, params, on_text=None if args.json else stream)
    if args.json:
        out = completion.model_dump()
        out["model"] = engine.name
        print(json.dumps(out, ensure_ascii=False))
    else:
        t = completion.timings
        sys.stdout.write("\n")
        print(
            f"[{completion.prompt_tokens} prompt tokens, {completion.completion_tokens} generated, "
            f"finish: {completion.finish_reason}; prefill {t.prefill_ms:.1f} ms, "
            f"decode {t.decode_tokens_per_s:.1f} tok/s]",
            file=sys.stderr,
        )
    return 0


def _bench(args: argparse.Namespace) -> int:
    if args.prompt_tokens < 1 or args.new_tokens < 1 or args.repeat < 1:
        raise AgentError("--prompt-tokens, --new-tokens and --repeat must be at least 1")
    if args.bandwidth_gbs is not None and not args.bandwidth_gbs > 0:
        raise AgentError("--bandwidth-gbs must be positive")
    if args.prefix_tokens < 0:
        raise AgentError("--prefix-tokens must be 0 or more")
    if not 1 <= args.concurrency <= 64:
        raise AgentError("--concurrency must lie in [1, 64]")
    # Repeated prompts would hit the prefix cache: the speed figures are cold ones, so it is off
    # unless --prefix-tokens asks to measure it.
    engine = _engine(args, **({} if args.prefix_tokens else {"prefix_cache_mb": 0}))
    traffic = model_weight_traffic(engine.folder.onnx_path)
    # A fixed, ordinary-looking prompt: the encoded text repeated to the length asked.
    seed_ids = engine.tokenizer.encode(
        "The quick brown fox jumps over the lazy dog. ", add_special_tokens=False
    )
    ids = (seed_ids * (args.prompt_tokens // max(1, len(seed_ids)) + 1))[: args.prompt_tokens]
    params = SamplingParams(max_tokens=args.new_tokens, ignore_eos=True)
    engine.generate(ids, params)  # warm-up: first-run allocations and prepacking
    if args.concurrency > 1:
        return _bench_batch(args, engine, ids, params)
    runs = [engine.generate(ids, params) for _ in range(args.repeat)]  # cold: the cache is off
    result: dict[str, Any] = {
        "model": engine.name,
        "threads": engine.threads,
        "prompt_tokens": args.prompt_tokens,
        "new_tokens": runs[0].completion_tokens,
        "prefill_tokens_per_s": statistics.median(r.timings.prefill_tokens_per_s for r in runs),
        "decode_tokens_per_s": statistics.median(r.timings.decode_tokens_per_s for r in runs),
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }
    # Added fields (the ones above are a contract: never change or remove them).
    decode = result["decode_tokens_per_s"]
    result["weight_bytes_total"] = traffic.total_bytes
    result["weight_bytes_per_token"] = traffic.bytes_per_token
    result["weight_read_gbs"] = traffic.read_gbs(decode)
    result["bandwidth_gbs"] = args.bandwidth_gbs
    result["max_decode_tokens_per_s"] = (
        traffic.max_tokens_per_s(args.bandwidth_gbs) if args.bandwidth_gbs is not None else None
    )
    result["concurrency"] = 1
    result["speculate"] = args.speculate
    result["drafted_tokens"] = sum(r.drafted_tokens for r in runs)
    result["accepted_tokens"] = sum(r.accepted_tokens for r in runs)
    result["acceptance_rate"] = (
        result["accepted_tokens"] / result["drafted_tokens"] if result["drafted_tokens"] else None
    )
    if args.prefix_tokens:
        result |= _bench_prefix(engine, seed_ids, args)
    if args.json:
        print(json.dumps(result))
    else:
        print(
            f"{result['model']}: pp{args.prompt_tokens} {result['prefill_tokens_per_s']:.1f} tok/s | "
            f"tg{result['new_tokens']} {decode:.1f} tok/s | "
            f"peak RSS {result['peak_rss_mb']:.0f} MB | {engine.threads} threads"
        )
        print(
            f"weights read per token: {traffic.bytes_per_token / 1e6:.3f} MB "
            f"(of {traffic.total_bytes / 1e6:.3f} MB; {result['weight_read_gbs']:.2f} GB/s at this decode speed)"
        )
        if args.speculate:
            rate = result["acceptance_rate"]
            print(
                f"speculation: {result['accepted_tokens']} of {result['drafted_tokens']} drafted tokens accepted"
                + (f" ({rate:.0%})" if rate is not None else " (nothing to copy: no drafts)")
            )
        if args.bandwidth_gbs is not None:
            print(
                f"projection: at {args.bandwidth_gbs:g} GB/s decode reaches at most "
                f"{result['max_decode_tokens_per_s']:.1f} tok/s (a bound from memory traffic, not a measurement)"
            )
        if args.prefix_tokens:
            print(
                f"prefix cache: {args.prefix_tokens}-token instruction + {args.prompt_tokens}-token input: "
                f"time to first token cold {result['ttft_cold_ms']:.1f} ms, warm {result['ttft_warm_ms']:.1f} ms "
                f"({100 * result['warm_vs_cold']:.1f} % of cold; {result['cached_tokens']} tokens cached)"
            )
    return 0


def _bench_prefix(engine: Engine, seed_ids: list[int], args: argparse.Namespace) -> dict[str, Any]:
    """Time to first token for a shared instruction + a new input each run: cold once, then warm."""
    if engine.prefix_cache is None:
        raise AgentError("--prefix-tokens needs the prefix cache: [engine] prefix_cache_mb must be above 0")
    n = args.prefix_tokens + args.prompt_tokens
    if n >= engine.context_length:
        raise AgentError(
            f"--prefix-tokens + --prompt-tokens must stay below the context ({engine.context_length})"
        )
    # The instruction: the seed text from its 2nd token on, so it differs from the speed runs' prompt.
    instruction: list[int] = (
        (seed_ids[1:] or seed_ids) * (args.prefix_tokens // max(1, len(seed_ids) - 1) + 1)
    )[: args.prefix_tokens]

    def job(run: int) -> list[int]:  # a new input each run: the instruction is the only shared part
        rotated: list[int] = seed_ids[run % len(seed_ids) :] + seed_ids[: run % len(seed_ids)]
        tokens: int = args.prompt_tokens
        return instruction + (rotated * (tokens // len(rotated) + 1))[:tokens]

    params = SamplingParams(max_tokens=1, ignore_eos=True)
    engine.prefix_cache.clear()
    engine.release_kept()  # nor the last run's positions in place
    cold = engine.generate(job(0), params)
    warm = [engine.generate(job(run), params) for run in range(1, args.repeat + 1)]
    warm_ms = statistics.median(w.timings.prefill_ms for w in warm)
    return {
        "prefix_tokens": args.prefix_tokens,
        "ttft_cold_ms": cold.timings.prefill_ms,
        "ttft_warm_ms": warm_ms,
        "warm_vs_cold": warm_ms / cold.timings.prefill_ms,
        "cached_tokens": min(w.cached_tokens for w in warm),
    }


def _bench_batch(args: argparse.Namespace, engine: Engine, ids: list[int], params: SamplingParams) -> int:
    """``bench --concurrency N``: N jobs of the same length (different text) decoded together."""
    from agent.engine.batch import Batcher

    aggregate: list[float] = []
    per_job: list[float] = []
    drafted = accepted = 0
    for _ in range(args.repeat):
        batcher = Batcher(
            engine,
            max_batch=args.concurrency,
            slot_tokens=len(ids) + args.new_tokens,
            speculate=engine.options.speculate,
        )
        # Each job starts at another offset of the prompt so that no two rows are the same sequence.
        jobs = [
            batcher.submit(ids[j % len(ids) :] + ids[: j % len(ids)], params) for j in range(args.concurrency)
        ]
        batcher.run()
        aggregate.append(batcher.decoded / batcher.decode_seconds if batcher.decode_seconds else 0.0)
        done = [j.completion for j in jobs if j.completion is not None]
        per_job += [c.timings.decode_tokens_per_s for c in done]
        drafted += sum(c.drafted_tokens for c in done)
        accepted += sum(c.accepted_tokens for c in done)
    result = {
        "model": engine.name,
        "threads": engine.threads,
        "prompt_tokens": args.prompt_tokens,
        "new_tokens": args.new_tokens,
        "concurrency": args.concurrency,
        "aggregate_decode_tokens_per_s": statistics.median(aggregate),
        "decode_tokens_per_s": statistics.median(per_job),
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "speculate": engine.options.speculate,
        "drafted_tokens": drafted,
        "accepted_tokens": accepted,
    }
    if args.json:
        print(json.dumps(result))
    else:
        print(
            f"{engine.name}: {args.concurrency} jobs together | aggregate decode "
            f"{result['aggregate_decode_tokens_per_s']:.1f} tok/s | per job {result['decode_tokens_per_s']:.1f} tok/s | "
            f"peak RSS {result['peak_rss_mb']:.0f} MB | {engine.threads} threads"
        )
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``edge-agent`` console script."""
    args = _parser().parse_args(argv)
    try:
        if args.command == "generate":
            return _generate(args)
        if args.command == "bench":
            return _bench(args)
        if args.command == "run":
            return _run(args)
        if args.command == "doctor":
            return _doctor(args)
        if args.command == "enroll":
            return _enroll(args)
        return _config_check(args)
    except AgentError as exc:
        print(f"edge-agent: error: {exc}", file=sys.stderr)
        return 1
    except ValueError as exc:  # pydantic's ValidationError: a flag out of range
        print(f"edge-agent: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
