"""What the dashboard reads that ``/api/v1/`` lacked: the fleet overview with counts, a device's
telemetry history, update outcomes and last jobs, and a rollout's targets wave by wave.

Every route takes the same tokens (or the dashboard's session) as the rest of the API.
"""

from __future__ import annotations

import json
import time
from typing import Any

from fastapi import APIRouter, HTTPException, Query, Request

from ...errors import FleetError
from ..api.devices import device_out
from ..api.rollouts import rollout_out
from ..auth import Operator, Viewer
from ..service import FleetService
from ..store import Store
from .history import History

router = APIRouter(prefix="/api/v1", tags=["dashboard"])
_UPDATING = ("downloading", "verifying", "testing", "activating")
_ROUNDED = ("last_seen", "offline_since", "temp_c", "tok_s")


def _live(request: Request) -> dict[str, dict[str, Any]]:
    """Per device: health reasons and certificate expiry from its last status and telemetry."""
    link = request.app.state.link
    found: dict[str, dict[str, Any]] = {}
    if link is None:
        return found
    with link.lock:
        for device in link.view.devices.values():
            tele, status = device.telemetry, device.status
            health = tele.health if tele and tele.health else (status.health if status else None)
            found[device.device_id] = {
                "reasons": list(health.reasons) if health else [],
                "cert_expires_at": tele.cert_expires_at if tele else None,
            }
    return found


def _targets(store: Store) -> tuple[dict[str, str | None], dict[str, str | None]]:
    """The release each device and each group is assigned (None: withdrawn)."""
    by_device: dict[str, str | None] = {}
    by_group: dict[str, str | None] = {}
    for a in store.current_assignments():
        (by_device if a["kind"] == "device" else by_group)[a["target"]] = a["release"]
    return by_device, by_group


@router.get("/fleet")
def fleet(request: Request, _who: Viewer) -> dict[str, Any]:
    """Every device with health reasons and its target release, the counts of the fleet's header
    (online, offline, degraded, updating, behind the target), and the groups, labels and versions
    seen (for the page's filters)."""
    store: Store = request.app.state.store
    live = _live(request)
    by_device, by_group = _targets(store)
    rows = []
    for record in store.devices():
        row = device_out(request, record).model_dump()
        for key in _ROUNDED:  # a tenth is all the page shows; the JSON of 1,000 devices stays small
            if row[key] is not None:
                row[key] = round(row[key], 1)
        extra = live.get(record.device_id, {})
        row["reasons"] = extra.get("reasons", [])
        row["cert_expires_at"] = extra.get("cert_expires_at")
        target = (
            by_device[record.device_id] if record.device_id in by_device else by_group.get(row["group"] or "")
        )
        running = f"{row['model']}@{row['version']}" if row["model"] else None
        row["target"] = target
        row["behind"] = target is not None and target != running
        rows.append(row)
    counts = {
        "devices": len(rows),
        "online": sum(1 for r in rows if r["online"]),
        "offline": sum(1 for r in rows if not r["online"]),
        "degraded": sum(1 for r in rows if r["online"] and r["health"] == "degraded"),
        "updating": sum(1 for r in rows if r["update_phase"] in _UPDATING),
        "behind": sum(1 for r in rows if r["behind"]),
    }
    return {
        "now": time.time(),
        "counts": counts,
        "devices": rows,
        "groups": sorted({r["group"] for r in rows if r["group"]}),
        "versions": sorted({f"{r['model']}@{r['version']}" for r in rows if r["model"]}),
        "labels": sorted({f"{k}={v}" for r in rows for k, v in r["labels"].items()}),
    }


def _known(store: Store, device_id: str) -> None:
    if store.device(device_id) is None:
        raise HTTPException(404, f"no device {device_id!r} in the inventory (GET /api/v1/devices lists them)")


@router.get("/devices/{device_id}/telemetry")
def telemetry(
    request: Request,
    _who: Viewer,
    device_id: str,
    since: float | None = Query(None, description="Unix time (default: an hour ago); at most 30 days back"),
    points: int = Query(360, ge=10, le=2000, description="At most this many points (averaged slices)"),
) -> dict[str, Any]:
    """The device's telemetry history as columns (``at``, ``tok_s``, ``temp_c``, ``mem_mb``, ``queue``,
    ``jobs_per_min``): full resolution for the last day, 5-minute means before."""
    store: Store = request.app.state.store
    _known(store, device_id)
    history: History = request.app.state.history
    now = time.time()
    start = now - 3600 if since is None else since
    if not now - history.keep_s - 86400 <= start <= now:
        raise HTTPException(
            422, f"since must be a Unix time within the last {history.keep_s / 86400:.0f} days"
        )
    return history.series(device_id, start, max_points=points)


