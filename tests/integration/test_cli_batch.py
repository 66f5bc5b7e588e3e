"""``edge-agent bench --concurrency N`` and ``--speculate``, run as a user runs them."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from tests.support.agent import agent_python

pytestmark = pytest.mark.e2e  # the command line as a subprocess, as a user runs it


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*agent_python(), "-m", "agent.cli", *args], capture_output=True, text=True, timeout=120, check=False
    )


def test_bench_concurrency_reports_aggregate_and_per_job_speed(phi3_dir: Path) -> None:
    proc = _cli("bench", str(phi3_dir), "--new-tokens", "12", "--repeat", "1", "--concurrency", "3", "--json")
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert out["concurrency"] == 3 and out["new_tokens"] == 12
    assert out["aggregate_decode_tokens_per_s"] > 0 and out["decode_tokens_per_s"] > 0
    text = _cli("bench", str(phi3_dir), "--new-tokens", "8", "--repeat", "1", "--concurrency", "2")
    assert text.returncode == 0 and "2 jobs together" in text.stdout


def test_bench_speculate_reports_drafted_and_accepted_tokens(phi3_dir: Path) -> None:
    proc = _cli("bench", str(phi3_dir), "--new-tokens", "24", "--repeat", "1", "--speculate", "--json")
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert out["speculate"] is True
    assert 0 <= out["accepted_tokens"] <= out["drafted_tokens"]
    plain = json.loads(_cli("bench", str(phi3_dir), "--new-tokens", "24", "--repeat", "1", "--json").stdout)
    assert plain["speculate"] is False and plain["drafted_tokens"] == 0


def test_bench_speculates_in_a_batch(phi3_dir: Path) -> None:
    args = ("--new-tokens", "24", "--repeat", "1", "--concurrency", "2", "--json")
    both = _cli("bench", str(phi3_dir), "--speculate", *args)
    assert both.returncode == 0, both.stderr
    out = json.loads(both.stdout)
    assert out["speculate"] is True and out["concurrency"] == 2
    assert 0 <= out["accepted_tokens"] <= out["drafted_tokens"] and out["aggregate_decode_tokens_per_s"] > 0
    plain = json.loads(_cli("bench", str(phi3_dir), *args).stdout)
    assert plain["speculate"] is False and plain["drafted_tokens"] == 0


def test_bench_refuses_bad_flags(phi3_dir: Path) -> None:
    zero = _cli("bench", str(phi3_dir), "--concurrency", "0")
    assert zero.returncode == 1 and "--concurrency must lie in [1, 64]" in zero.stderr
