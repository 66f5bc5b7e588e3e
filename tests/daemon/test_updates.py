"""Over-the-air model updates: a real agent, a real mosquitto, a real HTTP server, signed releases."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

from agent import Engine, SamplingParams
from tests._models import fixture_path
from tests._releases import payload

DESIRED = "edge/box-1/model/desired"


def _fleet(*args: str, broker: Any = None) -> subprocess.CompletedProcess[str]:
    extra = ["--broker", f"{broker.host}:{broker.port}"] if broker is not None else []
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
    )
    assert done.returncode == 0, done.stderr
    manifest = json.loads((out / "manifest.json").read_text())
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
    assert rows == [
        {
            "device": "box-1",
            "online": True,
            "group": None,
            "model": "assistant",
            "version": "1.1.0",
            "previous": None,
            "update": rows[0]["update"],
        }
    ]
    assert rows[0]["update"]["phase"] == "active"
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