@router.get("/devices/{device_id}/updates")
def updates(request: Request, _who: Viewer, device_id: str) -> dict[str, Any]:
    """The device's update history: its part in each rollout with the outcome, the desired-state
    assignments recorded for it (and its group), and the update it reports now."""
    store: Store = request.app.state.store
    _known(store, device_id)
    rows = store.db.query(
        "SELECT t.rollout, r.release, t.state, t.detail, t.before, t.sent_at, t.updated FROM targets t "
        "JOIN rollouts r ON r.id = t.rollout WHERE t.device = ? ORDER BY t.updated DESC LIMIT 50",
        (device_id,),
    )
    keys = ("rollout", "release", "state", "detail", "before", "sent_at", "updated")
    now = device_out(request, store.device(device_id))  # type: ignore[arg-type]
    return {
        "rollouts": [dict(zip(keys, r, strict=True)) for r in rows],
        "assignments": store.history(device_id)[-50:][::-1],
        "current": {"phase": now.update_phase, "error": now.update_error},
    }


@router.get("/devices/{device_id}/jobs")
def device_jobs(request: Request, _who: Viewer, device_id: str, limit: int = 20) -> list[dict[str, Any]]:
    """The last jobs the server sent to the device, or to its group and the device answered: state,
    finish reason, tokens, decode speed, error."""
    store: Store = request.app.state.store
    record = store.device(device_id)
    if record is None:
        _known(store, device_id)
        return []
    rows = store.db.query(
        "SELECT id, target, state, result, error, actor, created, finished FROM jobs "
        "WHERE target = ? OR target = ? ORDER BY created DESC LIMIT 500",
        (f"device {device_id}", f"group {record.group}"),
    )
    found = []
    for job_id, target, state, result, error, actor, created, finished in rows:
        answer = json.loads(result) if result else {}
        if target.startswith("group ") and answer.get("device_id") != device_id:
            continue
        timings = answer.get("timings") or {}
        found.append({
            "id": job_id, "target": target, "state": state, "finish_reason": answer.get("finish_reason"),
            "completion_tokens": (answer.get("usage") or {}).get("completion_tokens"),
            "decode_tok_s": timings.get("decode_tokens_per_s"),
            "error": error or (answer.get("error") or {}).get("message"), "actor": actor,
            "created": created, "finished": finished,
        })  # fmt: skip
        if len(found) >= min(limit, 200):
            break
    return found


@router.get("/targets")
def targets(
    request: Request, _who: Viewer, rollout: str = Query(description="The rollout's id")
) -> dict[str, Any]:
    """A rollout with every device by wave (state, detail) and its last 30 lines of progress."""
    service: FleetService = request.app.state.service
    try:
        found = service.rollout(rollout)
    except FleetError as exc:
        raise HTTPException(404, str(exc)) from None
    rows = service.rollouts.targets(rollout)
    return {
        "rollout": rollout_out(service, found).model_dump(),
        "targets": [
            {
                "device": t.device,
                "wave": t.wave + 1,
                "state": t.state,
                "detail": t.detail,
                "sent_at": t.sent_at,
            }
            for t in sorted(rows.values(), key=lambda t: (t.wave, t.device))
        ],
        "events": service.rollouts.events(rollout)[-30:],
    }


@router.post("/rollouts/{rollout_id:path}/pause")
def pause(request: Request, who: Operator, rollout_id: str) -> dict[str, Any]:
    """Halt a running rollout by hand: no further box is sent the release (boxes already sent it
    finish); ``…/resume`` continues it."""
    service: FleetService = request.app.state.service
    try:
        found = service.rollout(rollout_id)
    except FleetError as exc:
        raise HTTPException(404, str(exc)) from None
    if found.resume_on_recovery:
        raise HTTPException(
            409,
            f"rollout {rollout_id} resumes by itself (resume_on_recovery): a pause would not hold; abort it",
        )
    with service.store.db.transaction():
        if not service.rollouts.update(
            rollout_id, only_if=("running",), state="halted", reason=f"paused by {who.name}"
        ):
            raise HTTPException(
                409, f"rollout {rollout_id} is {found.state}, not running: only a running one pauses"
            )
        service.store.audit(who.name, "rollout.pause", rollout_id, {})
        service.rollouts.event(rollout_id, f"PAUSED by {who.name} (resume to continue)")
    return rollout_out(service, service.rollout(rollout_id)).model_dump()
