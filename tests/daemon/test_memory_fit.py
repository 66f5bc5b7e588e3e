"""A real daemon sizes its budgets from the box's memory, and refuses at start a configuration that cannot fit."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

pytestmark = pytest.mark.e2e


def test_a_budget_the_box_cannot_hold_is_refused_at_start_with_the_setting_to_lower(
    agents: Callable[..., Any],
) -> None:
    # 1,000,000 MiB of prefix cache: no test machine has it.
    refused = agents(engine={"prefix_cache_mb": 1_000_000})
    refused.start(wait_online=False)
    assert refused.proc is not None
    assert refused.proc.wait(timeout=60) != 0
    lines = [line for line in refused.log_text().splitlines() if "engine.prefix_cache_mb:" in line]
    assert lines, refused.log_text()
    assert "lower [engine] prefix_cache_mb" in lines[-1]

    # Positive control: the same box and model with the budget left unset comes online, sized.
    sized = agents()
    sized.start()
    assert "expected peak ~" in sized.log_text()
    assert "context 256 tokens, prefix cache 256 MiB" in sized.log_text()


def test_an_int8_kv_cache_the_folder_lacks_is_refused_at_start_naming_the_fix(
    agents: Callable[..., Any],
) -> None:
    # The fixture folder has one graph (float32 KV): no int8 cache to serve.
    refused = agents(engine={"kv_cache": "int8"})
    refused.start(wait_online=False)
    assert refused.proc is not None
    assert refused.proc.wait(timeout=60) != 0
    lines = [line for line in refused.log_text().splitlines() if "engine.kv_cache:" in line]
    assert lines, refused.log_text()
    assert "has no int8 KV cache (it has float32)" in lines[-1] and "python -m models.convert" in lines[-1]

    # Positive control: float32, which it has, comes online and says so.
    served = agents(engine={"kv_cache": "float32"})
    served.start()
    assert "float32 KV cache (set in [engine] kv_cache)" in served.log_text()
