"""The dashboard (issue 26) in a real browser: Debian's chromium driven by Playwright, against
``edge-fleet server`` as a process, a real mosquitto, three real agents and simulated boxes.

One stack serves the module (agents take a while to load their model on a busy 2-core box);
the test that stops an agent runs last.  Screenshots of each page go to ``docs/screenshots/``.
"""

from __future__ import annotations

import json
import math
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import paho.mqtt.client as paho
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from edge_fleet.server.dashboard.history import History, Point
from edge_fleet.server.db import Database
from tests.daemon.test_fleet import KEY, TRUST
from tests.support.agent import AgentProcess
from tests.support.broker import Broker
from tests.support.browser import chromium, sign_in
from tests.support.fleet import SimulatedFleet
from tests.support.fleet_server import FleetServer
from tests.support.models import fixture_path
from tests.support.mqtt_client import close_client
from tests.support.releases import placeholder_release
from tests.support.wait import wait_until

pytestmark = pytest.mark.e2e

SCREENSHOTS = Path(__file__).resolve().parents[2] / "docs" / "screenshots"
_S = 1000  # Playwright's waits are in milliseconds


@dataclass
class Stack:
    broker: Broker
    agents: list[AgentProcess]
    server: FleetServer
    sims: list[SimulatedFleet]
    lab: SimulatedFleet
    started: float
    tmp: Path

    def call(self, method: str, path: str, role: str, body: Any = None) -> tuple[int, Any]:
        """An API call with a Bearer token of ``role``: (status, JSON)."""
        request = urllib.request.Request(
            self.server.url + path, method=method, data=None if body is None else json.dumps(body).encode(),
            headers={"Authorization": f"Bearer {self.server.tokens[role]}", "Content-Type": "application/json"},
        )  # fmt: skip
        try:
            with urllib.request.urlopen(request, timeout=30) as answer:
                return answer.status, json.loads(answer.read() or b"null")
        except urllib.error.HTTPError as error:
            return error.code, json.loads(error.read() or b"null")


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    tmp = tmp_path_factory.mktemp("dashboard")
    with pytest.MonkeyPatch.context() as env:
        env.setenv("EDGE_FLEET_DB", str(tmp / "fleet-state.sqlite3"))
        env.setenv("EDGE_FLEET_PROFILE", str(tmp / "no-profile.toml"))
        broker = Broker(tmp / "broker")
        broker.start()
        agents = [
            # box-2 asks for more free disk than any disk has: degraded (low_disk), for a true reason.
            AgentProcess(broker, tmp / f"agent-{i}", fixture_path("phi3-int4"), device_id=f"box-{i}", group="shop-0",
                         model_version=f"1.{i}.0", telemetry={"interval_s": 2.0},
                         health={"min_disk_free_mb": 1 << 30} if i == 2 else None)
            for i in range(3)
        ]  # fmt: skip
        sims: list[SimulatedFleet] = []
        server: FleetServer | None = None
        try:
            with ThreadPoolExecutor(3) as pool:
                list(pool.map(lambda a: a.start(), agents))
            started = time.time()
            server = FleetServer(str(tmp / "server.sqlite3"), broker, tmp / "server.log").start()
            for shop in range(1, 6):  # 47 in shops and 3 in the lab: 50 simulated boxes
                sims.append(SimulatedFleet(broker, 10 if shop < 5 else 7, group=f"shop-{shop}",
                                           name_prefix=f"shop{shop}", telemetry_interval_s=5.0, seed=shop))  # fmt: skip
            lab = SimulatedFleet(broker, 3, group="lab", name_prefix="lab", update_delay_s=300, trusted=TRUST)
            made = Stack(broker, agents, server, sims, lab, started, tmp)
            wait_until(lambda: len(server.get("/api/v1/devices")) == 53, timeout=60, what="53 devices listed")
            for i, sim in enumerate(sims):
                for device in sim.ids[:4]:
                    labels = {"region": "north" if i % 2 else "south", "hw": "pi5" if i < 3 else "pi4"}
                    status, answer = made.call(
                        "PATCH", f"/api/v1/devices/{device}/labels", "operator", {"labels": labels}
                    )
                    assert status == 200, answer
            yield made
        finally:
            for sim in sims:
                sim.stop()
            if server is not None:
                server.stop()
            for agent in agents:
                agent.stop()
            broker.stop()


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    with chromium() as found:
        yield found


