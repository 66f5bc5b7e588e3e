"""The reconnection backoff and the reason codes in words."""

from __future__ import annotations

import random

from agent.backoff import Backoff
from agent.link.reasons import explain


def test_delays_grow_with_jitter_up_to_the_cap() -> None:
    backoff = Backoff(first_s=1.0, max_s=60.0, rng=random.Random(7))
    delays = [backoff.next_delay() for _ in range(10)]
    for n, delay in enumerate(delays):
        nominal = min(60.0, 2.0**n)
        assert nominal / 2 <= delay <= nominal
    assert len(set(delays)) == len(delays), "jittered: no two boxes retry in lock-step"
    assert max(delays) <= 60.0


def test_only_a_connection_that_stayed_up_resets_the_backoff() -> None:
    backoff = Backoff(first_s=1.0, stable_s=60.0, rng=random.Random(1))
    for _ in range(5):
        backoff.next_delay()
    # The broker accepts the connection and drops it a second later: no reset.
    backoff.connected(now=100.0)
    backoff.disconnected(now=101.0)
    assert backoff.next_delay() >= 16.0
    # Up for ten minutes, then lost: the next attempt comes quickly again.
    backoff.connected(now=200.0)
    backoff.disconnected(now=800.0)
    assert backoff.next_delay() <= 1.0


def test_reason_codes_name_their_cause_and_fix() -> None:
    assert "edge-fleet provision" in explain("Not authorized", "suback")
    assert "second agent" in explain("Session taken over", "disconnect")
    assert explain("Some new code", "connack") == "Some new code"
