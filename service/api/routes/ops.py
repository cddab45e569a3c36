"""Operations: the service's index, liveness, readiness and Prometheus metrics (no API key:
people, probes and scrapers call these; the metrics need the metrics token when the settings
set one)."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends, Request, Response
from fastapi.responses import RedirectResponse
from prometheus_client import CONTENT_TYPE_LATEST

from service.api.deps import (
    MetricsDep,
    QueueDep,
    SessionDep,
    StorageDep,
    require_metrics_token,
)
from service.api.docs import DOCS_PATH
from service.api.responses import problem_responses
from service.contexts import health
from service.schemas import Health, Readiness, ServiceIndex

router = APIRouter(tags=["operations"])

DASHBOARD_PATH = "/admin"


@router.get(
    "/",
    response_model=ServiceIndex,
    responses={
        307: {
            "description": "To the dashboard, for a browser (its `Accept` names text/html).",
            "headers": {"Location": {"schema": {"type": "string"}, "example": DASHBOARD_PATH}},
        }
    },
)
def service_index(request: Request) -> Any:
    """Where this service's parts are: its docs, its OpenAPI document, the dashboard and the
    health probe. A browser (whose `Accept` names text/html) is sent to the dashboard."""
    if "text/html" in request.headers.get("accept", ""):
        return RedirectResponse(DASHBOARD_PATH, status_code=307)
    app = request.app
    return ServiceIndex(
        name=app.title,
        version=app.version,
        docs=DOCS_PATH,
        openapi=app.openapi_url,
        dashboard=DASHBOARD_PATH,
        health="/healthz",
    )


@router.get("/healthz", response_model=Health)
def healthz() -> Health:
    """The process is up."""
    return Health()


@router.get("/readyz", response_model=Readiness, responses=problem_responses(503))
def readyz(session: SessionDep, queue: QueueDep, storage: StorageDep) -> Readiness:
    """The database, the broker and the blob store answer; 503 naming those that do not."""
    return health.readiness(session=session, queue=queue, storage=storage)


@router.get(
    "/metrics",
    response_class=Response,
    dependencies=[Depends(require_metrics_token)],
    responses={
        200: {"description": "Prometheus text format.", "content": {"text/plain": {}}},
        **problem_responses(401),
    },
)
def metrics(metrics: MetricsDep) -> Response:
    """Request counts and latencies by route, and jobs by kind and status."""
    return Response(metrics.exposition(), media_type=CONTENT_TYPE_LATEST)
