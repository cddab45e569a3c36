"""Operations: liveness, readiness and Prometheus metrics (no API key: probes and scrapers
call these; the metrics need the metrics token when the settings set one)."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Response
from prometheus_client import CONTENT_TYPE_LATEST

from service.api.deps import (
    MetricsDep,
    QueueDep,
    SessionDep,
    StorageDep,
    require_metrics_token,
)
from service.api.responses import problem_responses
from service.contexts import health
from service.schemas import Health, Readiness

router = APIRouter(tags=["operations"])


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
