"""The whole loop on one machine: a local broker, the agent on the demo model, one streamed job.

    python -m edge_fleet.quickstart [--model models/demo] [PROMPT]

Uses the system's mosquitto (installed with apt-get when missing and run as
root) on a free port with a throw-away config, starts ``edge-agent run``,
submits the prompt over MQTT 5 and prints the answer as it streams.
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from edge_contract.protocol import ChatMessage, Chunk, JobRequest, Topics

from .broker import BrokerOptions
from .submit import JobFailed, Submitter

REPO = Path(__file__).resolve().parents[2]


def _mosquitto() -> str:
    found = shutil.which("mosquitto") or (
        "/usr/sbin/mosquitto" if Path("/usr/sbin/mosquitto").exists() else None
    )
    if found:
        return found
    if os.geteuid() == 0 and shutil.which("apt-get"):
        print("installing mosquitto with apt-get…", file=sys.stderr)
        subprocess.run(["apt-get", "update", "-qq"], check=True)
        subprocess.run(
            ["apt-get", "install", "-y", "-qq", "mosquitto"],
            check=True,
            env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"},
        )
        return shutil.which("mosquitto") or "/usr/sbin/mosquitto"
    raise SystemExit(
        "quickstart needs mosquitto: install it (e.g. `sudo apt-get install mosquitto`) and run again"
    )


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait_port(port: int, proc: subprocess.Popen[bytes], what: str) -> None:
    end = time.monotonic() + 15
    while time.monotonic() < end:
        if proc.poll() is not None:
            raise SystemExit(f"{what} exited at start (code {proc.returncode})")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.05)
    raise SystemExit(f"{what} did not start listening on port {port}")


def main(argv: list[str] | None = None) -> int:
    """Run the quickstart; returns the process exit code."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("prompt", nargs="?", default="Is the device hot?")
    parser.add_argument("--model", type=Path, default=REPO / "models" / "demo")
    parser.add_argument("--max-tokens", type=int, default=120)
    args = parser.parse_args(argv)
    if not (args.model / "genai_config.json").is_file():
        # The demo model ships with the source checkout (models/demo), not with the wheel.
        print(
            f"quickstart: {args.model} is no model folder (no genai_config.json): pass --model DIR, or run "
            "`make demo` in a clone of edge-agent, which has the demo model in models/demo",
            file=sys.stderr,
        )
        return 2

    with tempfile.TemporaryDirectory(prefix="edge-quickstart-") as tmp:
        work = Path(tmp)
        port = _free_port()
        (work / "mosquitto.conf").write_text(f"user root\nlistener {port} 127.0.0.1\nallow_anonymous true\n")
        broker = subprocess.Popen(
            [_mosquitto(), "-c", str(work / "mosquitto.conf")], stderr=subprocess.DEVNULL
        )
        agent: subprocess.Popen[bytes] | None = None
        try:
            _wait_port(port, broker, "mosquitto")
            (work / "agent.toml").write_text(
                f'device_id = "demo-box"\nstate_dir = "{work / "state"}"\n'
                f'[model]\npath = "{args.model.resolve()}"\n[mqtt]\nhost = "127.0.0.1"\nport = {port}\n'
                # A throw-away broker on loopback in a temporary folder: plain TCP, said explicitly
                # (the agent warns about it at start).
                "allow_plaintext = true\n"
            )
            agent = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "agent.cli",
                    "run",
                    "--config",
                    str(work / "agent.toml"),
                    "--log-level",
                    "WARNING",
                ]
            )
            print(f"broker on 127.0.0.1:{port}, agent demo-box serving {args.model.name}", file=sys.stderr)
            print(f"> {args.prompt}", file=sys.stderr)
            request = JobRequest(
                id="quickstart-1",
                messages=[ChatMessage(role="user", content=args.prompt)],
                max_tokens=args.max_tokens,
                stream=True,
            )

            def show(chunk: Chunk) -> None:
                sys.stdout.write(chunk.text)
                sys.stdout.flush()

            with Submitter(BrokerOptions("127.0.0.1", port, plaintext=True)) as submitter:
                submitter.wait_online("demo-box")
                result = submitter.run(Topics("edge", "demo-box").jobs, request, on_chunk=show, timeout=120)
            print()
            if result.status != "succeeded":
                print(f"job {result.status}: {result.error}", file=sys.stderr)
                return 1
            t = result.timings
            speed = f"prefill {t.prefill_ms:.1f} ms, decode {t.decode_tokens_per_s:.0f} tok/s, " if t else ""
            print(
                f"[{result.usage.completion_tokens} tokens, {speed}finish: {result.finish_reason}]",
                file=sys.stderr,
            )
            bin_dir = Path(sys.executable).parent
            if (bin_dir / "activate").exists() and str(bin_dir) not in os.environ.get("PATH", "").split(":"):
                print(
                    f"edge-agent and edge-fleet are in {bin_dir}: `. {bin_dir / 'activate'}` puts them on PATH",
                    file=sys.stderr,
                )
            return 0
        except JobFailed as exc:
            print(f"quickstart failed: {exc}", file=sys.stderr)
            return 1
        finally:
            if agent is not None:
                agent.terminate()
                agent.wait(timeout=30)
            broker.terminate()
            broker.wait(timeout=10)


if __name__ == "__main__":
    sys.exit(main())
