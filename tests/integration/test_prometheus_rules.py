"""The shipped Prometheus alert rules (``deploy/prometheus/``) pass ``promtool``'s checks and unit tests.

CI installs Debian's ``prometheus`` package for ``promtool``; a missing one fails the test.
"""

from __future__ import annotations

import subprocess

import pytest

from tests.support.models import ROOT
from tests.support.tools import tool

pytestmark = pytest.mark.e2e  # runs promtool

RULES = ROOT / "deploy" / "prometheus"


def _promtool(*args: str) -> subprocess.CompletedProcess[str]:
    command = [tool("promtool", "prometheus"), *args]
    return subprocess.run(command, cwd=RULES, capture_output=True, text=True, timeout=60, check=False)


def test_the_alert_rules_are_valid_and_their_unit_tests_pass() -> None:
    checked = _promtool("check", "rules", "edge-fleet-rules.yml")
    assert checked.returncode == 0 and "4 rules found" in checked.stdout, checked.stdout + checked.stderr
    tested = _promtool("test", "rules", "edge-fleet-rules.test.yml")
    assert tested.returncode == 0 and "SUCCESS" in tested.stdout, tested.stdout + tested.stderr


def test_the_rules_name_metrics_the_server_exports() -> None:
    from edge_fleet.server.api.metrics import _GAUGES

    exported = {"edge_device_online", "edge_fleet_server_broker_connected", "edge_rollout_state"} | {
        g[0] for g in _GAUGES
    }
    text = (RULES / "edge-fleet-rules.yml").read_text()
    used = {word for word in text.replace("{", " ").split() if word.startswith("edge_")}
    assert used and used <= exported, used - exported
