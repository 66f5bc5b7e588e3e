"""The ``edge-agent`` command line, run as a user runs it: a real process."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from agent import Engine, Timings
from tests.support.agent import agent_python
from tests.support.reference import greedy

pytestmark = pytest.mark.e2e


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*agent_python(), "-m", "agent.cli", *args], capture_output=True, text=True, timeout=120, check=False
    )


def test_generate_json_contract(phi3_dir: Path, phi3_engine: Engine) -> None:
    proc = _cli("generate", str(phi3_dir), "The quick brown fox", "--max-tokens", "12", "--json", "--raw")
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert set(out) >= {"token_ids", "text", "finish_reason", "prompt_tokens", "completion_tokens", "timings"}
    assert set(out["timings"]) == set(Timings.model_fields)
    # What holds on every architecture: the tokenizer's count, and the token budget.
    assert out["prompt_tokens"] == len(phi3_engine.prompt_ids("The quick brown fox"))
    assert 1 <= out["completion_tokens"] == len(out["token_ids"]) <= 12
    # The tokens themselves: against the engine on the CLI's own architecture and kernels.
    expected = greedy(phi3_dir, prompt="The quick brown fox", max_tokens=12)
    assert out["token_ids"] == expected.token_ids
    assert out["text"] == expected.text
    assert out["finish_reason"] == expected.finish_reason


def test_generate_streams_text_to_stdout(phi3_dir: Path) -> None:
    proc = _cli("generate", str(phi3_dir), "Hello", "--max-tokens", "10", "--temperature", "0", "--raw")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == greedy(phi3_dir, prompt="Hello", max_tokens=10).text + "\n"
    assert "prompt tokens" in proc.stderr


def test_the_demo_model_answers_the_readme_prompt_in_its_chat_template_by_default() -> None:
    from tests.support.models import ROOT

    demo = ROOT / "models" / "demo"
    chat = greedy(demo, messages=[{"role": "user", "content": "Why is the sky blue?"}], max_tokens=40)
    proc = _cli("generate", str(demo), "Why is the sky blue?", "--max-tokens", "40")
    assert proc.returncode == 0, proc.stderr
    assert chat.text.strip() and proc.stdout == chat.text + "\n"  # an answer, not an empty line
    raw = _cli("generate", str(demo), "Why is the sky blue?", "--max-tokens", "40", "--raw", "--json")
    assert json.loads(raw.stdout)["prompt_tokens"] < chat.prompt_tokens  # as is: no template around it


def test_generate_chat_and_seed(phi3_dir: Path) -> None:
    args = ("generate", str(phi3_dir), "hi", "--json", "--temperature", "0.9", "--seed", "5")
    first, second = _cli(*args), _cli(*args)
    assert first.returncode == 0, first.stderr
    assert json.loads(first.stdout)["token_ids"] == json.loads(second.stdout)["token_ids"]
    assert json.loads(first.stdout)["prompt_tokens"] > 3  # the template wrapped the message


def test_bench_json(phi3_dir: Path) -> None:
    proc = _cli(
        "bench", str(phi3_dir), "--prompt-tokens", "32", "--new-tokens", "16", "--repeat", "1", "--json"
    )
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert out["prompt_tokens"] == 32 and out["new_tokens"] == 16
    assert out["prefill_tokens_per_s"] > 0 and out["decode_tokens_per_s"] > 0 and out["peak_rss_mb"] > 0
    assert 0 < out["weight_bytes_per_token"] < out["weight_bytes_total"]
    assert out["bandwidth_gbs"] is None and out["max_decode_tokens_per_s"] is None
    assert "ttft_warm_ms" not in out  # the cache is measured only when asked


def test_bench_prefix_tokens_measures_a_warm_run(phi3_dir: Path) -> None:
    args = ("--prompt-tokens", "16", "--new-tokens", "4", "--repeat", "2", "--prefix-tokens", "150")
    proc = _cli("bench", str(phi3_dir), *args, "--json")
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert out["prefix_tokens"] == 150
    assert out["cached_tokens"] == 150  # the instruction to its last token
    assert out["ttft_warm_ms"] > 0 and out["ttft_cold_ms"] > 0
    assert out["warm_vs_cold"] == out["ttft_warm_ms"] / out["ttft_cold_ms"]
    too_long = _cli("bench", str(phi3_dir), "--prompt-tokens", "16", "--prefix-tokens", "250")
    assert too_long.returncode == 1 and "below the context (256)" in too_long.stderr


def test_errors_are_one_clear_line(tmp_path: Path, phi3_dir: Path) -> None:
    missing = _cli("generate", str(tmp_path / "absent"), "x")
    assert missing.returncode == 1
    assert "model folder not found" in missing.stderr and "Traceback" not in missing.stderr
    bad = _cli("generate", str(phi3_dir), "x", "--top-p", "2")
    assert bad.returncode == 2 and "--top-p" in bad.stderr and "Traceback" not in bad.stderr
