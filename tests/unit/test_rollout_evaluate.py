"""The server's per-tick rollout decision (``edge_fleet.domain.evaluate``): pure, so every rule is
checked here in milliseconds — canary, thresholds, parallelism, timeouts, recovery, joins."""

from __future__ import annotations

from edge_fleet.domain.evaluate import (
    Advance,
    Event,
    Join,
    Mark,
    Observation,
    Observations,
    RolloutView,
    Send,
    SetState,
    TargetView,
    evaluate,
)


def _rollout(**changes: object) -> RolloutView:
    base = dict(
        id="demo@2.0.0/select:hw=pi5", state="running", wave=0, waves=3, canary=True, max_failure_rate=0.5,
        max_parallel=0, timeout=60.0, accepted_failures=0, resume_on_recovery=False,
    )  # fmt: skip
    base.update(changes)
    return RolloutView(**base)  # type: ignore[arg-type]


def _targets(*rows: tuple[str, int, str]) -> dict[str, TargetView]:
    return {d: TargetView(d, w, s, sent_at=100.0 if s != "pending" else None) for d, w, s in rows}  # type: ignore[arg-type]


def _online(*devices: str, **outcomes: tuple[str, str | None]) -> dict[str, Observation]:
    return {d: Observation(True, outcomes.get(d.replace("-", "_"))) for d in devices}  # type: ignore[arg-type]


def _of(actions: list[object], kind: type) -> list[object]:
    return [a for a in actions if isinstance(a, kind)]


PLAN = (("c", 0, "pending"), ("a", 1, "pending"), ("b", 1, "pending"), ("d", 2, "pending"))


def test_the_canary_goes_first_and_alone() -> None:
    actions = evaluate(_rollout(), _targets(*PLAN), Observations(101.0, _online("a", "b", "c", "d")))
    assert _of(actions, Send) == [Send(("c",))]
    assert any(isinstance(a, Event) and "canary" in a.text for a in actions)


def test_a_failing_canary_halts_before_any_other_device_is_sent() -> None:
    targets = _targets(("c", 0, "sent"), *PLAN[1:])
    obs = Observations(101.0, _online("a", "b", "c", "d", c=("failed", "smoke_test_failed: bad")))
    actions = evaluate(_rollout(), targets, obs)
    assert _of(actions, Send) == []  # the positive control is the next test: a good canary sends wave 2
    [halt] = _of(actions, SetState)
    assert (
        halt == SetState("halted", halt.reason)
        and "canary" in (halt.reason or "")
        and "c" in (halt.reason or "")
    )
    assert Mark({"c": ("failed", "smoke_test_failed: bad")}) in actions


def test_a_good_canary_finishes_its_wave_and_the_next_one_starts() -> None:
    targets = _targets(("c", 0, "sent"), *PLAN[1:])
    actions = evaluate(
        _rollout(), targets, Observations(101.0, _online("a", "b", "c", "d", c=("active", None)))
    )
    assert Advance(1) in actions and not _of(actions, SetState)
    after = _targets(("c", 0, "active"), *PLAN[1:])
    assert _of(evaluate(_rollout(wave=1), after, Observations(102.0, _online("a", "b", "c", "d"))), Send) == [
        Send(("a", "b"))
    ]


def test_a_wave_halts_only_above_its_failure_rate() -> None:
    wave = _targets(("c", 0, "active"), ("a", 1, "sent"), ("b", 1, "sent"), ("d", 2, "pending"))
    one = Observations(101.0, _online("a", "b", "c", "d", a=("failed", "x")))
    assert not _of(evaluate(_rollout(wave=1), wave, one), SetState)  # 1 of 2 = 50 %: at the limit
    two = Observations(101.0, _online("a", "b", "c", "d", a=("failed", "x"), b=("failed", "y")))
    [halt] = _of(evaluate(_rollout(wave=1), wave, two), SetState)
    assert halt.state == "halted" and "2 of 2 devices of the wave 2 failed" in (halt.reason or "")  # type: ignore[attr-defined]
    # Failures accepted by a resume do not count again.
    assert not _of(evaluate(_rollout(wave=1, accepted_failures=1), wave, two), SetState)


def test_max_parallel_limits_devices_updating_at_once() -> None:
    rows = [(f"d{i}", 0, "pending") for i in range(5)]
    rollout = _rollout(canary=False, waves=1, max_parallel=2)
    obs = Observations(101.0, _online(*(f"d{i}" for i in range(5))))
    assert _of(evaluate(rollout, _targets(*rows), obs), Send) == [Send(("d0", "d1"))]
    rows[0], rows[1] = ("d0", 0, "sent"), ("d1", 0, "active")
    assert _of(evaluate(rollout, _targets(*rows), obs), Send) == [Send(("d2",))]  # one slot free