def _row(page: Any, device: str) -> Any:
    return page.locator(f'#fleet tr[data-device="{device}"]')


def test_sign_in_and_see_the_three_real_agents_with_their_versions(stack: Stack, browser: Any) -> None:
    from playwright.sync_api import expect

    page = browser.new_context().new_page()
    page.goto(stack.server.url + "/")
    page.fill("#token", "efs_not-a-token")
    page.click("#signin button[type=submit]")
    expect(page.locator("#signin-error")).to_contain_text("unknown or revoked token", timeout=10 * _S)
    assert page.locator("#nav").is_hidden()  # refused: still signed out
    page.fill("#token", stack.server.tokens["viewer"])
    page.click("#signin button[type=submit]")
    expect(page.locator("#who")).to_have_text("viewer-user (viewer)", timeout=10 * _S)
    for i in range(3):
        row = _row(page, f"box-{i}")
        expect(row).to_contain_text("online", timeout=30 * _S)
        expect(row.locator('td[data-label="Model"]')).to_contain_text(f"@1.{i}.0")
    expect(page.locator('.count[data-count="online"] b')).to_have_text("53", timeout=30 * _S)
    # Health with its reason; the other real boxes are ok (the control).
    expect(_row(page, "box-2").locator('td[data-label="Health"]')).to_have_text(
        "degraded: low_disk", timeout=20 * _S
    )
    expect(_row(page, "box-1").locator('td[data-label="Health"]')).to_have_text("ok")
    expect(page.locator('.count[data-count="degraded"] b')).to_have_text("1")
    cookie = next(c for c in page.context.cookies() if c["name"] == "efs_session")
    assert cookie["httpOnly"] and cookie["sameSite"] == "Strict"
    assert page.evaluate("document.cookie") == ""  # not readable by scripts
    page.select_option('select[name="group"]', "shop-0")  # the filters
    expect(page.locator("#fleet tbody tr")).to_have_count(3, timeout=10 * _S)
    page.context.close()


def test_a_job_streams_its_answer_into_the_page(stack: Stack, browser: Any) -> None:
    from playwright.sync_api import expect

    page = sign_in(browser, stack.server.url, stack.server.tokens["operator"])
    page.click('#nav a[data-page="jobs"]')
    page.select_option('select[name="target"]', "box-1")
    page.fill('textarea[name="prompt"]', "Say hello to the shop.")
    page.fill('input[name="max_tokens"]', "24")
    page.click(".jobform button[type=submit]")
    status = page.locator("#job-status")
    expect(status).to_have_attribute("data-done", "succeeded", timeout=120 * _S)
    chunks = int(status.get_attribute("data-chunks") or 0)
    answer = page.locator("#answer").text_content() or ""
    code, job = stack.call("GET", f"/api/v1/jobs/{status.get_attribute('data-job')}", "viewer")
    assert code == 200 and job["state"] == "succeeded", job
    assert chunks >= 2 and answer == job["result"]["text"] and answer, (chunks, answer, job)
    assert job["result"]["device_id"] == "box-1"
    page.screenshot(path=str(SCREENSHOTS / "jobs.png"), full_page=True)
    page.context.close()


