"""One way to wait in tests: poll a condition until it holds or a generous deadline passes."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


def wait_until(
    condition: Callable[[], T], *, timeout: float = 20.0, interval: float = 0.02, what: str | None = None
) -> T:
    """Return the first truthy value of ``condition()``; fail naming ``what`` after ``timeout`` seconds.

    Deadlines are generous on purpose (the machine may be loaded): a wait that
    ends early costs nothing, and no test asserts how long anything took.
    """
    end = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() >= end:
            raise AssertionError(f"timed out after {timeout} s waiting for {what or condition}")
        time.sleep(interval)
