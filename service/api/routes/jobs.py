"""`/v1/jobs`: the long work behind classes and trainings; list, read, cancel, retry."""

from __future__ import annotations

import uuid
from typing import Annotated, Literal, get_args

from fastapi import APIRouter, Query, Request, Response

from service.api.deps import (
    CurrentPrincipal,
    Cursor,
    IdempotencyKey,
    Limit,
    QueueDep,
    SessionDep,
    SettingsDep,
)
from service.api.fast_reads import ReadRequest, fast_read
from service.api.responses import answer_response, json_response, problem_responses
from service.contexts import job_control
from service.pagination import DEFAULT_LIMIT, MAX_LIMIT
from service.schemas import JobPublic, JobStatus, Page

router = APIRouter(prefix="/v1/jobs", tags=["jobs"])

JobKind = Literal["synthesis", "training"]
JOB_STATUSES = frozenset(get_args(JobStatus))
JOB_KINDS = frozenset(get_args(JobKind))


@router.get("", response_model=Page[JobPublic], responses=problem_responses(400, 401, 422))
async def list_jobs(
    request: Request,
    principal: CurrentPrincipal,
    status: Annotated[JobStatus | None, Query(description="Only jobs in this state.")] = None,
    kind: Annotated[JobKind | None, Query(description="Only jobs of this kind.")] = None,
    limit: Limit = DEFAULT_LIMIT,
    cursor: Cursor = None,
) -> Response:
    """The caller's jobs (an admin's: everyone's), newest first."""
    page = await job_control.list_jobs(
        reads=request.app.state.reads,
        principal=principal,
        status=status,
        kind=kind,
        limit=limit,
        cursor=cursor,
    )
    return json_response(page)


@fast_read("/v1/jobs")
async def list_jobs_fast(read: ReadRequest) -> Response:
    page = await job_control.list_jobs(
        reads=read.state.reads,
        principal=read.principal,
        status=read.query_choice("status", JOB_STATUSES),  # type: ignore[arg-type]
        kind=read.query_choice("kind", JOB_KINDS),
        limit=read.query_int("limit", default=DEFAULT_LIMIT, ge=1, le=MAX_LIMIT),
        cursor=read.query_str("cursor"),
    )
    return json_response(page)


@router.get("/{job_id}", response_model=JobPublic, responses=problem_responses(401, 404, 422))
async def get_job(request: Request, principal: CurrentPrincipal, job_id: uuid.UUID) -> Response:
    """A job: its state, stage, progress and error."""
    job = await job_control.get_job(
        reads=request.app.state.reads, principal=principal, job_id=job_id
    )
    return json_response(job)


@fast_read("/v1/jobs/{job_id}")
async def get_job_fast(read: ReadRequest) -> Response:
    job = await job_control.get_job(
        reads=read.state.reads, principal=read.principal, job_id=read.path_uuid("job_id")
    )
    return json_response(job)


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
