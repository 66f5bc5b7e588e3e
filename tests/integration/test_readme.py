"""The README is a short front door whose commands run as written and whose links lead somewhere."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
README = (REPO / "README.md").read_text()


def _block(marker: str) -> str:
    return README.split(marker, 1)[1].split("```sh\n", 1)[1].split("```", 1)[0]


def test_the_readme_is_a_front_door() -> None:
    assert len(README.splitlines()) <= 200


def test_every_link_of_the_readme_and_docs_leads_to_a_file() -> None:
    pages = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
    checked = 0
    for page in pages:
        for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", page.read_text()):
            if target.startswith(("http://", "https://", "mailto:")):
                continue
            assert (page.parent / target).exists(), f"{page.name} links to {target}, which does not exist"
            checked += 1
    assert checked > 10, "positive control: the pages link to each other"


@pytest.mark.e2e  # runs the README's commands in a shell
def test_the_run_a_model_commands_run_as_written() -> None:
    script = _block("<!-- readme-run -->")
    assert "edge-agent generate" in script and "edge-agent bench" in script
    proc = subprocess.run(
        ["bash", "-e", "-c", script], cwd=REPO, capture_output=True, text=True, timeout=300, check=False
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    lines = proc.stdout.splitlines()
    as_json = [json.loads(line) for line in lines if line.startswith("{")]
    assert as_json and as_json[0]["text"] and as_json[0]["completion_tokens"] <= 20, proc.stdout[-2000:]
    assert any("tok/s" in line or "t/s" in line for line in lines), proc.stdout[-2000:]


def _code(fence: str, after: str) -> str:
    return README.split(after, 1)[1].split(f"```{fence}\n", 1)[1].split("```", 1)[0]


@pytest.mark.e2e  # a real agent serving HTTP, and the README's curl and openai lines against it
def test_the_use_it_from_your_app_lines_run_as_written(agents) -> None:  # type: ignore[no-untyped-def]
    from tests.support.broker import free_port
    from tests.support.wait import wait_until

    port = free_port()
    agent = agents(REPO / "models" / "demo", http={"listen": f"127.0.0.1:{port}"})
    agent.start()
    curl = _code("sh", "## Use it from your app").replace("8080", str(port))
    python = _code("python", "## Use it from your app").replace("8080", str(port))
    assert "curl -N" in curl and "OpenAI(" in python

    streamed = subprocess.run(
        ["bash", "-e", "-c", curl], capture_output=True, text=True, timeout=120, check=False
    )
    assert streamed.returncode == 0, streamed.stderr
    events = [line for line in streamed.stdout.splitlines() if line.startswith("data: ")]
    assert events[-1] == "data: [DONE]" and len(events) > 2, streamed.stdout[-2000:]
    text = "".join(
        json.loads(e[6:])["choices"][0]["delta"].get("content") or ""
        for e in events[:-1]
        if json.loads(e[6:])["choices"]
    )
    assert text.strip(), streamed.stdout[-2000:]

    import sys

    answered = subprocess.run(
        [sys.executable, "-c", python], capture_output=True, text=True, timeout=120, check=False
    )
    assert answered.returncode == 0, answered.stderr
    assert answered.stdout.strip(), "the SDK printed the box's answer"
    wait_until(lambda: "job " in agent.log_text(), what="the agent's job log lines")
