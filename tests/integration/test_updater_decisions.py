"""The updater in-process (no broker, no agent process): a real model, a real HTTP server, real releases.

The refusal sequences are also run against real agents in ``tests/daemon/test_updates.py``; here
they take a second each.
"""

from __future__ import annotations

import concurrent.futures
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from agent.config import AgentConfig
from agent.updates.updater import Updater
from edge_contract.errors import MemoryFitError
from edge_contract.protocol import ModelState
from tests.support.models import fixture_path
from tests.support.releases import Releases, payload, tampered


def _now(task: Callable[[], None]) -> concurrent.futures.Future[None]:
    """Run a between-jobs task at once (there is no worker thread here)."""
    future: concurrent.futures.Future[None] = concurrent.futures.Future()
    try:
        task()
        future.set_result(None)
    except BaseException as exc:
        future.set_exception(exc)
    return future


def _updater(
    tmp_path: Path, releases: Releases, engine: dict[str, Any] | None = None, **model: Any
) -> tuple[Updater, list[ModelState]]:
    config = AgentConfig(
        device_id="box-1",
        state_dir=tmp_path / "state",
        model={"path": fixture_path("phi3-int4"), **model},
        mqtt={"allow_plaintext": True},
        update={"trusted_keys": [releases.public_line]},
        engine=engine or {},
    )
    states: list[ModelState] = []
    updater = Updater(config, publish=states.append, between_jobs=_now)
    updater._started = True  # publish states without the background thread
    return updater, states


def _offer(updater: Updater, data: bytes) -> ModelState:
    updater.offer("device", data)
    assert updater._converge_once() is None
    return updater.state()


def _code(state: ModelState) -> str | None:
    assert state.update is not None
    return state.update.error.code if state.update.error else None


def test_the_configured_model_s_name_is_the_one_releases_are_ordered_by(
    tmp_path: Path, releases: Releases
) -> None:
    updater, _states = _updater(tmp_path, releases, name="demo", version="1.4.0")
    assert updater.serving.ref.name == "demo"
    # The folder's name is not the model's name any more: a release of it is another model.
    state = _offer(updater, payload(releases.make("2.0.0", name="phi3-int4", replaces=())))
    assert _code(state) == "other_model"
    assert _code(_offer(updater, payload(releases.make("1.3.0", name="demo", replaces=())))) == "downgrade"
    state = _offer(updater, payload(releases.make("1.5.0", name="demo", replaces=())))
    assert state.update is not None and state.update.phase == "active"
    assert state.active is not None and (state.active.name, state.active.version) == ("demo", "1.5.0")


def test_refusals_are_remembered_only_when_the_manifest_earns_them(
    tmp_path: Path, releases: Releases
) -> None:
    updater, states = _updater(tmp_path, releases, version="1.0.0")
    genuine = releases.make("2.0.0")
    assert _code(_offer(updater, tampered(genuine, memory_bytes=1))) == "bad_signature"
    published = len(states)
    # Offered again (a reconnect): checked again, not remembered, and not reported twice.
    assert _code(_offer(updater, tampered(genuine, memory_bytes=1))) == "bad_signature"
    assert len(states) == published
    assert updater.store.read_record().refused == []
    # A release whose smoke test fails costs a download and a load: that one is remembered.
    smoke = genuine.smoke_test.model_copy(
        update={"token_ids": [(t + 7) % 448 for t in genuine.smoke_test.token_ids]}
    )
    broken = releases.resign(genuine, smoke_test=smoke)
    fetched = len(releases.server.requests)
    assert _code(_offer(updater, payload(broken))) == "smoke_test_failed"
    assert len(releases.server.requests) > fetched, "the first time, it was downloaded"
    assert updater.store.read_record().refused == [broken.digest]
    requests = len(releases.server.requests)
    _offer(updater, payload(broken))
    assert len(releases.server.requests) == requests, "a remembered refusal is not downloaded again"
    # The genuine release still goes through, and the record survives a restart typed.
    state = _offer(updater, payload(genuine))
    assert state.update is not None and state.update.phase == "active"
    again, _ = _updater(tmp_path, releases, version="1.0.0")
    assert again.serving.ref.version == "2.0.0"
    assert again.store.read_record().refused == [broken.digest]


