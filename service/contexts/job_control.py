"""Jobs as their owners see them: listing, reading, cancelling and retrying, on top of the
state machine in `service.contexts.jobs`; and starting a job's work once it is committed."""

from __future__ import annotations

import logging
import uuid
from dataclasses import dataclass

from sqlalchemy import select
from sqlalchemy.orm import Session

from service.auth import Principal
from service.contexts import jobs, quotas
from service.contexts.access import visible_to
from service.contexts.idempotency import (
    Answer,
    IdempotencyClaim,
    claim_for,
    commit_with_answer,
    find_answer,
    fingerprint,
)
from service.models import Job, SegClass, Training
from service.pagination import newest_first, newest_first_cursor, split_page
from service.problems import Problem, not_found
from service.queue import TaskQueue, synthesis_queue
from service.schemas import JobPublic, JobStatus, Page
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


def list_jobs(
    *,
    session: Session,
    principal: Principal,
    status: JobStatus | None,
    kind: str | None,
    limit: int,
    cursor: str | None,
) -> Page[JobPublic]:
    """The jobs `principal` may see, newest first."""
    statement = select(Job).where(visible_to(principal, Job.owner_id))
    if status is not None:
        statement = statement.where(Job.status == status)
    if kind is not None:
        statement = statement.where(Job.kind == kind)
    statement = newest_first(
        statement, created_at=Job.created_at, id_=Job.id, cursor=cursor, limit=limit
    )
    rows, next_cursor = split_page(
        session.execute(statement).scalars().all(),
        limit=limit,
        cursor_after=lambda job: newest_first_cursor(job.created_at, job.id),
    )
    return Page[JobPublic](
        items=[JobPublic.model_validate(job) for job in rows], next_cursor=next_cursor
    )


def get_job(*, session: Session, principal: Principal, job_id: uuid.UUID) -> JobPublic:
    return JobPublic.model_validate(_visible_job(session, principal, job_id))


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
