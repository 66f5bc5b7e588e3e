"""The operator's state file and profile without a broker: inventory, assignments, rollouts'
typed states, the profile's precedence, and the plain-text reports (fast, in-process)."""

from __future__ import annotations

import argparse
import sqlite3
import time
from pathlib import Path
from typing import get_args

import pytest

import edge_fleet
from edge_contract.protocol import ModelRef, ModelState, Status
from edge_fleet.assignments import Assignments
from edge_fleet.broker import add_broker_args, options_from
from edge_fleet.errors import FleetError
from edge_fleet.fleet_view import FleetView
from edge_fleet.inventory import Inventory
from edge_fleet.output import ago, table
from edge_fleet.profile import load_profile
from edge_fleet.rollout_store import RolloutState, RolloutStore, TargetState, names, tally
from tests.support.releases import placeholder_release


def _db() -> sqlite3.Connection:
    return sqlite3.connect(":memory:", isolation_level=None)


def _status(view: FleetView, device: str, *, online: bool, group: str | None) -> None:
    status = Status(online=online, device_id=device, group=group, model=ModelRef(name="m", version="1.0.0"))
    view.feed(f"edge/{device}/status", status.model_dump_json().encode())


def test_the_public_surface_is_importable() -> None:
    for name in edge_fleet.__all__:
        assert getattr(edge_fleet, name) is not None


def test_inventory_keeps_a_group_an_offline_status_no_longer_says() -> None:
    inventory = Inventory(_db())
    inventory.record_provisioned("till-9", "shop-3", "abc123", time.time() + 86400)
    view = FleetView()
    _status(view, "till-1", online=True, group="shop-3")
    inventory.observe(view.devices.values())
    _status(view, "till-1", online=False, group=None)  # an old agent's Last Will
    inventory.observe(view.devices.values())
    rows = {r.device: r for r in inventory.rows()}
    assert rows["till-1"].group == "shop-3" and rows["till-1"].online is False
    assert rows["till-1"].version == "1.0.0" and rows["till-1"].offline_since is not None
    assert rows["till-9"].online is None and rows["till-9"].cert_serial == "abc123"
    assert inventory.members("shop-3") == ["till-1", "till-9"]
    # Back online: offline_since is cleared, last_seen moves on.
    before = rows["till-1"].last_seen
    _status(view, "till-1", online=True, group="shop-3")
    inventory.observe(view.devices.values())
    back = inventory.get("till-1")
    assert (
        back is not None
        and back.online
        and back.offline_since is None
        and (back.last_seen or 0) >= (before or 0)
    )


def test_assignments_keep_history_and_the_current_state(tmp_path: Path) -> None:
    from edge_contract import signing

    key = signing.generate()
    one = placeholder_release(key, "1.0.0", tmp_path).read_bytes()
    two = placeholder_release(key, "2.0.0", tmp_path).read_bytes()
    store = Assignments(_db())
    store.record("group", ["shop"], one, "deploy")
    store.record("device", ["a", "b"], two, "rollout X")
    store.record("device", ["a"], None, "abort of X")
    current = {(a.kind, a.target): a.release for a in store.current()}
    assert current == {
        ("group", "shop"): "assistant@1.0.0",
        ("device", "a"): None,
        ("device", "b"): "assistant@2.0.0",
    }
    assert [(h.target, h.release, h.origin) for h in store.history("a", "shop")] == [
        ("shop", "assistant@1.0.0", "deploy"),
        ("a", "assistant@2.0.0", "rollout X"),
        ("a", None, "abort of X"),
    ]
    assert store.release_manifest("assistant@2.0.0") == two
    assert store.manifest(store.remember(one)) == one  # kept once, by digest


def test_rollout_states_are_typed_and_old_state_files_gain_the_new_columns() -> None:
    assert set(get_args(RolloutState)) == {"running", "waiting", "halted", "aborted", "done"}
    assert "deferred" in get_args(TargetState)
    db = _db()
    db.executescript(
        "CREATE TABLE targets (rollout TEXT NOT NULL, device TEXT NOT NULL, wave INTEGER NOT NULL, "
        "state TEXT NOT NULL, detail TEXT, updated REAL NOT NULL, PRIMARY KEY (rollout, device));"
    )
    RolloutStore(db)
    columns = {row[1] for row in db.execute("PRAGMA table_info(targets)")}
    assert {"before", "digest"} <= columns
    assert tally({"failed": 1, "active": 3}) == "3 active, 1 failed"
    assert names([f"d{i}" for i in range(14)], 3) == "d0, d1, d2 … and 11 more"


def _options(argv: list[str]):  # type: ignore[no-untyped-def]
    parser = argparse.ArgumentParser()
    add_broker_args(parser)
    return options_from(parser.parse_args(argv))


def test_the_profile_then_variables_then_flags(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    profile = tmp_path / "edge-fleet" / "profile.toml"
    profile.parent.mkdir()
    profile.write_text('broker = "mq.lan:8884"\ntls_ca = "ca.crt"\ntopic_prefix = "fleet"\n')
    monkeypatch.setenv("EDGE_FLEET_PROFILE", str(profile))
    options = _options([])
    assert options.address == ("mq.lan", 8884) and options.prefix == "fleet"
    assert options.ca == tmp_path / "edge-fleet" / "ca.crt" and not options.plaintext
    monkeypatch.setenv("EDGE_FLEET_BROKER", "other.lan")
    assert _options([]).address == ("other.lan", 8884)  # the operators port
    assert _options(["--broker", "cli.lan:1", "--plaintext"]).address == ("cli.lan", 1)
    assert _options(["--plaintext"]).ca is None
    monkeypatch.setenv("EDGE_FLEET_PLAINTEXT", "1")
    monkeypatch.setenv("EDGE_FLEET_PROTOCOL", "3.1.1")
    assert _options([]).plaintext and _options([]).protocol == "3.1.1"
    assert not _options(["--tls-ca", "/x.crt"]).plaintext  # a TLS flag wins over a plain-TCP setting
    profile.write_text("brokr = 'typo'\n")
    with pytest.raises(FleetError, match="brokr"):
        load_profile()
    profile.write_text("broker = \n")
    with pytest.raises(FleetError, match="cannot read the profile"):
        load_profile()


def test_tables_never_cut_and_ages_read_naturally() -> None:
    text = table(["A", "LONG HEADER"], [["x", "failed (smoke_test_failed: a long message)"], ["yy", "-"]])
    assert text.splitlines() == ["A   LONG HEADER", "x   failed (smoke_test_failed: a long message)", "yy  -"]
    now = 10_000.0
    assert [ago(now, t) for t in (now, now - 42, now - 180, now - 7300, now - 200_000, None)] == [
        "now", "42 s ago", "3 min ago", "2 h ago", "2 d ago", "-",
    ]  # fmt: skip


def test_model_state_updates_the_inventory_version() -> None:
    inventory = Inventory(_db())
    view = FleetView()
    _status(view, "a", online=True, group="g")
    state = ModelState(device_id="a", active=ModelRef(name="m", version="2.0.0"))
    view.feed("edge/a/model/state", state.model_dump_json().encode())
    inventory.observe(view.devices.values())
    row = inventory.get("a")
    assert row is not None and (row.model, row.version) == ("m", "2.0.0")
