"""Issue 24: pending enrollments in the dashboard — an operator approves one box and rejects
another in a real browser (Debian's chromium), against a real mosquitto and real enrolling boxes."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from edge_fleet.server.app import create_app
from edge_fleet.server.store import Store
from tests.daemon.test_enrollment import _check_decisions, _two_waiting, enrollment_desk
from tests.support.broker import Broker, free_port
from tests.support.browser import chromium, sign_in
from tests.support.pki import Fleet
from tests.support.wait import wait_until

pytestmark = pytest.mark.e2e


@contextmanager
def _server(store: Store, desk: Any) -> Iterator[str]:
    """The fleet server's app (its enrollment desk beside the CA) under uvicorn on a free port."""
    import uvicorn

    port = free_port()
    server = uvicorn.Server(
        uvicorn.Config(create_app(store, enroll=desk), host="127.0.0.1", port=port, log_level="warning")
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    wait_until(lambda: server.started, what="the fleet server to listen")
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)


def test_an_operator_approves_and_rejects_waiting_boxes_in_the_dashboard(
    tls_broker: Broker, fleet: Fleet, tmp_path: Path
) -> None:
    waiting = _two_waiting(tls_broker, fleet, tmp_path, "shop8", ["box-u", "box-v"])
    store = waiting[1]
    desk = enrollment_desk(tls_broker, fleet)
    with _server(store, desk) as url, chromium() as browser:
        viewer = sign_in(browser, url, store.create_token("viewer-1", "viewer", "test"))
        viewer.goto(url + "/#/enrollments")
        viewer.wait_for_selector("tr[data-enrollment=box-u]")
        viewer.wait_for_selector("tr[data-enrollment=box-v]")
        assert viewer.locator("#enrollments button").count() == 0, "a viewer sees the queue, not the buttons"
        assert "SHA256:" in viewer.locator("tr[data-enrollment=box-u]").inner_text()

        page = sign_in(browser, url, store.create_token("operator-1", "operator", "test"))
        page.goto(url + "/#/enrollments")
        page.locator("tr[data-enrollment=box-u] button", has_text="Approve").click()
        page.wait_for_selector("tr[data-enrollment=box-u]", state="detached")
        page.locator("tr[data-enrollment=box-v] input[name=reason]").fill("unknown box")
        page.locator("tr[data-enrollment=box-v] button", has_text="Reject").click()
        page.wait_for_selector("text=No box is waiting for approval")
    _check_decisions(waiting, tmp_path, "claim-shop8", "box-u", "box-v")
