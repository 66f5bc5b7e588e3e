"""The README's main-job command: broker + agent + one streamed job, end to end."""

from __future__ import annotations

import subprocess
import sys

import pytest

from agent import Engine, SamplingParams
from tests.support.models import ROOT

pytestmark = pytest.mark.e2e


def test_quickstart_streams_the_demo_models_answer() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "edge_fleet.quickstart", "Is the device hot?", "--max-tokens", "40"],
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    engine = Engine(ROOT / "models" / "demo")
    ids = engine.prompt_ids(messages=[{"role": "user", "content": "Is the device hot?"}])
    expected = engine.generate(ids, SamplingParams(max_tokens=40)).text
    assert expected.strip(), "the demo model should answer something"
    assert proc.stdout == expected + "\n"
    assert "tokens, prefill" in proc.stderr
