"""The worker's claim / run / finish / requeue, in process: a real store, a real engine, real disk faults."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import pytest

from agent.daemon.faults import StorageFaults
from agent.daemon.outbox import Outbox
from agent.daemon.outcome import Outcome
from agent.daemon.worker import Worker
from agent.engine.engine import Engine
from agent.health.telemetry import JobStats
from agent.jobs.store import JobStore
from edge_contract.errors import ModelError
from edge_contract.protocol import JobRequest
from tests.support.parts import Models, RecordingLink, models


def _worker(
    store: JobStore, served: Models, link: RecordingLink | None = None
) -> tuple[Worker, RecordingLink]:
    link = link or RecordingLink()
    faults = StorageFaults()
    worker = Worker(
        store,
        Outbox(link, store, faults),
        served,
        device_id="box-1",
        stats=JobStats(),
        faults=faults,
        publish_chunk=lambda topic, payload, corr: link.publish(topic, payload, correlation=corr),
    )
    return worker, link


def _queue(store: JobStore, job_id: str, **fields: Any) -> None:
    request = JobRequest.model_validate(
        {"id": job_id, "prompt": "The quick brown fox", "max_tokens": 6, **fields}
    )
    store.accept(
        job_id, request.model_dump_json(exclude_none=True), f"edge/replies/{job_id}", b"c", deadline=None
    )


def _results(link: RecordingLink, job_id: str) -> list[dict[str, Any]]:
    replies = [json.loads(p.payload) for p in link.to(f"edge/replies/{job_id}")]
    return [r for r in replies if r["type"] == "result"]


def test_a_job_is_claimed_run_finished_published_counted_and_logged(
    tmp_path: Path, phi3_engine: Engine, caplog: pytest.LogCaptureFixture
) -> None:
    store = JobStore(tmp_path / "jobs.sqlite3")
    served = models(phi3_engine)
    worker, link = _worker(store, served)
    _queue(store, "w-1", stream=True)
    with caplog.at_level(logging.INFO):
        assert worker.step() is True
    assert worker.step() is False, "nothing left to do"
    (result,) = _results(link, "w-1")
    assert result["status"] == "succeeded" and result["device_id"] == "box-1"
    assert result["model"] == {"name": "phi3-int4", "version": "1.0.0"}
    chunks = [json.loads(p.payload) for p in link.to("edge/replies/w-1")][:-1]
    assert "".join(c["text"] for c in chunks) == result["text"]
    assert all(p.correlation == b"c" for p in link.to("edge/replies/w-1"))
    assert store.get("w-1").state == "done"  # type: ignore[union-attr]
    assert served.verdicts == [(True, None)]
    tokens = result["usage"]["prompt_tokens"], result["usage"]["completion_tokens"]
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("job w-1 ")]
    assert len(lines) == 1 and f"succeeded: {tokens[0]} prompt + {tokens[1]} completion tokens, " in lines[0]
    assert lines[0].endswith(" ms")


def test_a_result_the_full_disk_cannot_take_is_finished_when_space_returns(
    small_disk: Any, phi3_engine: Engine
) -> None:
    store = JobStore(small_disk.path / "jobs.sqlite3")
    worker, link = _worker(store, models(phi3_engine))
    _queue(store, "full-1")
    job = worker.claim()
    assert job is not None and job.id == "full-1"
    small_disk.fill()
    outcome = worker.run(job)
    assert outcome is not None and outcome.result.status == "succeeded"
    worker.finish(job, outcome)
    assert worker.faults.failing and worker.faults.total >= 1
    assert _results(link, "full-1") == [], "not published before it is stored"
    assert worker.step() is True  # still full: retried, nothing else started, the thread lives on
    assert worker.faults.failing
    small_disk.free()
    assert worker.step() is False
    (result,) = _results(link, "full-1")
    assert result["status"] == "succeeded" and result["text"] == outcome.result.text
    assert store.get("full-1").state == "done"  # type: ignore[union-attr]
    assert store.queued_count() == 0, "a finished job no longer counts towards max_queue"
    assert not worker.faults.failing


def test_a_claim_on_a_full_disk_waits_and_the_job_runs_once_space_returns(
    small_disk: Any, phi3_engine: Engine
) -> None:
    store = JobStore(small_disk.path / "jobs.sqlite3")
    worker, link = _worker(store, models(phi3_engine))
    worker.step()  # recovery done while the disk had room
    _queue(store, "full-2")
    small_disk.fill()
    assert worker.step() is True and worker.faults.failing
    assert _results(link, "full-2") == []
    small_disk.free()
    while worker.step():
        pass
    assert [r["status"] for r in _results(link, "full-2")] == ["succeeded"]


class _SamplerFault(Engine):
    """The real engine, whose sampler is handed logits it cannot use: an error raised inside sampling.py."""

    def sequence(self, prompt_ids: Any, params: Any = None, **kw: Any) -> Any:
        seq = super().sequence(prompt_ids, params, **kw)
        sampler = seq.sampler

        def broken(_logits: Any) -> int:
            sampler(None)  # type: ignore[arg-type]
            raise AssertionError("unreachable")

        seq.sampler = broken  # type: ignore[assignment]
        return seq


class _ModelFault(Engine):
    def bind_chunk(self, *_args: Any, **_kw: Any) -> None:
        raise ModelError("the session failed to run")


@pytest.mark.parametrize(
    "engine_class,fields,status,verdicts",
    [
        # a request's own sampling parameters: fails that job, never counts against the model
        (_SamplerFault, {"temperature": 0.7}, "failed", []),
        (_SamplerFault, {"temperature": 1.0, "repetition_penalty": 0.5}, "failed", []),
        # the same fault on plain greedy decoding can only be the model's
        (_SamplerFault, {}, "failed", [False]),
        (_ModelFault, {"temperature": 0.7}, "failed", [False]),
        # invalid requests are refused before the model runs
        (Engine, {"prompt": " ".join(["1"] * 400)}, "rejected", []),
        (Engine, {}, "succeeded", [True]),
    ],
)
def test_probation_counts_only_what_the_model_causes(
    tmp_path: Path,
    phi3_dir: Path,
    engine_class: type[Engine],
    fields: dict[str, Any],
    status: str,
    verdicts: list[bool],
) -> None:
    store = JobStore(tmp_path / "jobs.sqlite3")
    served = models(engine_class(phi3_dir))
    worker, link = _worker(store, served)
    _queue(store, "p-1", **fields)
    worker.step()
    (result,) = _results(link, "p-1")
    assert result["status"] == status
    assert [ok for ok, _error in served.verdicts] == verdicts


def test_cancel_a_queued_job_and_a_checkpointed_job_is_requeued(tmp_path: Path, phi3_engine: Engine) -> None:
    store = JobStore(tmp_path / "jobs.sqlite3")
    worker, link = _worker(store, models(phi3_engine))
    _queue(store, "c-1")
    _queue(store, "c-2", max_tokens=50)
    assert worker.cancel("c-1") is True
    assert [r["error"]["code"] for r in _results(link, "c-1")] == ["canceled"]
    assert worker.cancel("c-1") is False, "a finished job cannot be canceled"
    worker.stop(grace_s=0)  # past the grace at once: the running job is checkpointed
    job = worker.claim()
    assert job is not None and job.id == "c-2"
    assert worker.run(job) is None
    worker.requeue(job)
    assert store.get("c-2").state == "queued" and _results(link, "c-2") == []  # type: ignore[union-attr]
    # Positive control: run without the deadline, the same job finishes.
    fresh, link2 = _worker(store, models(phi3_engine))
    fresh.step()
    assert [r["status"] for r in _results(link2, "c-2")] == ["succeeded"]


def test_outcome_is_the_interface_batching_builds_on(tmp_path: Path, phi3_engine: Engine) -> None:
    store = JobStore(tmp_path / "jobs.sqlite3")
    worker, link = _worker(store, models(phi3_engine))
    _queue(store, "i-1")
    job = worker.claim()
    assert job is not None
    outcome = worker.run(job)
    assert isinstance(outcome, Outcome) and outcome.probation == "success"
    worker.finish(job, outcome)
    assert [r["id"] for r in _results(link, "i-1")] == ["i-1"]
