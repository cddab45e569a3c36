"""Jobs as their owners see them: listing, reading, cancelling and retrying, on top of the
state machine in `service.contexts.jobs`; and starting a job's work once it is committed."""

from __future__ import annotations

import functools
import logging
import uuid
from dataclasses import dataclass
from typing import Any

from sqlalchemy import bindparam, select
from sqlalchemy.orm import Session

from service.auth import Principal
from service.contexts import jobs, quotas
from service.contexts.access import owner_param, visible_to, visible_to_any
from service.contexts.idempotency import (
    Answer,
    IdempotencyClaim,
    claim_for,
    commit_with_answer,
    find_answer,
    fingerprint,
)
from service.models import Job, SegClass, Training
from service.pagination import (
    newest_first_after,
    newest_first_bound,
    newest_first_cursor,
    newest_first_params,
    split_page,
)
from service.problems import Problem, not_found
from service.queue import TaskQueue, synthesis_queue
from service.reads import Query, ReadDatabase
from service.schemas import JobPublic, JobStatus
from service.settings import Settings

log = logging.getLogger(__name__)

# The Celery task that starts (or resumes) a job of each kind, sent by name.
START_TASKS = {
    "synthesis": "aligndiff.synthesis.start",
    "training": "aligndiff.training.start",
}


@dataclass(frozen=True)
class StartTask:
    """A job whose work must be sent to the workers, after its transaction has committed."""

    kind: str
    job_id: uuid.UUID
    # The queue to send it to (a synthesis job's model's); None: the task's own route.
    queue: str | None = None


@dataclass(frozen=True)
class Accepted:
    """The answer to a request that queued a job, and the job to start; `start` is None when
    the answer is a replay (the first request started the job)."""

    answer: Answer
    start: StartTask | None


def job_queue(
    session: Session, *, kind: str, target_id: uuid.UUID, default_model: str
) -> str | None:
    """The queue a job's tasks are sent to: a synthesis job's go to its class's model's queue
    (a class stored before models were named: `default_model`'s), so that only workers holding
    that model draw them; other kinds' go where their task routes them (None)."""
    if kind != "synthesis":
        return None
    model = session.scalar(select(SegClass.model).where(SegClass.id == target_id))
    return synthesis_queue(model or default_model)


def start_job(*, queue: TaskQueue, start: StartTask | None) -> None:
    """Send a committed job's start task.

    NOTE: a broker that refuses it does not fail the request: the job is committed and stays
    `queued`, and the sweep of unclaimed queued jobs (`jobs.unclaimed_queued_jobs`) sends its
    start again, exactly as when the API stops between the commit and the send.
    """
    if start is None:
        return
    try:
        queue.enqueue(START_TASKS[start.kind], str(start.job_id), queue=start.queue)
    except Exception:
        log.exception("could not send the start of job %s; it stays queued", start.job_id)


# What `JobPublic` shows, in its order.
_SHOWN = (
    Job.id, Job.kind, Job.status, Job.stage, Job.progress, Job.attempts, Job.error,
    Job.owner_id, Job.target_id, Job.created_at, Job.started_at, Job.finished_at,
)  # fmt: skip
_NAMES = tuple(column.key for column in _SHOWN)
_ID, _CREATED_AT = _NAMES.index("id"), _NAMES.index("created_at")


@functools.cache
def _job_reads(*, admin: bool, one: bool, status: bool, kind: bool, after: bool) -> Query:
    """The statement of a job read (`one`: by the bind parameter `job_id`) or of a page of
    jobs, newest first, filtered by the parameters `status` and `kind` when given; compiled
    once per combination."""
    statement = select(*_SHOWN).where(visible_to_any(admin, Job.owner_id))
    if one:
        return statement.where(Job.id == bindparam("job_id"))
    if status:
        statement = statement.where(Job.status == bindparam("status"))
    if kind:
        statement = statement.where(Job.kind == bindparam("kind"))
    return newest_first_bound(statement, created_at=Job.created_at, id_=Job.id, after=after)


