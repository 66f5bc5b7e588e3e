"""The running agent's lock and link report (for doctor), and the takeover heuristic (pure)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from agent.link.presence import AgentLock, LinkRecorder, read_link, running_agent
from agent.link.takeover import FIGHT, SILENT, TakeoverDetector
from edge_contract.errors import StorageError


def test_one_agent_per_state_dir_and_doctor_sees_it(tmp_path: Path) -> None:
    assert running_agent(tmp_path) is None  # no agent yet
    lock = AgentLock(tmp_path)
    lock.acquire()
    assert running_agent(tmp_path) == os.getpid()
    with pytest.raises(StorageError, match=f"another edge-agent \\(pid {os.getpid()}\\)"):
        AgentLock(tmp_path).acquire()
    lock.release()
    assert running_agent(tmp_path) is None, "released: nobody holds it"
    again = AgentLock(tmp_path)
    again.acquire()  # the control: free again
    again.release()


def test_the_link_report_is_written_whole(tmp_path: Path) -> None:
    recorder = LinkRecorder(tmp_path)
    recorder.update(connected=True, endpoint="mq:8883", granted=["edge/b/jobs"])
    recorder.update(refused={"$share/g/edge/groups/g/jobs": "Not authorized"})
    state = read_link(tmp_path)
    assert state is not None and state.connected and state.endpoint == "mq:8883"
    assert state.granted == ["edge/b/jobs"] and "$share/g/edge/groups/g/jobs" in state.refused
    assert oct((tmp_path / "link.json").stat().st_mode & 0o777) == "0o644"


def test_a_reasonless_drop_then_an_immediate_reconnection_is_a_takeover() -> None:
    detector = TakeoverDetector()
    assert detector.connected(0.0) is None  # the first connection
    assert "without saying why" in (detector.dropped(SILENT, was_up=True) or "")
    message = detector.connected(1.0)
    assert message is not None and message.startswith("session taken over by another connection")


def test_a_drop_before_the_login_is_a_certificate_and_a_failed_retry_is_no_takeover() -> None:
    detector = TakeoverDetector()
    assert "certificate it does not accept" in (detector.dropped(SILENT, was_up=False) or "")
    assert detector.connected(0.0) is None
    detector.dropped(SILENT, was_up=True)
    detector.attempt_failed()  # the broker was away: a restart or the network
    assert detector.connected(5.0) is None
    detector.dropped("Server shutting down", was_up=True)
    assert detector.connected(6.0) is None


def test_repeated_takeovers_point_at_a_cloned_certificate() -> None:
    detector = TakeoverDetector()
    messages = []
    for n in range(FIGHT):
        detector.dropped(SILENT, was_up=True)
        messages.append(detector.connected(float(n)))
    assert "two connections keep taking" not in (messages[0] or "")
    assert "is this certificate on two boxes?" in (messages[-1] or "")


def test_doctor_checks_the_group_the_fleet_pushed(tmp_path: Path) -> None:
    from agent.config import AgentConfig
    from agent.doctor import agent_subscriptions
    from edge_contract.protocol import Membership

    config = AgentConfig.model_validate(
        {
            "device_id": "box-b",
            "group": "g1",
            "state_dir": str(tmp_path),
            "model": {"path": str(tmp_path)},
            "mqtt": {"allow_plaintext": True},
        }
    )
    assert "$share/g1/edge/groups/g1/jobs" in agent_subscriptions(config)  # the control: agent.toml's
    (tmp_path / "membership.json").write_text(Membership(device_id="box-b", group="g2").model_dump_json())
    assert "$share/g2/edge/groups/g2/jobs" in agent_subscriptions(config)
    assert not any("g1" in topic for topic in agent_subscriptions(config))