def test_an_operator_starts_and_aborts_a_rollout_and_a_viewer_may_not(stack: Stack, browser: Any) -> None:
    from playwright.sync_api import expect

    manifest = placeholder_release(KEY, "2.0.0", stack.tmp)
    operator = sign_in(browser, stack.server.url, stack.server.tokens["operator"])
    operator.click('#nav a[data-page="rollouts"]')
    operator.click("details summary")
    operator.set_input_files('input[name="manifest"]', str(manifest))
    operator.fill('input[name="target"]', "lab")
    operator.fill('input[name="waves"]', "50,100")
    operator.fill('input[name="max_parallel"]', "1")
    operator.click("#new-rollout button[type=submit]")
    rollout_id = "assistant@2.0.0/lab"
    card = operator.locator(f'.rollout[data-rollout="{rollout_id}"]')
    expect(card).to_have_attribute("data-state", "running", timeout=20 * _S)
    expect(card.locator(".box.sent")).to_have_count(1, timeout=20 * _S)  # live progress: one box sent
    abort = card.get_by_role("button", name="Abort")
    expect(abort).to_be_visible()  # positive control for the viewer's page below
    operator.screenshot(path=str(SCREENSHOTS / "rollouts.png"), full_page=True)

    viewer = sign_in(browser, stack.server.url, stack.server.tokens["viewer"])
    viewer.click('#nav a[data-page="rollouts"]')
    seen = viewer.locator(f'.rollout[data-rollout="{rollout_id}"]')
    expect(seen).to_have_attribute("data-state", "running", timeout=20 * _S)  # the viewer sees it ...
    expect(seen.locator(".box")).to_have_count(3)
    assert seen.get_by_role("button").count() == 0  # ... with no button at all
    code, answer = stack.call("POST", f"/api/v1/rollouts/{rollout_id}/abort", "viewer")
    assert code == 403 and "viewer" in answer["detail"], answer
    from_page = viewer.evaluate(
        """async (id) => { const me = await (await fetch('/api/v1/session')).json();
        const r = await fetch('/api/v1/rollouts/' + id + '/abort', {method: 'POST', headers: {'X-CSRF-Token': me.csrf}});
        return r.status; }""",
        rollout_id,
    )
    assert from_page == 403
    no_csrf = operator.evaluate(
        "async (id) => (await fetch('/api/v1/rollouts/' + id + '/abort', {method: 'POST'})).status",
        rollout_id,
    )
    assert no_csrf == 403  # the operator's own cookie without the CSRF token changes nothing
    assert stack.server.rollout(rollout_id)["state"] == "running"

    abort.click()
    expect(card).to_have_attribute("data-state", "aborted", timeout=20 * _S)
    assert stack.server.rollout(rollout_id)["state"] == "aborted"
    code, audit = stack.call("GET", "/api/v1/audit", "admin")
    assert ("operator-user", "rollout.abort", rollout_id) in {
        (e["actor"], e["action"], e["target"]) for e in audit
    }
    operator.context.close()
    viewer.context.close()


def _seed_history(stack: Stack, device: str) -> int:
    """An hour of telemetry for ``device`` written straight into the server's database: the test
    cannot wait an hour.  Rows stop where the agent's own, recorded live, begin."""
    history = History(Database(stack.server.db))
    live = stack.server.get(f"/api/v1/devices/{device}")
    memory = float(live["mem_available_mb"] or 3000)  # near what the box reports now
    now = time.time()
    points = []
    for k, at in enumerate(range(int(now - 3600), int(stack.started) - 5, 10)):
        phase = k / 40.0
        points.append(Point(
            device=device, at=float(at), span=10.0, res=0, tok_s=18 + 3 * math.sin(phase),
            temp_c=52 + 8 * math.sin(phase / 3), mem_mb=memory - 150 * (1 + math.sin(phase / 2)),
            queue=float(max(0, round(2 * math.sin(phase * 1.7)))), jobs=float(round(2 + 1.5 * math.sin(phase * 1.3))),
            cert_expires_at=now + 300 * 86400,
        ))  # fmt: skip
    history.add(points)
    history.db.close()
    return len(points)


