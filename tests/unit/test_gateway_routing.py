"""The gateway's routing decision: a pure function of the candidates and their state (milliseconds)."""

from __future__ import annotations

from edge_fleet.server.gateway.routing import Candidate, Target, choose, load, parse_target, why_none

NOW = 1000.0


def _box(name: str, **state: object) -> Candidate:
    fields: dict[str, object] = {"online": True, "group": "shop-3", "model": "phi3"}
    fields.update(state)
    return Candidate(device_id=name, **fields)  # type: ignore[arg-type]


def test_targets_are_model_names_groups_and_devices() -> None:
    assert parse_target("phi3") == Target("model", "phi3")
    assert parse_target("phi3:latest") == Target("model", "phi3")  # Ollama's tag
    assert parse_target("group:shop-3") == Target("group", "shop-3")
    assert parse_target("device:shop-3-till-1") == Target("device", "shop-3-till-1")
    assert parse_target("device:shop-3-till-1").label == "device:shop-3-till-1"


def test_only_online_boxes_serving_the_model_and_not_shedding_are_chosen() -> None:
    boxes = [
        _box("a"),
        _box("b", online=False),
        _box("c", model="llama"),
        _box("d", shedding=True, healthy=False),
        _box("e"),
    ]
    assert choose(Target("model", "phi3"), boxes, now=NOW) == ["a", "e"]
    assert choose(Target("model", "llama"), boxes, now=NOW) == ["c"]
    assert choose(Target("model", "mistral"), boxes, now=NOW) == []


def test_groups_and_devices_name_boxes_whatever_they_serve() -> None:
    boxes = [_box("a", group="shop-3"), _box("b", group="shop-4", model="llama"), _box("c", online=False)]
    assert choose(Target("group", "shop-4"), boxes, now=NOW) == ["b"]
    assert choose(Target("device", "a"), boxes, now=NOW) == ["a"]
    assert choose(Target("device", "c"), boxes, now=NOW) == []  # offline: not even a named device


def test_the_least_loaded_box_comes_first() -> None:
    boxes = [
        _box("a", in_flight=2),
        _box("b", in_flight=0, queue_depth=3, telemetry_age_s=1.0, telemetry_interval_s=10.0),
        _box("c", in_flight=1),
    ]
    assert choose(Target("model", "phi3"), boxes, now=NOW) == ["c", "a", "b"]
    # The queue depth of stale telemetry (more than three intervals old) no longer counts.
    stale = _box("b", queue_depth=3, telemetry_age_s=31.0, telemetry_interval_s=10.0)
    assert load(stale) == 0 and load(boxes[1]) == 3


def test_healthy_before_degraded_and_recent_refusals_last() -> None:
    boxes = [
        _box("a", healthy=False),  # degraded for a reason that does not shed (low_disk)
        _box("b", refused_until=NOW + 1),  # said busy a moment ago
        _box("c", in_flight=3),
        _box("d", refused_until=NOW - 1),  # its refusal is over
    ]
    assert choose(Target("model", "phi3"), boxes, now=NOW) == ["d", "c", "b", "a"]


def test_ties_go_to_the_box_given_a_job_least_recently_and_excluded_ones_are_skipped() -> None:
    boxes = [_box("a", last_assigned=5.0), _box("b", last_assigned=3.0), _box("c", last_assigned=4.0)]
    assert choose(Target("model", "phi3"), boxes, now=NOW) == ["b", "c", "a"]
    assert choose(Target("model", "phi3"), boxes, now=NOW, exclude=frozenset({"b"})) == ["c", "a"]


def test_why_none_names_the_reason_and_the_fix() -> None:
    boxes = [_box("a", online=False), _box("b", model="llama", shedding=True)]
    assert "GET /v1/models" in why_none(Target("model", "mistral"), boxes)
    assert "offline" in why_none(Target("model", "phi3"), boxes)
    assert "sheds load" in why_none(Target("model", "llama"), boxes)
    assert "refused" in why_none(Target("group", "shop-3"), [_box("a")], frozenset({"a"}))
