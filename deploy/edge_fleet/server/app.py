"""The fleet server's HTTP application: ``create_app(store, …)``.

Routers are modular (``api/devices.py``, ``api/rollouts.py``, …); another router (a dashboard,
an OpenAI-compatible gateway) is added with ``app.include_router`` and guards its routes with
``auth.require(role)``.  ``/openapi.json`` documents the API; ``/healthz`` answers without a token.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI

from edge_contract import __version__

from .api import audit, deployments, devices, enrollments, jobs, metrics, rollouts, tokens
from .api.enrollments import EnrollmentDesk
from .broker_link import BrokerLink
from .dashboard.mount import mount as mount_dashboard
from .gateway import mount as mount_gateway
from .service import FleetService
from .store import Store


def create_app(
    store: Store,
    link: BrokerLink | None = None,
    *,
    controller: Any = None,
    metrics_public: bool = False,
    enroll: EnrollmentDesk | None = None,
) -> FastAPI:
    """The API over ``store`` (and the broker ``link``, when there is one; the enrollment queue
    with ``enroll``, a server beside the fleet CA)."""
    app = FastAPI(
        title="edge-fleet server",
        version=__version__,
        description="The control plane of an edge-agent fleet: devices, labels, rollouts, jobs, audit, metrics.",
    )
    app.state.store = store
    app.state.link = link
    app.state.service = FleetService(store, link)
    app.state.controller = controller
    app.state.enroll = enroll
    app.state.registry = metrics.registry_for(app)
    for router in (
        devices.router,
        rollouts.router,
        deployments.router,
        jobs.router,
        audit.router,
        tokens.router,
        enrollments.router,
    ):
        app.include_router(router)
    app.include_router(metrics.public_router if metrics_public else metrics.router)
    mount_dashboard(app)  # the web page at / and its routes (issue 26)
    mount_gateway(app)  # OpenAI- and Ollama-compatible /v1/… and /api/… over the fleet (issue 25)

    @app.get("/healthz", tags=["health"])
    def healthz() -> dict[str, Any]:
        """200 while the server runs (no token): its broker link, database and leadership."""
        store.db.one("SELECT 1")
        answer: dict[str, Any] = {"ok": True, "version": __version__, "database": store.db.dialect}
        if link is not None:
            answer["broker_connected"] = link.connected
        if controller is not None:
            answer["leading"] = sorted(controller.stats.leading)
            answer["controller_error"] = controller.stats.last_error
            answer["republished"] = controller.stats.republished
        return answer

    return app
