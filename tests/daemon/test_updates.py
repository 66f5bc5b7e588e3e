"""Over-the-air model updates: a real agent, a real mosquitto, a real HTTP server, signed releases."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from agent import Engine, SamplingParams
from tests.support.models import fixture_path
from tests.support.releases import payload

pytestmark = pytest.mark.e2e

DESIRED = "edge/box-1/model/desired"


def _fleet(*args: str, broker: Any = None) -> subprocess.CompletedProcess[str]:
    extra = ["--broker", f"{broker.host}:{broker.port}", "--plaintext"] if broker is not None else []
    return subprocess.run(
        [sys.executable, "-m", "edge_fleet.cli", *args, *extra],
        capture_output=True,
        text=True,
        timeout=120,
    )


def _active(version: str):  # type: ignore[no-untyped-def]
    return lambda s: (
        (s.get("active") or {}).get("version") == version and (s.get("update") or {}).get("phase") == "active"
    )


def _job(caller, job_id: str, prompt: str = "The box", max_tokens: int = 8) -> dict[str, Any]:  # type: ignore[no-untyped-def]
    caller.send("edge/box-1/jobs", {"id": job_id, "prompt": prompt, "max_tokens": max_tokens})
    return caller.wait_result(job_id)


def _greedy(model: Path, prompt: str = "The box", max_tokens: int = 8) -> str:
    engine = Engine(model)
    return engine.generate(engine.prompt_ids(prompt), SamplingParams(max_tokens=max_tokens)).text


def test_full_update_with_the_fleet_tool(broker, caller, agents, file_server, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    keys = tmp_path / "keys"
    done = _fleet("keygen", "--out", str(keys))
    assert done.returncode == 0, done.stderr
    assert (keys / "fleet.key").stat().st_mode & 0o777 == 0o600
    public_line = (keys / "fleet.pub").read_text().strip()

    out = file_server.root / "assistant-1.1.0"
    done = _fleet(
        "release",
        str(fixture_path("llama-int4")),
        "--name",
        "assistant",
        "--version",
        "1.1.0",
        "--base-url",
        f"{file_server.base_url}/assistant-1.1.0",
        "--key",
        str(keys / "fleet.key"),
        "--out",
        str(out),
        "--replace-model",
        "phi3-int4",  # boxes run phi3-int4: switching them to another model is said, and signed
    )
    assert done.returncode == 0, done.stderr
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["replaces"] == ["phi3-int4"]
    assert {f["path"] for f in manifest["files"]} >= {"genai_config.json", "model.onnx", "tokenizer.json"}

    caller.subscribe("edge/+/model/state")
    agent = agents(model_version="1.0.0", update={"trusted_keys": [public_line]})
    agent.start()
    before = _job(caller, "before")
    assert before["status"] == "succeeded"
    assert before["model"] == {"name": "phi3-int4", "version": "1.0.0"}

    done = _fleet("deploy", str(out / "manifest.json"), "--device", "box-1", broker=broker)
    assert done.returncode == 0, done.stderr
    state = caller.wait_model_state("box-1", _active("1.1.0"))
    assert state["previous"] is None  # the configured model is the fallback, not a stored version
    phases = [s["update"]["phase"] for s in caller.model_states["box-1"] if s.get("update")]
    assert phases.index("downloading") < phases.index("verifying") < phases.index("testing")
    assert phases.index("testing") < phases.index("activating") < phases.index("active")

    after = _job(caller, "after")
    assert after["status"] == "succeeded"
    assert after["model"] == {"name": "assistant", "version": "1.1.0"}
    assert after["text"] == _greedy(fixture_path("llama-int4"))
    assert (agent.state_dir / "models" / "versions" / "assistant@1.1.0" / "model.onnx").is_file()

    done = _fleet("status", "--json", broker=broker)
    assert done.returncode == 0, done.stderr
    rows = [json.loads(line) for line in done.stdout.splitlines()]
    assert len(rows) == 1
    assert {k: rows[0][k] for k in ("device", "online", "model", "version", "previous", "update_phase")} == {
        "device": "box-1",
        "online": True,
        "model": "assistant",
        "version": "1.1.0",
        "previous": None,
        "update_phase": "active",
    }
    table = _fleet("status", broker=broker).stdout
    assert "box-1" in table and "1.1.0 active" in table

    # A restart keeps serving the installed version without downloading again.
    agent.terminate()
    requests = len(file_server.requests)
    agent.start()
    assert _job(caller, "restarted")["model"] == {"name": "assistant", "version": "1.1.0"}
    assert len(file_server.requests) == requests


def test_offline_device_converges_when_it_comes_back(broker, caller, agents, releases) -> None:  # type: ignore[no-untyped-def]
    caller.subscribe("edge/+/model/state")
    agent = agents(update={"trusted_keys": [releases.public_line]})
    agent.start()
    agent.terminate()
    caller.publish_retained(DESIRED, payload(releases.make("2.0.0")))
    agent.start()
    caller.wait_model_state("box-1", _active("2.0.0"))
    assert _job(caller, "j")["model"]["version"] == "2.0.0"


def _refusals(releases, tmp_path: Path) -> dict[str, tuple[Any, str]]:  # type: ignore[no-untyped-def]
    """Each way a release must be refused: (desired-state payload builder, expected code)."""
    from edge_contract import signing
    from tests.support.releases import replace_file, tampered

    def good():  # type: ignore[no-untyped-def]
        return releases.make("2.0.0")

    def with_file(**changes: Any):  # type: ignore[no-untyped-def]
        m = good()
        files = [f.model_copy(update=changes) if f.path == "model.onnx.data" else f for f in m.files]
        return payload(releases.resign(m, files=files))

    def with_path(path: str):  # type: ignore[no-untyped-def]
        m = good()
        files = [*m.files, m.files[0].model_copy(update={"path": path})]
        return payload(releases.resign(m, files=files))

    def truncated():  # type: ignore[no-untyped-def]
        m = good()
        served = releases.server.root / "assistant-2.0.0" / "model.onnx.data"
        served.write_bytes(served.read_bytes()[:1000])
        return payload(m)

    def broken_model():  # type: ignore[no-untyped-def]
        return payload(replace_file(releases, good(), "model.onnx", b"\x08\x07not an onnx graph" * 100))

    def wrong_smoke():  # type: ignore[no-untyped-def]
        m = good()
        smoke = m.smoke_test.model_copy(update={"token_ids": [(t + 7) % 448 for t in m.smoke_test.token_ids]})
        return payload(releases.resign(m, smoke_test=smoke))

    return {
        "tampered": (lambda: tampered(good(), version="2.0.1"), "bad_signature"),
        "unsigned": (lambda: tampered(good(), signature=""), "bad_signature"),
        "untrusted key": (lambda: payload(releases.resign(good(), key=signing.generate())), "untrusted_key"),
        "expired": (lambda: payload(releases.resign(good(), expires_at=int(time.time()) - 5)), "expired"),
        "lower version": (
            lambda: payload(releases.make("0.9.0", name="phi3-int4", fixture="phi3-int4")),
            "downgrade",
        ),
        "same version, other files": (
            lambda: payload(releases.make("1.0.0", name="phi3-int4", fixture="llama-int4")),
            "version_conflict",
        ),
        "other model": (lambda: payload(releases.make("9.0.0", name="other", replaces=())), "other_model"),
        "size differs": (lambda: with_file(size=good().files[-1].size + 1), "size_mismatch"),
        "sha256 differs": (lambda: with_file(sha256="0" * 64), "sha256_mismatch"),
        "dot-dot path": (lambda: with_path("../escape.txt"), "unsafe_path"),
        "nested dot-dot": (lambda: with_path("sub/../../escape.txt"), "unsafe_path"),
        "absolute path": (lambda: with_path("/etc/escape.txt"), "unsafe_path"),
        "truncated on the server": (truncated, "size_mismatch"),
        "disk too small": (lambda: with_file(size=1 << 40), "disk_full"),
        "model does not load": (broken_model, "model_load"),
        "smoke test fails": (wrong_smoke, "smoke_test_failed"),
        "not json": (lambda: b"{not json", "invalid_manifest"),
    }


REFUSALS = [
    "tampered",
    "unsigned",
    "untrusted key",
    "expired",
    "lower version",
    "same version, other files",
    "other model",
    "size differs",
    "sha256 differs",
    "dot-dot path",
    "nested dot-dot",
    "absolute path",
    "truncated on the server",
    "disk too small",
    "model does not load",
    "smoke test fails",
    "not json",
]


@pytest.mark.parametrize("case", REFUSALS)
def test_bad_release_is_refused_reported_and_the_old_model_keeps_serving(  # type: ignore[no-untyped-def]
    case: str, broker, caller, agents, releases, tmp_path: Path
) -> None:
    build, code = _refusals(releases, tmp_path)[case]
    caller.subscribe("edge/+/model/state")
    agent = agents(model_version="1.0.0", update={"trusted_keys": [releases.public_line]})
    agent.start()
    caller.publish_retained(DESIRED, build())
    state = caller.wait_model_state("box-1", lambda s: (s.get("update") or {}).get("phase") == "failed")
    assert state["update"]["error"]["code"] == code, state
    assert state["active"] == {"name": "phi3-int4", "version": "1.0.0"}
    answer = _job(caller, "still-serving")
    assert answer["status"] == "succeeded"
    assert answer["model"] == {"name": "phi3-int4", "version": "1.0.0"}
    store = agent.state_dir / "models"
    assert not any((store / "versions").iterdir()), "a refused release must not stay installed"
    assert not (tmp_path / "escape.txt").exists()
    assert not any(p.name == "escape.txt" for p in store.rglob("*"))


@pytest.mark.parametrize("phase", ["downloading", "verifying", "installed", "testing", "activating"])
def test_kill_9_at_each_phase_restarts_into_a_working_model(
    phase: str, broker, caller, agents, releases
) -> None:  # type: ignore[no-untyped-def]
    caller.subscribe("edge/+/model/state")
    agent = agents(model_version="1.0.0", update={"trusted_keys": [releases.public_line]})
    agent.start(env={"EDGE_AGENT_FAILPOINTS": phase})
    caller.publish_retained(DESIRED, payload(releases.make("2.0.0")))
    assert agent.proc is not None
    assert agent.proc.wait(timeout=60) == -9, agent.log_text()
    assert f"failpoint {phase}" in agent.log_text()

    agent.start()
    answer = _job(caller, "after-crash")
    assert answer["status"] == "succeeded"
    assert answer["model"]["version"] in ("1.0.0", "2.0.0")
    caller.wait_model_state("box-1", _active("2.0.0"))
    assert _job(caller, "converged")["model"] == {"name": "assistant", "version": "2.0.0"}
    store = agent.state_dir / "models"
    assert [p.name for p in (store / "versions").iterdir()] == ["assistant@2.0.0"]
    assert not any((store / "staging").iterdir())
    if phase == "downloading":
        # The second run resumed the file it was in the middle of.
        assert any(
            r and r != "bytes=0-" for r in releases.server.ranges_asked("assistant-2.0.0/model.onnx.data")
        )


def test_download_resumes_after_the_server_drops_the_connection(broker, caller, agents, releases) -> None:  # type: ignore[no-untyped-def]
    caller.subscribe("edge/+/model/state")
    manifest = releases.make("2.0.0")
    data = next(f for f in manifest.files if f.path == "model.onnx.data")
    releases.server.drop_after["assistant-2.0.0/model.onnx.data"] = data.size // 3
    agent = agents(update={"trusted_keys": [releases.public_line]})
    agent.start()
    caller.publish_retained(DESIRED, payload(manifest))
    interrupted = caller.wait_model_state(
        "box-1", lambda s: ((s.get("update") or {}).get("error") or {}).get("code") == "download_interrupted"
    )
    assert interrupted["update"]["phase"] == "downloading"
    caller.wait_model_state("box-1", _active("2.0.0"))
    asked = releases.server.ranges_asked("assistant-2.0.0/model.onnx.data")
    assert asked == [None, f"bytes={data.size // 3}-"]
    assert _job(caller, "j")["model"]["version"] == "2.0.0"


def _failed_with(code: str, phase: str):  # type: ignore[no-untyped-def]
    return lambda s: (
        (s.get("update") or {}).get("phase") == phase
        and ((s.get("update") or {}).get("error") or {}).get("code") == code
    )


def test_short_of_memory_the_old_model_is_unloaded_first_and_restored_when_the_new_one_fails(  # type: ignore[no-untyped-def]
    broker, caller, agents, releases
) -> None:
    caller.subscribe("edge/+/model/state")
    # No box has a terabyte to spare: the agent must unload the old model before loading the new one.
    agent = agents(
        model_version="1.0.0", update={"trusted_keys": [releases.public_line], "memory_reserve_mb": 1 << 20}
    )
    agent.start()
    good = releases.make("2.0.0")
    smoke = good.smoke_test.model_copy(
        update={"token_ids": [(t + 7) % 448 for t in good.smoke_test.token_ids]}
    )
    caller.publish_retained(DESIRED, payload(releases.resign(good, smoke_test=smoke)))
    state = caller.wait_model_state("box-1", _failed_with("smoke_test_failed", "rolled_back"))
    assert state["active"] == {"name": "phi3-int4", "version": "1.0.0"}
    assert "unloading the old one first" in agent.log_text()
    assert _job(caller, "restored")["model"] == {"name": "phi3-int4", "version": "1.0.0"}

    # The same path with a good release: a short pause, reported, then the new model.
    caller.publish_retained(DESIRED, payload(releases.make("2.1.0")))
    state = caller.wait_model_state("box-1", _active("2.1.0"))
    assert "old one was unloaded first" in state["update"]["detail"]
    assert _job(caller, "new")["model"]["version"] == "2.1.0"


def test_failing_first_jobs_roll_the_model_back_by_itself(
    broker, caller, agents, releases, tmp_path: Path
) -> None:  # type: ignore[no-untyped-def]
    # A release whose config promises more context than its rotary tables hold: its smoke
    # test (a short prompt) passes, real jobs with long prompts fail inside onnxruntime.
    folder = releases.copy_fixture("llama-int4", tmp_path / "overpromising")
    config = json.loads((folder / "genai_config.json").read_text())
    config["model"]["context_length"] = 2048
    (folder / "genai_config.json").write_text(json.dumps(config))
    caller.subscribe("edge/+/model/state")
    agent = agents(
        model_version="1.0.0",
        update={"trusted_keys": [releases.public_line], "probation_jobs": 5, "max_failed_jobs": 2},
    )
    agent.start()
    caller.publish_retained(DESIRED, payload(releases.make("2.0.0", source=folder)))
    caller.wait_model_state("box-1", _active("2.0.0"))
    assert _job(caller, "short")["status"] == "succeeded"
    long_prompt = "hello world " * 60
    for job_id in ("long-1", "long-2"):
        answer = _job(caller, job_id, prompt=long_prompt)
        assert answer["status"] == "failed"
        assert answer["model"]["version"] == "2.0.0"
    state = caller.wait_model_state("box-1", _failed_with("probation_failed", "rolled_back"))
    assert state["active"] == {"name": "phi3-int4", "version": "1.0.0"}
    assert "2 of its first 3 jobs failed" in state["update"]["error"]["message"]
    assert _job(caller, "long-3", prompt=long_prompt[:200])["model"]["version"] == "1.0.0"
    # The bad release stays refused: a restart (which re-reads the retained desired state) keeps the old model.
    agent.terminate()
    agent.start()
    assert _job(caller, "after-restart")["model"]["version"] == "1.0.0"
    assert not (agent.state_dir / "models" / "versions" / "assistant@2.0.0").exists()


def test_device_desired_state_wins_over_the_group(broker, caller, agents, releases) -> None:  # type: ignore[no-untyped-def]
    caller.subscribe("edge/+/model/state")
    settings = {"trusted_keys": [releases.public_line]}
    box1 = agents(device_id="box-1", group="shop", update=settings)
    box2 = agents(device_id="box-2", group="shop", update=settings)
    box1.start()
    box2.start()
    caller.publish_retained(
        "edge/groups/shop/model/desired", payload(releases.make("3.0.0", fixture="qwen2-int4"))
    )
    caller.publish_retained(DESIRED, payload(releases.make("2.0.0")))
    caller.wait_model_state("box-2", _active("3.0.0"))
    caller.wait_model_state("box-1", _active("2.0.0"))
    # Clearing the device's own desired state hands it back to its group.
    done = _fleet("deploy", "--clear", "--device", "box-1", broker=broker)
    assert done.returncode == 0, done.stderr
    caller.wait_model_state("box-1", _active("3.0.0"))


def test_old_versions_are_collected_and_an_explicit_rollback_reuses_the_kept_one(  # type: ignore[no-untyped-def]
    broker, caller, agents, releases, tmp_path: Path
) -> None:
    from edge_contract.signing import private_pem

    caller.subscribe("edge/+/model/state")
    agent = agents(update={"trusted_keys": [releases.public_line], "keep_versions": 2})
    agent.start()
    for version in ("2.0.0", "3.0.0", "4.0.0"):
        caller.publish_retained(DESIRED, payload(releases.make(version)))
        state = caller.wait_model_state("box-1", _active(version))
    assert state["previous"] == {"name": "assistant", "version": "3.0.0"}
    versions = agent.state_dir / "models" / "versions"
    assert sorted(p.name for p in versions.iterdir()) == ["assistant@3.0.0", "assistant@4.0.0"]

    # A plain release of 3.0.0 is a downgrade; the signed rollback release is not.
    key = tmp_path / "fleet.key"
    key.write_bytes(private_pem(releases.key))
    requests = len(releases.server.requests)
    seen = caller.state_count("box-1")
    done = _fleet(
        "rollback",
        str(releases.server.root / "assistant-3.0.0" / "manifest.json"),
        "--key",
        str(key),
        "--device",
        "box-1",
        broker=broker,
    )
    assert done.returncode == 0, done.stderr
    state = caller.wait_model_state("box-1", _active("3.0.0"), since=seen)
    assert state["previous"] == {"name": "assistant", "version": "4.0.0"}
    assert len(releases.server.requests) == requests, "the kept version is reused, not downloaded"
    assert _job(caller, "rolled")["model"] == {"name": "assistant", "version": "3.0.0"}


def test_the_running_job_finishes_on_the_old_model_and_the_switch_follows(
    broker, caller, agents, releases
) -> None:  # type: ignore[no-untyped-def]
    caller.subscribe("edge/+/model/state")
    # llama-long never stops early: 4,000 tokens take seconds, the update well under one.
    agent = agents(
        fixture_path("llama-long"),
        model_version="1.0.0",
        jobs={"max_tokens_limit": 4000},
        update={"trusted_keys": [releases.public_line]},
    )
    agent.start()
    caller.send("edge/box-1/jobs", {"id": "long", "prompt": "The box", "max_tokens": 4000, "stream": True})
    deadline = time.monotonic() + 30
    while not caller.chunks("long"):  # the job is running once its first chunk is out
        assert time.monotonic() < deadline, "the long job did not start"
        time.sleep(0.05)
    caller.publish_retained(DESIRED, payload(releases.make("2.0.0", replaces=("llama-long",))))
    result = caller.wait_result("long", timeout=60)
    assert result["status"] == "succeeded" and result["usage"]["completion_tokens"] == 4000
    assert result["model"] == {"name": "llama-long", "version": "1.0.0"}
    caller.wait_model_state("box-1", _active("2.0.0"))
    # In arrival order: the new model was tested while the job ran, and switched in only after it.
    arrivals = []
    while not caller.raw.empty():
        topic, body, _corr = caller.raw.get()
        arrivals.append((topic, json.loads(body) if body else {}))
    done_at = next(
        i for i, (_t, b) in enumerate(arrivals) if b.get("type") == "result" and b.get("id") == "long"
    )
    phases = {
        (b.get("update") or {}).get("phase"): i
        for i, (t, b) in enumerate(arrivals)
        if t.endswith("/model/state")
    }
    assert phases["testing"] < done_at < phases["activating"], (phases, done_at)
    assert _job(caller, "next")["model"] == {"name": "assistant", "version": "2.0.0"}


def test_desiring_what_already_runs_is_quietly_converged(broker, caller, agents, releases) -> None:  # type: ignore[no-untyped-def]
    # Boxes provisioned with 1.0.0 and a group desired state of 1.0.0: nothing to do, nothing to report.
    caller.subscribe("edge/+/model/state")
    agent = agents(model_version="1.0.0", update={"trusted_keys": [releases.public_line]})
    agent.start()
    caller.publish_retained(DESIRED, payload(releases.make("1.0.0", fixture="phi3-int4", name="phi3-int4")))
    deadline = time.monotonic() + 30
    while "the desired release phi3-int4@1.0.0 is the one running" not in agent.log_text():
        assert time.monotonic() < deadline, agent.log_text()
        time.sleep(0.05)
    caller.publish_retained(DESIRED, payload(releases.make("2.0.0")))
    caller.wait_model_state("box-1", _active("2.0.0"))
    phases = [
        (s["update"]["version"], s["update"]["phase"])
        for s in caller.model_states["box-1"]
        if s.get("update")
    ]
    assert ("1.0.0", "failed") not in phases
    assert all(version == "2.0.0" for version, _phase in phases)


def test_update_from_an_https_server_signed_by_a_private_ca(broker, caller, agents, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    from edge_contract import signing
    from tests.support.http import FileServer
    from tests.support.pki import Fleet
    from tests.support.releases import Releases

    pki = Fleet(tmp_path / "pki")
    assert pki.broker.cert is not None and pki.broker.key is not None
    (tmp_path / "www").mkdir()
    server = FileServer(tmp_path / "www", tls=(pki.broker.cert, pki.broker.key))
    try:
        releases = Releases(server, signing.generate())
        caller.subscribe("edge/+/model/state")
        agent = agents(update={"trusted_keys": [releases.public_line], "ca": str(pki.ca)})
        agent.start()
        caller.publish_retained(DESIRED, payload(releases.make("2.0.0")))
        caller.wait_model_state("box-1", _active("2.0.0"))
        assert server.base_url.startswith("https://")
        assert server.ranges_asked("assistant-2.0.0/model.onnx.data") == [None]  # fetched over TLS, once
    finally:
        server.stop()


def test_an_installed_version_that_no_longer_loads_falls_back_at_start(
    broker, caller, agents, releases
) -> None:  # type: ignore[no-untyped-def]
    caller.subscribe("edge/+/model/state")
    agent = agents(model_version="1.0.0", update={"trusted_keys": [releases.public_line]})
    agent.start()
    caller.publish_retained(DESIRED, payload(releases.make("2.0.0")))
    caller.wait_model_state("box-1", _active("2.0.0"))
    agent.terminate()
    # The SD card lost the file's content (a power cut while the box was writing nearby, say).
    (agent.state_dir / "models" / "versions" / "assistant@2.0.0" / "model.onnx").write_bytes(b"\0" * 100)
    seen = caller.state_count("box-1")
    agent.start()
    state = caller.wait_model_state("box-1", _failed_with("model_load", "rolled_back"), since=seen)
    assert state["active"] == {"name": "phi3-int4", "version": "1.0.0"}
    assert _job(caller, "fallback")["model"] == {"name": "phi3-int4", "version": "1.0.0"}


# -- refusals keyed by the whole manifest; versions per model name -----------------------------------


def test_a_tampered_release_published_first_does_not_shadow_the_genuine_one(  # type: ignore[no-untyped-def]
    broker, caller, agents, releases
) -> None:
    from tests.support.releases import tampered

    caller.subscribe("edge/+/model/state")
    agent = agents(model_version="1.0.0", update={"trusted_keys": [releases.public_line]})
    agent.start()
    genuine = releases.make("2.0.0")
    # One field edited after signing: the signature string is the genuine one's, and no longer verifies.
    caller.publish_retained(DESIRED, tampered(genuine, memory_bytes=genuine.memory_bytes + 1))
    caller.wait_model_state("box-1", _failed_with("bad_signature", "failed"))
    agent.terminate()  # what the agent remembered across a restart must not block the genuine release
    agent.start()
    caller.publish_retained(DESIRED, payload(genuine))
    caller.wait_model_state("box-1", _active("2.0.0"))
    assert _job(caller, "genuine")["model"] == {"name": "assistant", "version": "2.0.0"}


def test_a_release_refused_as_untrusted_installs_once_its_key_is_trusted_and_the_agent_restarted(  # type: ignore[no-untyped-def]
    broker, caller, agents, releases
) -> None:
    from edge_contract import signing

    new_key = signing.generate()
    new_line = signing.PublicKey(new_key.public_key(), signing.key_id(new_key.public_key())).to_line()
    caller.subscribe("edge/+/model/state")
    agent = agents(model_version="1.0.0", update={"trusted_keys": [releases.public_line]})
    agent.start()
    caller.publish_retained(DESIRED, payload(releases.resign(releases.make("2.0.0"), key=new_key)))
    caller.wait_model_state("box-1", _failed_with("untrusted_key", "failed"))
    assert _job(caller, "old")["model"] == {"name": "phi3-int4", "version": "1.0.0"}
    agent.terminate()
    config = agent.config.read_text()
    trusted = json.dumps([releases.public_line])
    assert trusted in config
    agent.config.write_text(config.replace(trusted, json.dumps([releases.public_line, new_line])))
    agent.start()  # the retained desired state arrives again, now from a trusted key
    caller.wait_model_state("box-1", _active("2.0.0"))
    assert _job(caller, "new")["model"] == {"name": "assistant", "version": "2.0.0"}


def test_another_model_installs_only_when_its_release_says_it_replaces_the_running_one(  # type: ignore[no-untyped-def]
    broker, caller, agents, releases
) -> None:
    caller.subscribe("edge/+/model/state")
    agent = agents(model_version="1.4.0", update={"trusted_keys": [releases.public_line]})
    agent.start()
    # A higher number under another name is no reason to replace the model the box runs.
    caller.publish_retained(DESIRED, payload(releases.make("9.0.0", name="llama-long", replaces=())))
    state = caller.wait_model_state("box-1", _failed_with("other_model", "failed"))
    assert "--replace-model phi3-int4" in state["update"]["error"]["message"]
    assert _job(caller, "kept")["model"] == {"name": "phi3-int4", "version": "1.4.0"}
    # Signed as replacing phi3-int4, a lower number of another model is no downgrade.
    caller.publish_retained(
        DESIRED, payload(releases.make("1.0.0", name="llama-long", replaces=("phi3-int4",)))
    )
    state = caller.wait_model_state("box-1", _active("1.0.0"))
    assert state["active"] == {"name": "llama-long", "version": "1.0.0"}
    assert _job(caller, "switched")["model"] == {"name": "llama-long", "version": "1.0.0"}


def test_a_version_re_released_with_other_files_is_refused_not_taken_as_installed(  # type: ignore[no-untyped-def]
    broker, caller, agents, releases
) -> None:
    from tests.support.releases import replace_file

    caller.subscribe("edge/+/model/state")
    agent = agents(update={"trusted_keys": [releases.public_line]})
    agent.start()
    first = releases.make("2.0.0")
    caller.publish_retained(DESIRED, payload(first))
    caller.wait_model_state("box-1", _active("2.0.0"))
    before = _job(caller, "before")
    assert before["model"] == {"name": "assistant", "version": "2.0.0"}
    seen = caller.state_count("box-1")
    other = replace_file(releases, first, "model.onnx.data", b"other weights under the same version")
    caller.publish_retained(DESIRED, payload(other))
    state = caller.wait_model_state("box-1", _failed_with("version_conflict", "failed"), since=seen)
    assert state["active"] == {"name": "assistant", "version": "2.0.0"}
    assert "new version" in state["update"]["error"]["message"]
    after = _job(caller, "after")
    assert after["model"] == {"name": "assistant", "version": "2.0.0"} and after["text"] == before["text"]
