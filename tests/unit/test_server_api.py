"""The fleet server's API in-process (FastAPI's TestClient over a SQLite store, no broker): tokens
and roles, labels, rollouts by selector, the audit log, metrics, the OpenAPI document."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

from edge_contract import signing
from edge_fleet.errors import FleetError, StoreError
from edge_fleet.server.app import create_app
from edge_fleet.server.db import Database
from edge_fleet.server.migrations import MIGRATIONS, current_version
from edge_fleet.server.rollouts_table import LEASE_S, RolloutsTable
from edge_fleet.server.store import Seen, Store
from tests.support.releases import placeholder_release

KEY = signing.generate()


@pytest.fixture()
def store(tmp_path: Path) -> Store:
    s = Store(Database(str(tmp_path / "server.sqlite3")))
    s.observe([
        Seen(f"box-{i}", "shop-3" if i < 3 else "shop-4", i != 2, time.time(), "assistant", "1.0.0", "ok", "0.1.0")
        for i in range(5)
    ])  # fmt: skip
    return s


@pytest.fixture()
def api(store: Store) -> TestClient:
    return TestClient(create_app(store))


def _auth(store: Store, role: str, name: str | None = None) -> dict[str, str]:
    return {"Authorization": f"Bearer {store.create_token(name or role + '-1', role, 'test')}"}  # type: ignore[arg-type]


def _manifest(tmp_path: Path) -> dict[str, object]:
    import json

    return json.loads(placeholder_release(KEY, "2.0.0", tmp_path).read_text())  # type: ignore[no-any-return]


def test_healthz_needs_no_token_and_the_api_needs_one(api: TestClient, store: Store) -> None:
    assert api.get("/healthz").status_code == 200
    assert api.get("/api/v1/devices").status_code == 401
    wrong = api.get("/api/v1/devices", headers={"Authorization": "Bearer efs_nope"})
    assert wrong.status_code == 401 and "unknown or revoked" in wrong.json()["detail"]
    assert api.get("/api/v1/devices", headers=_auth(store, "viewer")).status_code == 200
    assert "/api/v1/rollouts" in api.get("/openapi.json").json()["paths"]


def test_a_revoked_token_is_refused(api: TestClient, store: Store) -> None:
    headers = _auth(store, "viewer", "bob")
    assert api.get("/api/v1/devices", headers=headers).status_code == 200
    store.revoke_token("bob", "test")
    assert api.get("/api/v1/devices", headers=headers).status_code == 401


def test_roles_rank_viewer_operator_admin(api: TestClient, store: Store, tmp_path: Path) -> None:
    viewer, operator, admin = _auth(store, "viewer"), _auth(store, "operator"), _auth(store, "admin")
    body = {"manifest": _manifest(tmp_path), "group": "shop-3"}
    refused = api.post("/api/v1/rollouts", json=body, headers=viewer)
    assert refused.status_code == 403 and "viewer" in refused.json()["detail"]
    assert api.get("/api/v1/audit", headers=operator).status_code == 403
    assert api.get("/api/v1/audit", headers=admin).status_code == 200
    assert api.post("/api/v1/rollouts", json=body, headers=operator).status_code == 201


def test_devices_carry_labels_that_operators_set_and_the_audit_names_them(
    api: TestClient, store: Store
) -> None:
    operator = _auth(store, "operator", "alice")
    put = api.put(
        "/api/v1/devices/box-0/labels", json={"labels": {"region": "north", "hw": "pi5"}}, headers=operator
    )
    assert put.status_code == 200 and put.json()["labels"] == {"hw": "pi5", "region": "north"}
    patched = api.patch(
        "/api/v1/devices/box-0/labels", json={"labels": {"hw": None, "shop": "17"}}, headers=operator
    )
    assert patched.json()["labels"] == {"region": "north", "shop": "17"}
    assert api.put("/api/v1/devices/nope/labels", json={"labels": {}}, headers=operator).status_code == 404
    viewer = _auth(store, "viewer")
    assert (
        api.patch("/api/v1/devices/box-0/labels", json={"labels": {"a": "b"}}, headers=viewer).status_code
        == 403
    )
    rows = api.get("/api/v1/devices", params={"select": "region=north"}, headers=viewer).json()
    assert [r["device_id"] for r in rows] == ["box-0"]
    first = rows[0]
    for field in ("device_id", "online", "group", "labels", "model", "version", "health", "last_seen"):
        assert field in first
    entries = api.get("/api/v1/audit", headers=_auth(store, "admin")).json()
    labels = [e for e in entries if e["action"] == "device.labels"]
    assert [e["actor"] for e in labels] == ["alice", "alice"] and labels[0]["target"] == "box-0"


def test_a_selector_rollout_plans_a_canary_and_waves_and_is_idempotent(
    api: TestClient, store: Store, tmp_path: Path
) -> None:
    operator = _auth(store, "operator", "alice")
    for device in ("box-0", "box-1", "box-3"):
        api.patch(f"/api/v1/devices/{device}/labels", json={"labels": {"hw": "pi5"}}, headers=operator)
    body = {"manifest": _manifest(tmp_path), "select": "hw=pi5", "canary": 1, "waves": [50, 100]}
    created = api.post("/api/v1/rollouts", json=body, headers=operator)
    assert created.status_code == 201, created.text
    row = created.json()
    assert row["id"] == "assistant@2.0.0/select:hw=pi5" and row["state"] == "running"
    assert row["targets"] == {"pending": 3} and row["waves"] == 3 and row["canary"] is True
    again = api.post("/api/v1/rollouts", json=body, headers=operator)
    assert again.status_code == 200 and again.json()["id"] == row["id"]
    assert api.get(f"/api/v1/rollouts/{row['id']}", headers=operator).json()["created_by"] == "alice"
    aborted = api.post(f"/api/v1/rollouts/{row['id']}/abort", headers=operator)
    assert aborted.status_code == 200 and aborted.json()["state"] == "aborted"
    assert api.post(f"/api/v1/rollouts/{row['id']}/resume", headers=operator).status_code == 409
    none = api.post("/api/v1/rollouts", json={**body, "select": "hw=pi9"}, headers=operator)
    assert none.status_code == 422 and "no device" in none.json()["detail"]
    actions = [e["action"] for e in api.get("/api/v1/audit", headers=_auth(store, "admin")).json()]
    assert actions.count("rollout.create") == 1 and "rollout.abort" in actions


def test_metrics_parse_and_show_every_device_online_or_not(
    api: TestClient, store: Store, tmp_path: Path
) -> None:
    assert api.get("/metrics").status_code == 401
    text = api.get("/metrics", headers=_auth(store, "viewer")).text
    families = {f.name: f for f in text_string_to_metric_families(text)}
    online = {s.labels["device"]: s.value for s in families["edge_device_online"].samples}
    assert online == {"box-0": 1.0, "box-1": 1.0, "box-2": 0.0, "box-3": 1.0, "box-4": 1.0}
    assert any(n.startswith("edge_device_model") for n in families) and "edge_device_model_info{" in text


def test_the_audit_log_is_append_only(store: Store) -> None:
    store.audit("alice", "rollout.create", "x", {})
    with pytest.raises(StoreError, match="append-only"):
        store.db.execute("UPDATE audit SET actor = 'mallory'")
    with pytest.raises(StoreError, match="append-only"):
        store.db.execute("DELETE FROM audit")
    assert [e.actor for e in store.audit_log()][-1] == "alice"


def test_migrations_run_once_and_opening_again_changes_nothing(tmp_path: Path) -> None:
    path = str(tmp_path / "m.sqlite3")
    Store(Database(path))
    again = Store(Database(path))
    assert current_version(again.db) == max(MIGRATIONS)


def test_one_server_at_a_time_leads_a_rollout(store: Store, api: TestClient, tmp_path: Path) -> None:
    api.post(
        "/api/v1/rollouts",
        json={"manifest": _manifest(tmp_path), "group": "shop-3"},
        headers=_auth(store, "operator"),
    )
    table = RolloutsTable(store.db)
    [rollout] = table.all()
    now = time.time()
    assert table.lease(rollout.id, "server-a", now)
    assert not table.lease(rollout.id, "server-b", now + 1)  # a holds it
    assert table.lease(rollout.id, "server-a", now + 2)  # renewing
    assert table.lease(rollout.id, "server-b", now + 3 + LEASE_S)  # a stopped renewing: b takes over


def test_tokens_name_the_fix(store: Store) -> None:
    store.create_token("carol", "admin", "test")
    with pytest.raises(FleetError, match="revoke it first"):
        store.create_token("carol", "viewer", "test")
    with pytest.raises(FleetError, match="no live token"):
        store.revoke_token("dave", "test")


def test_admins_make_and_revoke_tokens_through_the_api(api: TestClient, store: Store) -> None:
    admin = _auth(store, "admin", "root")
    assert (
        api.post(
            "/api/v1/tokens", json={"name": "eve", "role": "viewer"}, headers=_auth(store, "operator")
        ).status_code
        == 403
    )
    made = api.post("/api/v1/tokens", json={"name": "eve", "role": "viewer"}, headers=admin)
    assert made.status_code == 201
    eve = {"Authorization": f"Bearer {made.json()['token']}"}
    assert api.get("/api/v1/devices", headers=eve).status_code == 200
    assert [t["name"] for t in api.get("/api/v1/tokens", headers=admin).json()].count("eve") == 1
    assert api.delete("/api/v1/tokens/eve", headers=admin).status_code == 200
    assert api.get("/api/v1/devices", headers=eve).status_code == 401
    actions = [(e["actor"], e["action"], e["target"]) for e in api.get("/api/v1/audit", headers=admin).json()]
    assert ("root", "token.create", "eve") in actions and ("root", "token.revoke", "eve") in actions


def test_selectors_read_reported_facts_and_history_takes_a_selector(
    api: TestClient, store: Store, tmp_path: Path
) -> None:
    viewer, operator = _auth(store, "viewer"), _auth(store, "operator")
    rows = api.get(
        "/api/v1/devices", params={"select": "model=assistant,group=shop-4"}, headers=viewer
    ).json()
    assert [r["device_id"] for r in rows] == ["box-3", "box-4"]
    refused = api.patch("/api/v1/devices/box-0/labels", json={"labels": {"model": "x"}}, headers=operator)
    assert refused.status_code == 422 and "not a label" in refused.json()["detail"]
    api.patch("/api/v1/devices/box-3/labels", json={"labels": {"region": "north"}}, headers=operator)
    api.post(
        "/api/v1/deployments", json={"group": "shop-4", "manifest": _manifest(tmp_path)}, headers=operator
    )
    history = api.get("/api/v1/history/region=north", headers=viewer).json()
    assert [(h["kind"], h["target"], h["release"]) for h in history] == [
        ("group", "shop-4", "assistant@2.0.0")
    ]
    assert api.get("/api/v1/history/region=south", headers=viewer).status_code == 404


def test_a_revoked_device_shows_revoked_in_the_api(store: Store) -> None:
    import threading
    from types import SimpleNamespace

    from edge_contract.protocol import Status
    from edge_fleet.fleet_view import FleetView

    view = FleetView("edge")
    for device, revoked in (("box-0", False), ("box-1", True)):
        status = Status(device_id=device, online=not revoked, group="shop-3", revoked=revoked)
        view.feed(f"edge/{device}/status", status.model_dump_json().encode())
    link = SimpleNamespace(lock=threading.Lock(), view=view, prefix="edge", online=lambda _d: False)
    api = TestClient(create_app(store, link))  # type: ignore[arg-type]
    found = {d["device_id"]: d for d in api.get("/api/v1/devices", headers=_auth(store, "viewer")).json()}
    assert found["box-1"]["revoked"] is True and found["box-1"]["online"] is False
    assert found["box-0"]["revoked"] is False and found["box-0"]["online"] is True  # positive control
