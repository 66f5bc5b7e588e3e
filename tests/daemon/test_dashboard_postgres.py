"""The dashboard's tables on a real PostgreSQL 15 (started from Debian's binaries): the telemetry
history's downsampling and retention, and browser sessions, as on SQLite (``tests/unit``)."""

from __future__ import annotations

import time

import pytest
from fastapi.testclient import TestClient

from edge_fleet.server.app import create_app
from edge_fleet.server.dashboard.history import History, Point
from edge_fleet.server.db import Database
from edge_fleet.server.store import Seen, Store
from tests.support.postgres import Postgres

pytestmark = pytest.mark.e2e


def test_history_and_sessions_on_postgresql(postgres: Postgres) -> None:
    store = Store(Database(postgres.dsn()))
    history = History(store.db, full_s=3600, bucket_s=300, keep_s=7200)
    now = 1_000_000.0 * 300
    point = lambda at, temp: Point("box-1", at, 10.0, 0, 10.0, temp, 2000.0, 1.0, 1.0, now + 86400)  # noqa: E731
    history.add([point(now - 7500 + 10 * i, 50.0) for i in range(30)])
    history.add([point(now - 5400 + 10 * i, 40.0 + 2 * (i % 2)) for i in range(30)])
    history.add([point(now - 600 + 10 * i, 60.0) for i in range(30)])
    assert history.compact(now) == (60, 1)  # 60 rows into buckets; the one bucket past keep_s dropped
    rows = history.points("box-1", now - 10_000, now)
    assert [p.res for p in rows].count(0) == 30 and next(p for p in rows if p.res == 300).temp_c == 41.0
    store.observe([Seen("box-1", "shop", True, time.time(), "assistant", "1.0.0", "ok", "0.1.0")])
    api = TestClient(create_app(store))
    token = store.create_token("pg-operator", "operator", "test")
    csrf = api.post("/api/v1/session", json={"token": token}).json()["csrf"]
    assert api.get("/api/v1/fleet").json()["counts"]["online"] == 1
    refused = api.put("/api/v1/devices/box-1/labels", json={"labels": {"a": "b"}})
    assert refused.status_code == 403
    done = api.put(
        "/api/v1/devices/box-1/labels", json={"labels": {"a": "b"}}, headers={"X-CSRF-Token": csrf}
    )
    assert done.status_code == 200, done.text
    store.db.close()
