"""The dashboard's server side in-process (FastAPI's TestClient, SQLite, no broker): telemetry
history with its retention, browser sessions with CSRF, the page's headers, the routes it reads."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from edge_contract.telemetry import JobCounts, JobsTelemetry, Telemetry
from edge_fleet.server.app import create_app
from edge_fleet.server.dashboard.history import History, Point, point_of
from edge_fleet.server.db import Database
from edge_fleet.server.store import Seen, Store


@pytest.fixture()
def store(tmp_path: Path) -> Store:
    s = Store(Database(str(tmp_path / "server.sqlite3")))
    s.observe([Seen("box-1", "shop", True, time.time(), "assistant", "1.0.0", "ok", "0.1.0")])
    return s


def _tele(ts: float, total: int, interval: int, tok_s: float | None = 10.0) -> Telemetry:
    return Telemetry(
        device_id="box-1", ts=ts, interval_s=10.0,
        jobs=JobsTelemetry(total=JobCounts(succeeded=total), interval=JobCounts(succeeded=interval), decode_tok_s=tok_s),
    )  # fmt: skip


def test_jobs_per_interval_come_from_the_totals_and_from_the_interval_after_a_restart() -> None:
    first = point_of(_tele(100.0, 5, 5), None)
    assert (first.jobs, first.span) == (5.0, 10.0)  # no earlier message: the interval's counts
    later = point_of(_tele(130.0, 11, 2), _tele(100.0, 5, 5))  # two messages missed in between
    assert (later.jobs, later.span) == (6.0, 30.0)
    restarted = point_of(_tele(140.0, 1, 1), _tele(130.0, 11, 2))  # totals went down
    assert (restarted.jobs, restarted.span) == (1.0, 10.0)


def _point(at: float, temp: float, jobs: float = 1.0) -> Point:
    return Point("box-1", at, 10.0, 0, 10.0, temp, 2000.0, 0.0, jobs, None)


def test_history_keeps_a_day_at_full_resolution_then_5_minute_means_then_nothing(store: Store) -> None:
    history = History(store.db, full_s=3600, bucket_s=300, keep_s=7200)
    now = 1_000_000.0 * 300  # on a bucket boundary
    history.add([_point(now - 7500 + 10 * i, 50.0 + i % 2) for i in range(30)])  # beyond keep_s
    history.add([_point(now - 5400 + 10 * i, 40.0 + 2 * (i % 2)) for i in range(30)])  # 300 s old-ish
    history.add([_point(now - 600 + 10 * i, 60.0) for i in range(30)])  # within full_s
    merged, dropped = history.compact(now)
    assert merged == 60 and dropped > 0
    rows = history.points("box-1", now - 10_000, now)
    full = [p for p in rows if p.res == 0]
    buckets = [p for p in rows if p.res == 300]
    assert len(full) == 30 and all(p.temp_c == 60.0 for p in full)  # positive control: untouched
    assert (
        len(buckets) == 1 and buckets[0].temp_c == 41.0 and buckets[0].jobs == 30.0 and buckets[0].span == 300
    )
    assert not [p for p in rows if p.at < now - 7200]  # pruned past the bound
    assert history.compact(now) == (0, 0)  # nothing left to do


def test_a_message_recorded_twice_is_kept_once(store: Store) -> None:
    history = History(store.db)  # (two servers on one database both record every message)
    history.add([_point(100.0, 50.0), _point(110.0, 51.0)])
    history.add([_point(110.0, 51.0), _point(120.0, 52.0)])
    assert [p.at for p in history.points("box-1", 0.0)] == [100.0, 110.0, 120.0]


def test_series_averages_into_at_most_max_points(store: Store) -> None:
    history = History(store.db)
    now = time.time()
    history.add([_point(now - 3600 + 2 * i, float(i % 10)) for i in range(1800)])
    series = history.series("box-1", now - 3600, max_points=100)
    assert 90 <= len(series["at"]) <= 100 and series["slice_s"] == 36.0
    assert all(abs(t - 4.5) < 1.0 for t in series["temp_c"])  # means of 0..9
    assert series["jobs_per_min"][10] == pytest.approx(6.0)  # 1 job per 10 s of span
    full = history.series("box-1", now - 600)
    assert len(full["at"]) == 300 and full["slice_s"] == 0.0


def _sign_in(api: TestClient, store: Store, role: str = "operator") -> str:
    token = store.create_token(f"{role}-x", role, "test")  # type: ignore[arg-type]
    answer = api.post("/api/v1/session", json={"token": token})
    assert answer.status_code == 200, answer.text
    csrf: str = answer.json()["csrf"]
    return csrf


def test_a_session_cookie_stands_for_the_token_and_changes_need_its_csrf_token(store: Store) -> None:
    api = TestClient(create_app(store))
    assert api.get("/api/v1/fleet").status_code == 401
    refused = api.post("/api/v1/session", json={"token": "efs_nope"})
    assert refused.status_code == 401 and "token create" in refused.json()["detail"]
    csrf = _sign_in(api, store)
    cookie = api.cookies.jar
    [made] = [c for c in cookie if c.name == "efs_session"]
    assert made.has_nonstandard_attr("HttpOnly") and not made.secure  # plain HTTP: not Secure
    assert api.get("/api/v1/fleet").json()["counts"]["online"] == 1
    assert api.get("/api/v1/session").json() == {"name": "operator-x", "role": "operator", "csrf": csrf}
    no_csrf = api.put("/api/v1/devices/box-1/labels", json={"labels": {"a": "b"}})
    assert no_csrf.status_code == 403 and "X-CSRF-Token" in no_csrf.json()["detail"]
    wrong = api.put(
        "/api/v1/devices/box-1/labels", json={"labels": {"a": "b"}}, headers={"X-CSRF-Token": "x"}
    )
    assert wrong.status_code == 403
    right = api.put(
        "/api/v1/devices/box-1/labels", json={"labels": {"a": "b"}}, headers={"X-CSRF-Token": csrf}
    )
    assert right.status_code == 200 and right.json()["labels"] == {"a": "b"}
    store.revoke_token("operator-x", "test")  # a revoked token ends its sessions
    assert api.get("/api/v1/fleet").status_code == 401


def test_a_viewers_session_may_read_but_not_change(store: Store) -> None:
    api = TestClient(create_app(store))
    csrf = _sign_in(api, store, "viewer")
    assert api.get("/api/v1/devices/box-1/telemetry").status_code == 200
    refused = api.post("/api/v1/rollouts/x/pause", headers={"X-CSRF-Token": csrf})
    assert refused.status_code == 403 and "viewer" in refused.json()["detail"]


def test_the_cookie_is_secure_over_https_and_sign_out_ends_the_session(store: Store) -> None:
    api = TestClient(create_app(store), base_url="https://fleet.example")
    csrf = _sign_in(api, store)
    assert (
        "secure"
        in api.post("/api/v1/session", json={"token": store.create_token("b", "viewer", "t")})
        .headers["set-cookie"]
        .lower()
    )
    api.cookies.clear()
    csrf = _sign_in(api, store, "admin")
    assert api.delete("/api/v1/session", headers={"X-CSRF-Token": csrf}).status_code == 204
    assert api.get("/api/v1/session").status_code == 401


def test_the_page_is_served_with_a_strict_policy_and_no_outside_asset(store: Store) -> None:
    api = TestClient(create_app(store))
    page = api.get("/")
    assert page.status_code == 200 and "<main" in page.text
    policy = page.headers["content-security-policy"]
    assert "script-src 'self'" in policy and "frame-ancestors 'none'" in policy and "unsafe" not in policy
    static = Path(__file__).resolve().parents[2] / "deploy" / "edge_fleet" / "server" / "dashboard" / "static"
    sources = {p.name: p.read_text() for p in static.iterdir()}
    assert {"index.html", "app.js", "core.js", "app.css"} <= set(sources)  # positive control
    for name, text in sources.items():
        assert "http://" not in text.replace('"http://www.w3.org/2000/svg"', "") and "https://" not in text, (
            name
        )
        assert api.get(f"/ui/{name}").status_code == 200
    assert "innerHTML" not in sources["app.js"] + sources["core.js"]
    assert "insertAdjacentHTML" not in sources["app.js"] + sources["core.js"]


def test_pause_halts_a_running_rollout_and_resume_continues_it(store: Store, tmp_path: Path) -> None:
    import json

    from edge_contract import signing
    from tests.support.releases import placeholder_release

    api = TestClient(create_app(store))
    operator = {"Authorization": f"Bearer {store.create_token('alice', 'operator', 'test')}"}
    viewer = {"Authorization": f"Bearer {store.create_token('vic', 'viewer', 'test')}"}
    manifest = json.loads(placeholder_release(signing.generate(), "2.0.0", tmp_path).read_text())
    created = api.post("/api/v1/rollouts", json={"manifest": manifest, "group": "shop"}, headers=operator)
    assert created.status_code == 201, created.text
    rollout_id = created.json()["id"]
    assert api.post(f"/api/v1/rollouts/{rollout_id}/pause", headers=viewer).status_code == 403
    paused = api.post(f"/api/v1/rollouts/{rollout_id}/pause", headers=operator)
    assert paused.status_code == 200 and paused.json()["state"] == "halted", paused.text
    assert paused.json()["reason"] == "paused by alice"
    again = api.post(f"/api/v1/rollouts/{rollout_id}/pause", headers=operator)
    assert again.status_code == 409 and "only a running one pauses" in again.json()["detail"]
    resumed = api.post(f"/api/v1/rollouts/{rollout_id}/resume", headers=operator)
    assert resumed.status_code == 200 and resumed.json()["state"] == "running"
    actions = [(e.actor, e.action) for e in store.audit_log() if e.target == rollout_id]
    assert ("alice", "rollout.pause") in actions and ("alice", "rollout.resume") in actions
    detail = api.get("/api/v1/targets", params={"rollout": rollout_id}, headers=viewer).json()
    assert [t["device"] for t in detail["targets"]] == ["box-1"] and "PAUSED by alice" in str(
        detail["events"]
    )
