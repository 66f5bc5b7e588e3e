"""Debian's ``chromium`` driven by Playwright's Python package (its own browser download is never
used: ``playwright install`` is no step of anything here)."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest

CHROMIUM = "/usr/bin/chromium"
# As root chromium needs --no-sandbox; the rest keep it off a closed network (no update checks, no sync).
ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
        "--no-first-run", "--disable-sync"]  # fmt: skip


@contextmanager
def chromium() -> Iterator[Any]:
    """A headless chromium; the test fails (never skips) without it: ``apt-get install chromium``."""
    if not shutil.which("chromium") and not shutil.which(CHROMIUM):
        pytest.fail("Debian's chromium is needed for the dashboard's tests: apt-get install -y chromium")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        try:
            yield browser
        finally:
            browser.close()


def sign_in(browser: Any, url: str, token: str, **context: Any) -> Any:
    """A new page signed in to the dashboard at ``url`` with ``token`` (through the page's form)."""
    page = browser.new_context(**context).new_page()
    page.goto(url + "/")
    page.fill("#token", token)
    page.click("#signin button[type=submit]")
    page.wait_for_selector("#nav:not([hidden])")
    return page