def test_a_full_disk_is_retried_never_remembered_and_never_ends_the_updater(
    tmp_path: Path, releases: Releases, monkeypatch: Any
) -> None:
    import errno

    updater, _states = _updater(tmp_path, releases, version="1.0.0")
    genuine = releases.make("2.0.0")

    def full(*_args: Any, **_kwargs: Any) -> Any:
        raise OSError(errno.ENOSPC, "No space left on device")

    # The record cannot be written and the install cannot complete: both are the box's fault.
    monkeypatch.setattr(updater.store, "write_record", full)
    monkeypatch.setattr(updater.store, "install", full)
    updater.offer("device", payload(genuine))
    assert updater._converge_once() is not None  # retry later
    state = updater.state()
    assert state.update is not None and state.update.error is not None
    assert (state.update.phase, state.update.error.code) == ("failed", "disk_full")
    assert updater.serving.ref.version == "1.0.0"
    monkeypatch.undo()
    assert updater._converge_once() is None  # space is back: the same release goes through
    assert updater.serving.ref.version == "2.0.0"
    assert updater.store.read_record().refused == []


def test_a_second_manifest_failing_the_same_way_is_remembered_too(tmp_path: Path, releases: Releases) -> None:
    updater, _states = _updater(tmp_path, releases, version="1.0.0")
    genuine = releases.make("2.0.0")
    smoke = genuine.smoke_test.model_copy(
        update={"token_ids": [(t + 7) % 448 for t in genuine.smoke_test.token_ids]}
    )
    first = releases.resign(genuine, smoke_test=smoke)
    second = releases.resign(genuine, smoke_test=smoke, expires_at=genuine.expires_at + 60)  # re-signed
    assert _code(_offer(updater, payload(first))) == "smoke_test_failed"
    assert _code(_offer(updater, payload(second))) == "smoke_test_failed"
    assert updater.store.read_record().refused == [first.digest, second.digest]
    fetched = len(releases.server.requests)
    _offer(updater, payload(second))  # a reconnect
    assert len(releases.server.requests) == fetched


def test_an_update_this_box_cannot_hold_is_refused_before_its_download(
    tmp_path: Path, releases: Releases
) -> None:
    updater, _states = _updater(tmp_path, releases, version="1.0.0")
    genuine = releases.make("2.0.0")
    assert genuine.kv_bytes_per_token == 512  # edge-fleet release records the model's KV per token
    # A release measured at 1 TiB (signed as such): no test machine holds it.
    huge = releases.resign(genuine, memory_bytes=1 << 40)
    state = _offer(updater, payload(huge))
    assert _code(state) == "insufficient_memory"
    assert state.update is not None and state.update.error is not None
    assert "release a smaller model" in state.update.error.message
    assert not [path for path, _range in releases.server.requests if path.startswith("assistant-2.0.0/")]
    # Not remembered (the box's memory may change): checked again, refused again.
    assert _code(_offer(updater, payload(huge))) == "insufficient_memory"

    # Positive control: the release as measured downloads and serves.
    state = _offer(updater, payload(genuine))
    assert state.update is not None and state.update.phase == "active", state.update
    assert [path for path, _range in releases.server.requests if path.startswith("assistant-2.0.0/")]


def test_start_up_sizes_unset_budgets_and_refuses_set_ones_that_cannot_fit(
    tmp_path: Path, releases: Releases
) -> None:
    updater, _states = _updater(tmp_path, releases)
    options = updater.serving.engine.options
    assert (options.context_tokens, options.prefix_cache_mb) == (256, 256)  # a roomy box: the model's

    with pytest.raises(MemoryFitError) as refused:
        _updater(tmp_path / "b", releases, engine={"context_tokens": 128, "prefix_cache_mb": 1_000_000})
    assert refused.value.message.startswith("engine.prefix_cache_mb: ")
    assert refused.value.message.endswith("lower [engine] prefix_cache_mb")

    kept, _ = _updater(tmp_path / "c", releases, engine={"context_tokens": 128, "prefix_cache_mb": 8})
    assert (kept.serving.engine.options.prefix_cache_mb, kept.serving.engine.context_length) == (8, 128)
