"""Membership pushed from the fleet: the box's group (and labels) as retained desired state.

``edge-fleet move NAME --group G`` publishes a ``Membership`` retained at
``{prefix}/{device}/membership``; the broker lets only operators publish there.
The agent subscribes to it and applies it on the intake thread, without a
restart: it leaves the old group's subscriptions, takes the new group's, serves
under the new rules, forgets the old group's desired model, and says so in its
status.  ``agent.toml``'s ``group`` is only the starting point of a box that
has never been told otherwise.

The last membership applied is kept in ``STATE_DIR/membership.json``, so a restart
starts in the right group (no refused subscription to the old group first);
the retained message, delivered at every (re)subscription, stays the authority.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import tempfile
from pathlib import Path

from pydantic import ValidationError

from agent.config import AgentConfig
from agent.daemon.intake import CANCEL_MAX_BYTES
from edge_contract.manifest import MAX_MANIFEST_BYTES
from edge_contract.protocol import Membership, Topics

log = logging.getLogger(__name__)

FILE = "membership.json"


def subscriptions_for(config: AgentConfig, topics: Topics) -> tuple[list[str], dict[str, int]]:
    """What the agent subscribes to with this configuration and group, and each one's payload limit
    (the others get the link's default)."""
    subscriptions = [topics.jobs, topics.cancel, topics.model_desired, topics.membership, topics.renew_answer]
    limits = {
        topics.jobs: config.jobs.max_payload_bytes,
        topics.cancel: CANCEL_MAX_BYTES,
        topics.model_desired: MAX_MANIFEST_BYTES,
    }
    if topics.group_model_desired:
        subscriptions.append(topics.group_model_desired)
        limits[topics.group_model_desired] = MAX_MANIFEST_BYTES
    if topics.shared_group_jobs:
        if config.mqtt.protocol == "5":
            subscriptions.append(topics.shared_group_jobs)
            limits[topics.shared_group_jobs] = config.jobs.max_payload_bytes
        else:
            log.warning("MQTT 3.1.1 has no shared subscriptions: group %s jobs are not served", config.group)
    return subscriptions, limits


def parse(payload: bytes, device_id: str) -> tuple[Membership | None, str | None]:
    """``(membership, None)``, ``(None, None)`` for a cleared one, or ``(None, problem)``."""
    if not payload:
        return None, None
    try:
        membership = Membership.model_validate_json(payload)
    except ValidationError as exc:
        return None, f"not a membership message ({exc.error_count()} problem(s): {exc.errors()[0]['msg']})"
    if membership.device_id != device_id:
        return None, f"it names device {membership.device_id!r}, not this box ({device_id!r})"
    return membership, None


def load(state_dir: Path, device_id: str) -> Membership | None:
    """The membership last applied on this box, or None."""
    try:
        payload = (state_dir / FILE).read_bytes()
    except OSError:
        return None
    membership, problem = parse(payload, device_id)
    if problem is not None:
        log.warning("ignoring %s: %s", state_dir / FILE, problem)
    return membership


def save(state_dir: Path, membership: Membership | None) -> None:
    """Remember (or forget) the membership applied; a failed write is logged (the broker keeps it)."""
    path = state_dir / FILE
    try:
        if membership is None:
            path.unlink(missing_ok=True)
            return
        fd, tmp = tempfile.mkstemp(dir=state_dir, prefix=".membership-")
        with os.fdopen(fd, "w") as f:
            f.write(membership.model_dump_json())
        os.replace(tmp, path)
    except OSError as exc:
        log.warning(
            "cannot keep the membership in %s (%s): a restart starts in agent.toml's group", path, exc
        )
        with contextlib.suppress(OSError, UnboundLocalError):
            os.unlink(tmp)


def describe(group: str | None, labels: dict[str, str]) -> str:
    """``group g2, labels {"site": "x"}`` for the log."""
    return f"group {group or '(none)'}" + (f", labels {json.dumps(labels, sort_keys=True)}" if labels else "")