def test_screenshots_of_each_page(stack: Stack, browser: Any) -> None:
    from playwright.sync_api import expect

    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    page = sign_in(
        browser, stack.server.url, stack.server.tokens["operator"], viewport={"width": 1280, "height": 900}
    )
    expect(page.locator("#fleet tbody tr")).to_have_count(53, timeout=30 * _S)  # 50 simulated + 3 real
    expect(_row(page, "box-0")).to_contain_text("online")
    page.screenshot(path=str(SCREENSHOTS / "fleet.png"), full_page=True)
    phone = sign_in(browser, stack.server.url, stack.server.tokens["viewer"], viewport={"width": 390, "height": 844},
                    is_mobile=True, has_touch=True)  # fmt: skip
    expect(phone.locator("#fleet tbody tr")).to_have_count(53, timeout=30 * _S)
    phone.screenshot(path=str(SCREENSHOTS / "fleet-phone.png"))
    seeded = _seed_history(stack, "box-0")
    assert seeded > 300
    code, job = stack.call(
        "POST", "/api/v1/jobs?wait=true", "operator", {"device": "box-0", "prompt": "Hello", "max_tokens": 8}
    )
    assert code == 202 and job["state"] == "succeeded", job
    page.goto(stack.server.url + "/#/device/box-0")
    listed = page.locator("tr").filter(has_text=job["id"])
    # The last jobs, with their finish reasons:
    expect(listed).to_contain_text(job["result"]["finish_reason"], timeout=20 * _S)
    chart = page.locator('.chart[data-chart="temperature"] path.line')
    expect(chart).to_have_count(1, timeout=20 * _S)
    expect(page.locator('[data-fact="Certificate expires"]')).to_contain_text("days", timeout=10 * _S)
    code, series = stack.call("GET", "/api/v1/devices/box-0/telemetry", "viewer")
    assert code == 200 and len(series["at"]) >= 300 and series["at"][0] < time.time() - 3000, series["at"][:3]
    # The last rows are the agent's own, recorded live by the server:
    assert series["at"][-1] > stack.started and series["mem_mb"][-1]
    page.screenshot(path=str(SCREENSHOTS / "device.png"), full_page=True)
    page.context.close()
    phone.context.close()


def test_hostile_device_names_and_labels_stay_text(stack: Stack, browser: Any) -> None:
    from playwright.sync_api import expect

    hostile = '<img src=x onerror="window.__xss=1">'
    client = paho.Client(CallbackAPIVersion.VERSION2, client_id="xss-test")
    client.connect(stack.broker.host, stack.broker.port)
    client.loop_start()
    status = {"online": True, "group": '<b id="xss-group">g</b>', "since": time.time()}
    client.publish(f"edge/{hostile}/status", json.dumps(status), qos=1, retain=True).wait_for_publish(10)
    wait_until(lambda: any(d["device_id"] == hostile for d in stack.server.get("/api/v1/devices")),
               timeout=30, what="the hostile device in the inventory")  # fmt: skip
    code, answer = stack.call("PATCH", "/api/v1/devices/shop1-0009/labels", "operator",
                              {"labels": {"note": "<script>window.__xss=2</script>"}})  # fmt: skip
    labelled = code == 200  # the selector syntax may refuse such a value; the device id is the test then
    page = sign_in(browser, stack.server.url, stack.server.tokens["viewer"])
    dialogs: list[str] = []
    page.on("dialog", lambda d: (dialogs.append(d.message), d.dismiss()))
    row = page.locator("#fleet tbody tr").filter(has_text="onerror")
    expect(row).to_have_count(1, timeout=20 * _S)  # positive control: shown, as text
    assert row.locator("td").first.text_content() == hostile
    assert row.locator('td[data-label="Group"]').text_content() == '<b id="xss-group">g</b>'
    if labelled:
        expect(_row(page, "shop1-0009")).to_contain_text("<script>window.__xss=2</script>")
    else:
        assert code == 422, answer
    assert page.locator("#fleet img, #fleet script, #xss-group").count() == 0
    assert page.evaluate("window.__xss") is None and dialogs == []
    client.publish(f"edge/{hostile}/status", b"", qos=1, retain=True).wait_for_publish(10)
    close_client(client)
    page.context.close()


def test_a_stopped_box_shows_offline_within_30_s(stack: Stack, browser: Any) -> None:
    from playwright.sync_api import expect

    page = sign_in(browser, stack.server.url, stack.server.tokens["viewer"])
    state = _row(page, "box-2").locator('td[data-label="State"]')
    expect(state).to_have_text("online", timeout=20 * _S)  # positive control
    stack.agents[2].terminate()
    expect(state).to_have_text("offline", timeout=30 * _S)
    expect(_row(page, "box-0").locator('td[data-label="State"]')).to_have_text("online")
    page.context.close()
