"""Telemetry of speculation (drafted/accepted, acceptance rate) and batching (occupancy)."""

from __future__ import annotations

from agent.health.telemetry import JobStats
from edge_contract.protocol import Usage


def test_acceptance_rate_and_occupancy_cover_the_interval() -> None:
    stats = JobStats()
    empty = stats.snapshot_and_reset()
    assert empty.acceptance_rate is None and empty.batch_occupancy is None  # nothing measured: null
    stats.record_speculation(drafted=10, accepted=7)
    stats.record_speculation(drafted=10, accepted=1)
    stats.record_batch(busy_rows=12, passes=4, max_batch=4)  # 3 of 4 slots busy on average
    jobs = stats.snapshot_and_reset()
    assert (jobs.drafted_tokens, jobs.accepted_tokens, jobs.acceptance_rate) == (20, 8, 0.4)
    assert jobs.batch_occupancy == 0.75
    again = stats.snapshot_and_reset()
    assert (again.drafted_tokens, again.acceptance_rate, again.batch_occupancy) == (0, None, None)


def test_nonsense_counts_cannot_exceed_one() -> None:
    stats = JobStats()
    stats.record_speculation(drafted=2, accepted=5)
    stats.record_speculation(drafted=-3, accepted=-1)
    assert stats.snapshot_and_reset().acceptance_rate == 1.0


def test_usage_reports_drafted_and_accepted_tokens() -> None:
    usage = Usage(prompt_tokens=5, completion_tokens=9, drafted_tokens=8, accepted_tokens=6)
    assert Usage.model_validate_json(usage.model_dump_json()) == usage
    plain = Usage(prompt_tokens=5, completion_tokens=9)
    assert plain.model_dump(exclude_none=True) == {
        "prompt_tokens": 5,
        "completion_tokens": 9,
        "cached_tokens": 0,  # the prefix cache always reports
    }  # drafted/accepted absent, as before
