"""Jobs: the state machine of long work. Every transition is a compare-and-set UPDATE, so
racing API calls, workers and redeliveries can only move a job along legal edges.

    queued ──claim──▶ running ──complete──▶ succeeded
      │                 │ ├──fail──────────▶ failed ──retry──▶ queued
      └──cancel──▶ cancelled ◀──(cancel requested, seen between batches)

While running, `stage` only moves forward (inversion → sampling → annotation → scoring) and
`progress` never goes back, so a straggler task of an earlier stage (a redelivered message)
cannot undo a later stage's advance. Progress reports extend the job's lease; a running job
whose lease expired has lost its worker, and `claim` may take it over (counting an attempt).
"""

from __future__ import annotations

import uuid
from datetime import datetime, timedelta

from sqlalchemy import case, or_, select, update
from sqlalchemy.orm import Session
from sqlalchemy.sql.elements import ColumnElement

from service.models import Job, utcnow
from service.problems import Problem

ACTIVE = ("queued", "running")
TERMINAL = ("succeeded", "failed", "cancelled")
STAGES = ("inversion", "sampling", "annotation", "scoring")


def _earlier_or_no_stage(stage: str) -> ColumnElement[bool]:
    """SQL: the job's stage is before `stage` (or not set yet)."""
    if stage not in STAGES:
        raise ValueError(f"unknown stage {stage!r}; expected one of {STAGES}")
    return or_(Job.stage.is_(None), Job.stage.in_(STAGES[: STAGES.index(stage)]))


def create_job(session: Session, *, kind: str, owner_id: uuid.UUID, target_id: uuid.UUID) -> Job:
    job = Job(kind=kind, owner_id=owner_id, target_id=target_id, status="queued")
    session.add(job)
    session.flush()
    return job


def _cas(session: Session, job_id: uuid.UUID, where: list, values: dict) -> bool:  # type: ignore[type-arg]
    values = {**values, "updated_at": utcnow()}
    result = session.execute(
        update(Job)
        .where(Job.id == job_id, *where)
        .values(**values)
        .execution_options(synchronize_session=False)
    )
    return bool(result.rowcount)  # type: ignore[attr-defined]


def request_cancel(session: Session, job: Job, *, reason: str | None = None) -> None:
    """Cancel a job: a queued one ends `cancelled` now; a running one is asked to stop and ends
    `cancelled` when its worker next checks (between batches). A finished job answers 409.
    A `reason` (cancelled by the service, not its owner) becomes the job's `error`."""
    now = utcnow()
    why = {} if reason is None else {"error": reason}
    if _cas(
        session,
        job.id,
        [Job.status == "queued"],
        {"status": "cancelled", "cancel_requested": True, "finished_at": now, **why},
    ):
        return
    if _cas(session, job.id, [Job.status == "running"], {"cancel_requested": True, **why}):
        return
    session.refresh(job)
    raise Problem(409, f"the job is already {job.status}")


def retry(session: Session, job: Job) -> None:
    """Queue a failed or cancelled job again; stored work is kept (tasks skip what exists)."""
    values = {
        "status": "queued",
        "error": None,
        "traceback": None,
        "cancel_requested": False,
        "finished_at": None,
        "lease_expires_at": None,
        "attempts": 0,
    }
    if not _cas(session, job.id, [Job.status.in_(("failed", "cancelled"))], values):
        session.refresh(job)
        raise Problem(
            409, f"only failed or cancelled jobs can be retried; this one is {job.status}"
        )


def claim(
    session: Session, job_id: uuid.UUID, *, worker: str, lease_seconds: int, max_attempts: int
) -> bool:
    """Take a job for work: queued → running, or take over a running job whose lease expired
    (its worker died). Counts an attempt; past `max_attempts` the job fails instead."""
    now = utcnow()
    claimable = [
        Job.cancel_requested.is_(False),
        or_(Job.status == "queued", (Job.status == "running") & (Job.lease_expires_at < now)),
    ]
    if _cas(
        session,
        job_id,
        [*claimable, Job.attempts >= max_attempts],
        {"status": "failed", "error": f"gave up after {max_attempts} attempts", "finished_at": now},
    ):
        return False
    job = session.get(Job, job_id)
    started = job.started_at if job is not None and job.started_at else now
    return _cas(
        session,
        job_id,
        claimable,
        {
            "status": "running",
            "attempts": Job.attempts + 1,
            "worker": worker,
            "lease_expires_at": now + timedelta(seconds=lease_seconds),
            "started_at": started,
        },
    )


