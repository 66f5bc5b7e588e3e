"""``/api/v1/devices``: the inventory with labels and live state; labels set by operators."""

from __future__ import annotations

from fastapi import APIRouter, HTTPException, Request

from ...domain import selector as sel
from ...errors import FleetError
from ..auth import Operator, Viewer
from ..schemas import DeviceOut, LabelsIn
from ..service import facts_of
from ..store import DeviceRecord, Principal, Store

router = APIRouter(prefix="/api/v1", tags=["devices"])


def device_out(request: Request, record: DeviceRecord) -> DeviceOut:
    """The record, with what the broker says now (online, health, update, telemetry)."""
    link = request.app.state.link
    live = None
    if link is not None:
        with link.lock:
            found = link.view.devices.get(record.device_id)
            live = link.view.row(found) if found is not None and found.last_seen else None
    return DeviceOut(
        device_id=record.device_id,
        online=live.online if live and live.online is not None else record.online,
        revoked=bool(live and live.revoked),
        group=(live.group if live and live.group else None) or record.group,
        # The box's own labels (pushed with its membership, e.g. from its claim) under the server's.
        labels={**(live.labels if live else {}), **record.labels},
        model=(live.model if live else None) or record.model,
        version=(live.version if live else None) or record.version,
        health=live.health if live else record.health,
        last_seen=max(
            filter(None, [record.last_seen, live.last_seen if live and live.online else None]), default=None
        ),
        offline_since=(live.offline_since if live else None) or record.offline_since,
        agent_version=record.agent_version,
        previous=live.previous if live else None,
        update_phase=live.update_phase if live else None,
        update_progress=live.update_progress if live else None,
        update_message=live.update_message if live else None,
        update_version=live.update_version if live else None,
        update_error=live.update_error if live else None,
        temp_c=live.temp_c if live else None,
        mem_available_mb=live.mem_available_mb if live else None,
        queue=live.queue if live else None,
        tok_s=live.tok_s if live else None,
    )


@router.get("/devices", response_model=list[DeviceOut])
def list_devices(
    request: Request, _who: Viewer, group: str | None = None, select: str | None = None
) -> list[DeviceOut]:
    """Every device of the inventory (of ``group``, or matching the selector ``select``)."""
    store: Store = request.app.state.store
    try:
        terms = sel.parse(select) if select else ()
    except FleetError as exc:
        raise HTTPException(422, str(exc)) from None
    found = []
    for record in store.devices():
        if group is not None and record.group != group:
            continue
        if terms and not sel.matches(terms, record.labels, record.group, facts_of(record)):
            continue
        found.append(device_out(request, record))
    return found


def _record(store: Store, device_id: str) -> DeviceRecord:
    record = store.device(device_id)
    if record is None:
        raise HTTPException(404, f"no device {device_id!r} in the inventory (GET /api/v1/devices lists them)")
    return record


@router.get("/devices/{device_id}", response_model=DeviceOut)
def get_device(request: Request, _who: Viewer, device_id: str) -> DeviceOut:
    """One device."""
    return device_out(request, _record(request.app.state.store, device_id))


def _set(request: Request, device_id: str, body: LabelsIn, who: Principal, *, merge: bool) -> DeviceOut:
    store: Store = request.app.state.store
    _record(store, device_id)
    for key, value in body.labels.items():
        try:
            sel.parse(f"{key}={value or ''}")
        except FleetError as exc:
            raise HTTPException(422, str(exc)) from None
        if key in sel.RESERVED:
            raise HTTPException(422, f"{key} is not a label: the box reports it (a selector reads it as is)")
    store.set_labels(device_id, body.labels, who.name, merge=merge)
    return device_out(request, _record(store, device_id))


@router.put("/devices/{device_id}/labels", response_model=DeviceOut)
def put_labels(request: Request, who: Operator, device_id: str, body: LabelsIn) -> DeviceOut:
    """Replace a device's labels."""
    return _set(request, device_id, body, who, merge=False)


@router.patch("/devices/{device_id}/labels", response_model=DeviceOut)
def patch_labels(request: Request, who: Operator, device_id: str, body: LabelsIn) -> DeviceOut:
    """Set some labels of a device (a null value removes the label)."""
    return _set(request, device_id, body, who, merge=True)
