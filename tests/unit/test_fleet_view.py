"""The operator's model of the fleet, the live table, and rollout wave planning (pure units)."""

from __future__ import annotations

import argparse

import pytest

from edge_contract.protocol import ErrorInfo, Health, ModelRef, ModelState, Status, UpdateStatus
from edge_contract.telemetry import JobsTelemetry, Telemetry, Temperature
from edge_fleet.fleet_view import FleetView
from edge_fleet.rollout import parse_waves, plan_waves
from edge_fleet.views import render, sort_rows


def _feed(
    view: FleetView, device: str, *, group: str = "shop", temp: float | None = None, phase: str | None = None
) -> None:
    view.feed(
        f"edge/{device}/status",
        Status(
            online=True,
            device_id=device,
            group=group,
            model=ModelRef(name="m", version="1.0.0"),
            health=Health(verdict="ok"),
        )
        .model_dump_json()
        .encode(),
    )
    if phase:
        update = UpdateStatus(
            name="m",
            version="2.0.0",
            phase=phase,
            error=ErrorInfo(code="smoke_test_failed", message="x") if phase == "failed" else None,
        )  # type: ignore[arg-type]
        view.feed(
            f"edge/{device}/model/state",
            ModelState(device_id=device, active=ModelRef(name="m", version="1.0.0"), update=update)
            .model_dump_json()
            .encode(),
        )
    if temp is not None:
        tele = Telemetry(
            device_id=device,
            ts=0,
            interval_s=10,
            temperature=Temperature(soc_c=temp),
            jobs=JobsTelemetry(queue_depth=2, decode_tok_s=9.5),
            health=Health(verdict="degraded" if temp > 80 else "ok", reasons=["hot"] if temp > 80 else []),
        )
        view.feed(f"edge/{device}/telemetry", tele.model_dump_json().encode())


def test_rows_merge_status_model_state_and_telemetry() -> None:
    view = FleetView()
    _feed(view, "b", temp=85.0, phase="failed")
    _feed(view, "a", group="other", temp=50.0, phase="downloading")
    [b] = view.rows("shop")
    assert (b.device, b.online, b.health, b.version, b.update_phase, b.update_error) == (
        "b",
        True,
        "degraded",
        "1.0.0",
        "failed",
        "smoke_test_failed",
    )
    assert (b.temp_c, b.queue, b.tok_s) == (85.0, 2, 9.5)
    assert [r.device for r in view.rows()] == ["a", "b"]
    assert FleetView.summary(view.rows()) == {"devices": 2, "online": 2, "degraded": 1, "updating": 1, "failed": 1}  # fmt: skip


def test_broken_and_foreign_messages_are_counted_and_ignored() -> None:
    view = FleetView()
    assert view.feed("edge/x/status", b"{not json") is None
    assert view.feed("edge/x/telemetry", b'{"type": "telemetry"}') is None
    assert view.feed("edge/groups/g/jobs", b"{}") is None
    assert view.feed("other/x/status", b"{}") is None
    assert view.rejected == 2 and view.devices == {}
    # An empty retained status (deleted) forgets it without an error.
    _feed(view, "x")
    assert view.feed("edge/x/status", b"") == ("x", "status")
    assert view.rows()[0].online is None


def test_sorting_puts_unknown_values_last_both_ways() -> None:
    view = FleetView()
    _feed(view, "a", temp=60.0)
    _feed(view, "b")
    _feed(view, "c", temp=40.0)
    rows = view.rows()
    assert [r.device for r in sort_rows(rows, "temp")] == ["c", "a", "b"]
    assert [r.device for r in sort_rows(rows, "temp", reverse=True)] == ["a", "c", "b"]


def test_render_fits_the_screen_and_says_what_is_cut() -> None:
    view = FleetView()
    for i in range(30):
        _feed(view, f"box-{i:02d}", temp=50.0 + i)
    text = render(view.rows(), sort="temp", reverse=True, width=60, height=12, group=None)
    lines = text.splitlines()
    assert len(lines) <= 12 and all(len(line) <= 60 for line in lines)
    assert "devices 30  online 30" in lines[1]
    assert lines[4].startswith("box-29") and "… 23 more" in lines[-1]


@pytest.mark.parametrize(
    ("count", "percents", "minimum", "sizes"),
    [
        (1000, [1, 10, 50, 100], 1, [10, 90, 400, 500]),
        (20, [10, 50, 100], 1, [2, 8, 10]),
        (10, [1, 10, 50, 100], 1, [1, 1, 3, 5]),
        (10, [1, 10, 50, 100], 4, [4, 4, 2, 0]),
        (3, [50], 1, [2]),
    ],
)
def test_waves_reach_their_share_with_a_minimum_size(
    count: int, percents: list[float], minimum: int, sizes: list[int]
) -> None:
    devices = [f"d{i}" for i in range(count)]
    waves = plan_waves(devices, percents, minimum)
    assert [len(w) for w in waves] == sizes
    assert [d for w in waves for d in w] == devices[: sum(sizes)]


@pytest.mark.parametrize("text", ["", "10%,5%", "0%", "150%", "a,b", "10%,10%"])
def test_bad_wave_lists_are_refused(text: str) -> None:
    with pytest.raises(argparse.ArgumentTypeError):
        parse_waves(text)
    assert parse_waves("1%, 10%,50%,100") == [1, 10, 50, 100]


def test_watch_shows_whole_error_codes_groups_and_a_problems_filter() -> None:
    view = FleetView()
    _feed(view, "ok-box")
    _feed(view, "bad-box", phase="failed")
    rows = view.rows()
    text = render(rows, sort="device", reverse=False, width=200, height=20, group=None)
    assert "2.0.0 failed (smoke_test_failed)" in text and "GROUP" in text
    assert "(s sort, r reverse, p problems, q quit)" in text
    only = render(rows, sort="device", reverse=False, width=200, height=20, group=None, problems=True)
    assert "bad-box" in only and "ok-box" not in only and "problems only" in only
