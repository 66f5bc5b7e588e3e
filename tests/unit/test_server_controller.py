"""The server's controller loop in-process, over a SQLite store and a fake broker link: it applies
what ``evaluate`` decides — sends, deferrals, leases — and publishes each box one release only."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from edge_contract import signing
from edge_fleet.server.controller import Controller
from edge_fleet.server.db import Database
from edge_fleet.server.service import FleetService, RolloutRequest
from edge_fleet.server.store import Seen, Store
from tests.support.releases import placeholder_release

KEY = signing.generate()


class FakeLink:
    """What the controller needs of the broker link; boxes update when told to (``converge``)."""

    connected = True
    connected_at = 1.0

    def __init__(self, online: dict[str, bool]) -> None:
        self.is_online = online
        self.published: list[tuple[str, bytes]] = []
        self.active: dict[str, str] = {}

    def take_seen(self) -> list[Seen]:
        return []

    def desired_settled(self) -> bool:
        return False

    def online(self, device: str) -> bool:
        return self.is_online.get(device, False)

    def outcome(self, device: str, name: str, version: str) -> Any:
        return ("active", None) if self.active.get(device) == f"{name}@{version}" else None

    def publish_desired(self, devices: list[str], payload: bytes) -> None:
        self.published += [(d, payload) for d in devices]

    def converge(self) -> None:
        for device, payload in self.published:
            if self.is_online.get(device):
                data = json.loads(payload)
                self.active[device] = f"{data['name']}@{data['version']}"


def _setup(
    tmp_path: Path, online: dict[str, bool], **request: Any
) -> tuple[Store, FakeLink, Controller, str]:
    store = Store(Database(str(tmp_path / "s.sqlite3")))
    store.observe(
        [Seen(d, "shop", on, time.time(), "assistant", "1.0.0", "ok", "0.1.0") for d, on in online.items()]
    )
    link = FakeLink(online)
    service = FleetService(store, link)  # type: ignore[arg-type]
    payload = placeholder_release(KEY, "2.0.0", tmp_path).read_bytes()
    base = dict(manifest=payload, group="shop", select=None, waves=[100.0], canary=1, wave_timeout=60.0,
                max_failure_rate=0.0, max_parallel=0, min_devices=1, resume_on_recovery=False)  # fmt: skip
    rollout, _new = service.create_rollout(RolloutRequest(**{**base, **request}), "alice")
    return store, link, Controller(service, link, "server-a"), rollout.id  # type: ignore[arg-type]


def test_the_loop_drives_a_rollout_to_done_and_sends_each_box_once(tmp_path: Path) -> None:
    store, link, controller, rollout_id = _setup(tmp_path, {"a": True, "b": True, "c": True})
    for _ in range(10):
        controller.tick()
        link.converge()
    rollout = controller.rollouts.get(rollout_id)
    assert rollout is not None and rollout.state == "done" and rollout.leader == "server-a"
    assert sorted(d for d, _p in link.published) == ["a", "b", "c"]  # once each
    assert len({p for _d, p in link.published}) == 1
    history = store.history("b")
    assert [(h["release"], h["origin"], h["actor"]) for h in history] == [
        ("assistant@2.0.0", f"rollout {rollout_id}", "alice")
    ]


def test_a_second_server_does_not_drive_a_leased_rollout(tmp_path: Path) -> None:
    _store, link, controller, _rollout_id = _setup(tmp_path, {"a": True, "b": True})
    controller.tick()
    assert len(link.published) == 1  # the canary, by server-a (the positive control)
    other = Controller(controller.service, link, "server-b")  # type: ignore[arg-type]
    link.converge()
    other.tick()
    assert len(link.published) == 1 and other.stats.leading == set()


def test_offline_boxes_are_deferred_and_the_rollout_waits_for_them(tmp_path: Path) -> None:
    _store, link, controller, rollout_id = _setup(
        tmp_path, {"a": True, "b": False}, canary=0, defer_offline=True
    )
    for _ in range(5):
        controller.tick()
        link.converge()
    rollout = controller.rollouts.get(rollout_id)
    assert rollout is not None and rollout.state == "waiting" and "b" in (rollout.reason or "")
    assert {d: t.state for d, t in controller.rollouts.targets(rollout_id).items()} == {
        "a": "active",
        "b": "deferred",
    }
    link.is_online["b"] = True  # it comes back, finds its retained desired state and converges
    link.converge()
    controller.tick()
    rollout = controller.rollouts.get(rollout_id)
    assert rollout is not None and rollout.state == "done"