def test_online_devices_are_sent_before_offline_ones() -> None:
    rollout = _rollout(canary=False, waves=1, max_parallel=1)
    obs = Observations(101.0, {"a": Observation(False), "b": Observation(True)})
    assert _of(evaluate(rollout, _targets(("a", 0, "pending"), ("b", 0, "pending")), obs), Send) == [
        Send(("b",))
    ]


def test_a_silent_device_times_out_and_counts_as_failed() -> None:
    rollout = _rollout(canary=False, waves=1, max_failure_rate=0.0)
    targets = _targets(("a", 0, "sent"), ("b", 0, "active"))
    early = evaluate(rollout, targets, Observations(159.0, {"a": Observation(False), "b": Observation(True)}))
    assert early == []  # the positive control: within the timeout nothing happens
    late = evaluate(rollout, targets, Observations(161.0, {"a": Observation(False), "b": Observation(True)}))
    assert Mark({"a": ("timed_out", "offline within the wave timeout of 60 s")}) in late
    assert any(isinstance(a, SetState) and a.state == "halted" for a in late)


def test_a_halted_rollout_says_when_its_failing_devices_recover_and_continues_by_policy() -> None:
    targets = _targets(("c", 0, "failed"), *PLAN[1:])
    recovered = Observations(200.0, _online("a", "b", "c", "d", c=("active", None)))
    stay = evaluate(_rollout(state="halted", reason="1 of 1 failed"), targets, recovered)
    assert any(isinstance(a, Event) and "recovered" in a.text for a in stay)
    assert [a.state for a in _of(stay, SetState)] == ["halted"]  # type: ignore[attr-defined]
    go = evaluate(_rollout(state="halted", resume_on_recovery=True), targets, recovered)
    assert [a.state for a in _of(go, SetState)] == ["running"]  # type: ignore[attr-defined]
    # Nothing changed: nothing said.
    assert evaluate(_rollout(state="halted"), targets, Observations(200.0, _online("a", "b", "c", "d"))) == []


def test_devices_that_come_to_match_join_the_next_wave() -> None:
    targets = _targets(("c", 0, "sent"), *PLAN[1:])
    obs = Observations(101.0, _online("a", "b", "c", "d"), matching=("a", "b", "c", "d", "new"))
    assert Join(("new",), 1) in evaluate(_rollout(), targets, obs)


def test_the_last_wave_finishing_ends_the_rollout() -> None:
    targets = _targets(("c", 0, "active"), ("a", 1, "active"), ("b", 1, "active"), ("d", 2, "sent"))
    actions = evaluate(
        _rollout(wave=2), targets, Observations(101.0, _online("a", "b", "c", "d", d=("active", None)))
    )
    assert Advance(3) in actions and SetState("done", None) in actions


def test_finished_rollouts_only_record_late_outcomes() -> None:
    targets = _targets(("a", 0, "timed_out"))
    actions = evaluate(
        _rollout(state="done", waves=1), targets, Observations(1.0, _online("a", a=("active", None)))
    )
    assert actions == [Mark({"a": ("active", None)})]


def test_deferred_offline_devices_are_not_waited_for_and_the_rollout_ends_waiting() -> None:
    rollout = _rollout(canary=False, waves=1, defer_offline=True)
    obs = Observations(101.0, {"a": Observation(True), "b": Observation(False)})
    [send] = _of(evaluate(rollout, _targets(("a", 0, "pending"), ("b", 0, "pending")), obs), Send)
    assert send == Send(("a", "b"), deferred=("b",))
    after = _targets(("a", 0, "sent"), ("b", 0, "deferred"))
    ended = evaluate(
        rollout, after, Observations(102.0, {**obs.devices, "a": Observation(True, ("active", None))})
    )
    [state] = _of(ended, SetState)
    assert state.state == "waiting" and "b" in (state.reason or "")  # type: ignore[attr-defined]
    # The deferred device reports: done.
    back = Observations(
        500.0, {"a": Observation(True, ("active", None)), "b": Observation(True, ("active", None))}
    )
    done = evaluate(
        _rollout(canary=False, waves=1, state="waiting", wave=1),
        _targets(("a", 0, "active"), ("b", 0, "deferred")),
        back,
    )
    assert SetState("done", None) in done and Mark({"b": ("active", None)}) in done


def test_the_cumulative_rule_counts_every_wave_so_far() -> None:
    targets = _targets(("a", 0, "failed"), ("b", 1, "active"), ("c", 1, "sent"), ("d", 1, "sent"))
    obs = Observations(101.0, _online("a", "b", "c", "d"))
    lab = _rollout(canary=False, waves=2, wave=1, max_failure_rate=0.2, cumulative=True)
    [halt] = _of(evaluate(lab, targets, obs), SetState)
    assert halt.reason == "1 of 4 devices in waves 1-2 failed (limit 20%)"  # type: ignore[attr-defined]
    per_wave = _rollout(canary=False, waves=2, wave=1, max_failure_rate=0.2)
    assert not _of(evaluate(per_wave, targets, obs), SetState)  # wave 2 has no failure
