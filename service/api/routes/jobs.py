"""`/v1/jobs`: the long work behind classes and trainings; list, read, cancel, retry."""

from __future__ import annotations

import uuid
from typing import Annotated, Literal

from fastapi import APIRouter, Query, Response

from service.api.deps import (
    CurrentPrincipal,
    Cursor,
    IdempotencyKey,
    Limit,
    QueueDep,
    SessionDep,
    SettingsDep,
)
from service.api.responses import answer_response, problem_responses
from service.contexts import job_control
from service.pagination import DEFAULT_LIMIT
from service.schemas import JobPublic, JobStatus, Page

router = APIRouter(prefix="/v1/jobs", tags=["jobs"])


@router.get("", response_model=Page[JobPublic], responses=problem_responses(400, 401, 422))
def list_jobs(
    session: SessionDep,
    principal: CurrentPrincipal,
    status: Annotated[JobStatus | None, Query(description="Only jobs in this state.")] = None,
    kind: Annotated[
        Literal["synthesis", "training"] | None, Query(description="Only jobs of this kind.")
    ] = None,
    limit: Limit = DEFAULT_LIMIT,
    cursor: Cursor = None,
) -> Page[JobPublic]:
    """The caller's jobs (an admin's: everyone's), newest first."""
    return job_control.list_jobs(
        session=session, principal=principal, status=status, kind=kind, limit=limit, cursor=cursor
    )


@router.get("/{job_id}", response_model=JobPublic, responses=problem_responses(401, 404, 422))
def get_job(session: SessionDep, principal: CurrentPrincipal, job_id: uuid.UUID) -> JobPublic:
    """A job: its state, stage, progress and error."""
    return job_control.get_job(session=session, principal=principal, job_id=job_id)


@router.post(
    "/{job_id}/cancel",
    status_code=202,
    response_model=JobPublic,
    responses=problem_responses(401, 404, 409, 422),
)
def cancel_job(
    session: SessionDep,
    principal: CurrentPrincipal,
    job_id: uuid.UUID,
    idempotency_key: IdempotencyKey = None,
) -> Response:
    """Cancel a queued or running job: a queued job ends `cancelled` at once, a running one
    within one batch. 409 once the job has finished."""
    answer = job_control.cancel_job(
        session=session, principal=principal, job_id=job_id, idempotency_key=idempotency_key
    )
    return answer_response(answer)


@router.post(
    "/{job_id}/retry",
    status_code=202,
    response_model=JobPublic,
    responses=problem_responses(401, 404, 409, 422),
)
def retry_job(
    session: SessionDep,
    queue: QueueDep,
    settings: SettingsDep,
    principal: CurrentPrincipal,
    job_id: uuid.UUID,
    idempotency_key: IdempotencyKey = None,
) -> Response:
    """Queue a failed or cancelled job again; the work it already stored is kept, not redone.
    409 for a job in any other state; 429 when its owner has as many jobs queued or running
    as the quota allows."""
    accepted = job_control.retry_job(
        session=session,
        settings=settings,
        principal=principal,
        job_id=job_id,
        idempotency_key=idempotency_key,
    )
    job_control.start_job(queue=queue, start=accepted.start)
    return answer_response(accepted.answer)
