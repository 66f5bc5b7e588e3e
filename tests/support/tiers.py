"""Which cases of an exhaustive matrix the fast tier runs.

An exactness matrix (every fixture family at every precision, in every mode) is checked
whole by the full tier (``pytest -q``).  The fast tier (``pytest -m "not e2e"``) runs the
representative cases a test names with ``matrix(..., fast=...)``; every other case carries
the ``exhaustive`` mark, which ``tests/conftest.py`` turns into ``e2e`` for selection (so
``-m "not e2e"`` leaves it out) while keeping it under the in-process check.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import pytest


def matrix(cases: Iterable[Any], *, fast: Iterable[Any]) -> list[Any]:
    """``cases`` for ``pytest.mark.parametrize``: those in ``fast`` as they are, the rest marked ``exhaustive``.

    A case of several arguments is a tuple, as parametrize takes it; the test ids are those
    parametrize gives the bare cases.
    """
    cases, fast = list(cases), list(fast)
    unknown = [case for case in fast if case not in cases]
    if unknown or not fast:
        raise ValueError(f"the fast tier's cases {unknown or fast} are not cases of the matrix")
    return [
        case
        if case in fast
        else pytest.param(*(case if isinstance(case, tuple) else (case,)), marks=pytest.mark.exhaustive)
        for case in cases
    ]
