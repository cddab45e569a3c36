"""Jobs: the state machine of long work. Every transition is a compare-and-set UPDATE, so
racing API calls, workers and redeliveries can only move a job along legal edges.

    queued ──claim──▶ running ──complete──▶ succeeded
      │                 │ ├──fail──────────▶ failed ──retry──▶ queued
      └──cancel──▶ cancelled ◀──(cancel requested, seen between batches)
"""

from __future__ import annotations

import uuid
from datetime import datetime, timedelta

from sqlalchemy import or_, select, update
from sqlalchemy.orm import Session

from service.models import Job, utcnow
from service.problems import Problem

ACTIVE = ("queued", "running")
TERMINAL = ("succeeded", "failed", "cancelled")


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


def request_cancel(session: Session, job: Job) -> None:
    """Cancel a job: a queued one ends `cancelled` now; a running one is asked to stop and ends
    `cancelled` when its worker next checks (between batches). A finished job answers 409."""
    now = utcnow()
    if _cas(
        session,
        job.id,
        [Job.status == "queued"],
        {"status": "cancelled", "cancel_requested": True, "finished_at": now},
    ):
        return
    if _cas(session, job.id, [Job.status == "running"], {"cancel_requested": True}):
        return
    session.refresh(job)
    raise Problem(409, f"the job is already {job.status}")


def retry(session: Session, job: Job) -> None:
    """Queue a failed or cancelled job again; stored work is kept (tasks skip what exists)."""
    values = {
        "status": "queued",
        "error": None,
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
    session: Session, job_id: uuid.UUID, *, stage: str, progress: float, lease_seconds: int
) -> bool:
    """Record stage and progress and extend the lease. False when the job should stop
    (cancel requested, or no longer running)."""
    moved = _cas(
        session,
        job_id,
        [Job.status == "running", Job.cancel_requested.is_(False)],
        {
            "stage": stage,
            "progress": max(0.0, min(1.0, progress)),
            "lease_expires_at": utcnow() + timedelta(seconds=lease_seconds),
        },
    )
    return moved


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


def fail(session: Session, job_id: uuid.UUID, error: str) -> bool:
    return _cas(
        session,
        job_id,
        [Job.status.in_(ACTIVE)],
        {
            "status": "failed",
            "error": error[-8000:],
            "finished_at": utcnow(),
            "lease_expires_at": None,
        },
    )


def stale_running_jobs(session: Session, *, now: datetime | None = None) -> list[uuid.UUID]:
    """Running jobs whose lease expired: their worker died; they can be claimed again."""
    moment = now or utcnow()
    rows = session.execute(
        select(Job.id).where(Job.status == "running", Job.lease_expires_at < moment)
    )
    return [row[0] for row in rows]