def report_progress(
    session: Session,
    job_id: uuid.UUID,
    *,
    stage: str | None,
    progress: float,
    lease_seconds: int,
) -> bool:
    """Record progress in `stage` and extend the lease. The stage only moves forward and the
    progress only up (concurrent chunk tasks report out of order); `stage` None (a job of no
    stages: training) leaves it as it is. False when the job should stop (cancel requested,
    or no longer running)."""
    value = max(0.0, min(1.0, progress))
    values = {
        "progress": case((Job.progress < value, value), else_=Job.progress),
        "lease_expires_at": utcnow() + timedelta(seconds=lease_seconds),
    }
    if stage is not None:
        values["stage"] = case((_earlier_or_no_stage(stage), stage), else_=Job.stage)
    return _cas(session, job_id, [Job.status == "running", Job.cancel_requested.is_(False)], values)


def advance_stage(session: Session, job_id: uuid.UUID, *, stage: str) -> bool:
    """Move a running job to `stage` if that is a step forward. True for the one caller that
    moved it (the compare-and-set that makes a stage's fan-out happen once)."""
    return _cas(
        session,
        job_id,
        [Job.status == "running", Job.cancel_requested.is_(False), _earlier_or_no_stage(stage)],
        {"stage": stage},
    )


def should_stop(session: Session, job_id: uuid.UUID) -> bool:
    job = session.execute(
        select(Job.status, Job.cancel_requested).where(Job.id == job_id)
    ).one_or_none()
    return job is None or job.status != "running" or bool(job.cancel_requested)


def finish_cancelled(session: Session, job_id: uuid.UUID) -> bool:
    return _cas(
        session,
        job_id,
        [Job.status == "running", Job.cancel_requested.is_(True)],
        {"status": "cancelled", "finished_at": utcnow(), "lease_expires_at": None},
    )


def complete(session: Session, job_id: uuid.UUID) -> bool:
    return _cas(
        session,
        job_id,
        [Job.status == "running", Job.cancel_requested.is_(False)],
        {
            "status": "succeeded",
            "progress": 1.0,
            "stage": None,
            "finished_at": utcnow(),
            "lease_expires_at": None,
        },
    )


def fail(session: Session, job_id: uuid.UUID, error: str, *, traceback: str | None = None) -> bool:
    """Fail an active job with a short `error` (public) and the `traceback` (admins only)."""
    return _cas(
        session,
        job_id,
        [Job.status.in_(ACTIVE)],
        {
            "status": "failed",
            "error": error[-8000:],
            "traceback": traceback[-20000:] if traceback is not None else None,
            "finished_at": utcnow(),
            "lease_expires_at": None,
        },
    )


def stale_running_jobs(
    session: Session, *, now: datetime | None = None, kind: str | None = None
) -> list[uuid.UUID]:
    """Running jobs whose lease expired: their worker died; they can be claimed again."""
    moment = now or utcnow()
    query = select(Job.id).where(Job.status == "running", Job.lease_expires_at < moment)
    if kind is not None:
        query = query.where(Job.kind == kind)
    return [row[0] for row in session.execute(query)]


def unclaimed_queued_jobs(
    session: Session, *, older_than: timedelta, kind: str | None = None
) -> list[uuid.UUID]:
    """Queued jobs no worker has claimed for `older_than`: their start message may be lost
    (the API stopped between commit and enqueue). Enqueueing one again is harmless: a second
    start finds it claimed and does nothing."""
    query = select(Job.id).where(
        Job.status == "queued",
        Job.cancel_requested.is_(False),
        Job.updated_at < utcnow() - older_than,
    )
    if kind is not None:
        query = query.where(Job.kind == kind)
    return [row[0] for row in session.execute(query)]