async def list_jobs(
    *,
    reads: ReadDatabase,
    principal: Principal,
    status: JobStatus | None,
    kind: str | None,
    limit: int,
    cursor: str | None,
) -> dict[str, Any]:
    """The jobs `principal` may see, newest first, as a `Page[JobPublic]`'s fields."""
    after = newest_first_after(cursor)
    statement = _job_reads(
        admin=principal.is_admin,
        one=False,
        status=status is not None,
        kind=kind is not None,
        after=after is not None,
    )
    params = {
        "status": status,
        "kind": kind,
        **newest_first_params(after, limit),
        **owner_param(principal),
    }
    rows, next_cursor = split_page(
        await reads.rows(statement, params),
        limit=limit,
        cursor_after=lambda row: newest_first_cursor(row[_CREATED_AT], row[_ID]),
    )
    return {
        "items": [dict(zip(_NAMES, row, strict=True)) for row in rows],
        "next_cursor": next_cursor,
    }


async def get_job(
    *, reads: ReadDatabase, principal: Principal, job_id: uuid.UUID
) -> dict[str, Any]:
    """A job as `JobPublic`'s fields; 404 unless `principal` may see it."""
    statement = _job_reads(
        admin=principal.is_admin, one=True, status=False, kind=False, after=False
    )
    rows = await reads.rows(statement, {"job_id": job_id, **owner_param(principal)})
    if not rows:
        raise not_found("job")
    return dict(zip(_NAMES, rows[0], strict=True))


def cancel_job(
    *, session: Session, principal: Principal, job_id: uuid.UUID, idempotency_key: str | None
) -> Answer:
    """Cancel a queued or running job (see `jobs.request_cancel`); 409 once it has finished."""
    claim = _claim(principal, idempotency_key, "cancel_job", job_id)
    if (answer := find_answer(session, claim)) is not None:
        return answer
    job = _visible_job(session, principal, job_id)
    jobs.request_cancel(session, job)
    return _commit_job_answer(session, claim, job)


def retry_job(
    *,
    session: Session,
    settings: Settings,
    principal: Principal,
    job_id: uuid.UUID,
    idempotency_key: str | None,
) -> Accepted:
    """Queue a failed or cancelled job again (see `jobs.retry`); 409 for any other state, 429
    when its owner is at the quota of queued + running jobs (admins have none). The caller
    starts it (`start_job`) once this has returned."""
    claim = _claim(principal, idempotency_key, "retry_job", job_id)
    if (answer := find_answer(session, claim)) is not None:
        return Accepted(answer, start=None)
    job = _visible_job(session, principal, job_id)
    if job.kind == "synthesis" and session.get(SegClass, job.target_id) is None:
        raise Problem(409, "the job's class was deleted; it cannot be retried")
    if job.kind == "training":
        _require_training_classes(session, job.target_id)
    quotas.enforce(session, settings, quotas.JobDemand(job.owner_id, exempt=principal.is_admin))
    jobs.retry(session, job)
    routed_to = job_queue(
        session, kind=job.kind, target_id=job.target_id, default_model=settings.default_model
    )
    answer = _commit_job_answer(session, claim, job)
    start = StartTask(job.kind, job.id, queue=routed_to)
    return Accepted(answer, start=None if answer.replayed else start)


def _require_training_classes(session: Session, training_id: uuid.UUID) -> None:
    """409 when a class the training trains on was deleted: a retry could only fail again."""
    training = session.get(Training, training_id)
    if training is None:
        raise Problem(409, "the job's training was deleted; it cannot be retried")
    wanted = {uuid.UUID(class_id) for class_id in training.class_ids}
    found = set(session.execute(select(SegClass.id).where(SegClass.id.in_(wanted))).scalars())
    if missing := sorted(str(class_id) for class_id in wanted - found):
        raise Problem(
            409, f"the training's class {', '.join(missing)} was deleted; it cannot be retried"
        )


def _claim(
    principal: Principal, key: str | None, operation: str, job_id: uuid.UUID
) -> IdempotencyClaim | None:
    return claim_for(principal.owner_id, key, fingerprint(operation, {"job_id": str(job_id)}))


def _commit_job_answer(session: Session, claim: IdempotencyClaim | None, job: Job) -> Answer:
    # NOTE: the state machine moves jobs with UPDATE statements that bypass the ORM, so the
    # row is re-read before it is answered.
    session.flush()
    session.refresh(job)
    body = JobPublic.model_validate(job).model_dump_json()
    return commit_with_answer(session, claim, Answer(202, body))


def _visible_job(session: Session, principal: Principal, job_id: uuid.UUID) -> Job:
    job = session.execute(
        select(Job).where(Job.id == job_id, visible_to(principal, Job.owner_id))
    ).scalar_one_or_none()
    if job is None:
        raise not_found("job")
    return job
