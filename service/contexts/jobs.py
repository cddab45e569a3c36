"""Jobs: the state machine of long work. Every transition is a compare-and-set UPDATE, so
racing API calls, workers and redeliveries can only move a job along legal edges.

    queued ──claim──▶ running ──complete──▶ succeeded
      │                 │ ├──fail──────────▶ failed ──retry──▶ queued
      └──cancel──▶ cancelled ◀──(cancel requested, seen between batches)

While running, `stage` only moves forward (inversion → sampling → annotation → scoring) and
`progress` never goes back, so a straggler task of an earlier stage (a redelivered message)
cannot undo a later stage's advance. Progress reports extend the job's lease; a running job
whose lease expired has lost its worker, and `claim` may take it over (counting an attempt).

**One holder per job.** Every claim increments the job's `claim` number, the fencing token. A
worker's writes name the claim it works under (`claim=`): once the job was claimed again (its
worker was partitioned, paused, or too slow, and another took it over) they are refused with
`Fenced`, and the worker abandons its task. `hold` fences writes to other rows (a class's
embedding, a sample) the same way, in their transaction. Calls without `claim=` (the API, the
sweeper) are nobody's holding and are not fenced.

**One clock.** Leases and every timestamp the sweeper compares are the database's time
(`service.db.db_now`), never the clock of the process that writes them.
"""

from __future__ import annotations

import uuid
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import case, func, or_, select, update
from sqlalchemy.orm import Session
from sqlalchemy.sql.elements import ColumnElement

from service.db import db_now
from service.models import Job
from service.problems import Problem

ACTIVE = ("queued", "running")
TERMINAL = ("succeeded", "failed", "cancelled")
STAGES = ("inversion", "sampling", "annotation", "scoring")


class Fenced(Exception):
    """A worker's write refused: the job was claimed again since the claim it works under."""

    def __init__(self, job_id: uuid.UUID, held: int, current: int | None) -> None:
        self.job_id, self.held, self.current = job_id, held, current
        now = "no longer exists" if current is None else f"is at claim {current}"
        super().__init__(f"job {job_id} was claimed again (it {now}; this worker held {held})")


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


def _fence(claim: int | None) -> list[ColumnElement[bool]]:
    """SQL: the job is still at `claim` (nothing when the writer holds no claim)."""
    return [] if claim is None else [Job.claim == claim]


def _cas(
    session: Session,
    job_id: uuid.UUID,
    where: list[ColumnElement[bool]],
    values: dict[str, Any],
    *,
    claim: int | None = None,
) -> bool:
    """Compare-and-set the job's row. False when `where` does not hold; raises `Fenced` when
    it does not because the job was claimed again since `claim`."""
    values = {**values, "updated_at": db_now()}
    result = session.execute(
        update(Job)
        .where(Job.id == job_id, *where, *_fence(claim))
        .values(**values)
        .execution_options(synchronize_session=False)
    )
    done = bool(result.rowcount)  # type: ignore[attr-defined]
    if not done and claim is not None:
        _check_fence(session, job_id, claim)
    return done


def _check_fence(session: Session, job_id: uuid.UUID, claim: int) -> None:
    current = session.scalar(select(Job.claim).where(Job.id == job_id))
    if current != claim:
        raise Fenced(job_id, claim, current)


def hold(session: Session, job_id: uuid.UUID, *, claim: int) -> None:
    """Fence the writes that follow in this transaction: raises `Fenced` unless the job is
    still at `claim`, and keeps it there until the transaction ends (the job's row is
    written, so a claim waits for the commit on PostgreSQL, and SQLite takes its write lock
    now). Writes to rows other than the job's (a class's, a sample's) begin with this."""
    result = session.execute(
        update(Job)
        .where(Job.id == job_id, Job.claim == claim)
        .values(claim=Job.claim, updated_at=Job.updated_at)
        .execution_options(synchronize_session=False)
    )
    if not result.rowcount:  # type: ignore[attr-defined]
        _check_fence(session, job_id, claim)


def claim_prefix(prefix: str, claim: int | None = None) -> str:
    """Where the blobs that one claim of a job writes once per owner go (an embedding,
    prototypes, checkpoints): under `<prefix>claims/<claim>/`, so that a fenced worker's
    write never replaces its successor's; the owner's row, updated under `hold`, names the
    one that counts. Without `claim`: the folder of every claim's."""
    folder = f"{prefix}claims/"
    return folder if claim is None else f"{folder}{claim}/"


def current_claim(session: Session, job_id: uuid.UUID) -> int | None:
    """The claim a running job is at (what a task sent for it works under), None when the
    job does not exist."""
    return session.scalar(select(Job.claim).where(Job.id == job_id))


def request_cancel(session: Session, job: Job, *, reason: str | None = None) -> None:
    """Cancel a job: a queued one ends `cancelled` now; a running one is asked to stop and ends
    `cancelled` when its worker next checks (between batches). A finished job answers 409.
    A `reason` (cancelled by the service, not its owner) becomes the job's `error`."""
    why = {} if reason is None else {"error": reason}
    if _cas(
        session,
        job.id,
        [Job.status == "queued"],
        {"status": "cancelled", "cancel_requested": True, "finished_at": db_now(), **why},
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
) -> int | None:
    """Take a job for work: queued → running, or take over a running job whose lease expired
    (its worker died, or is cut off). Counts an attempt; past `max_attempts` the job fails
    instead. Returns the new claim, the token the worker's writes carry (None: not claimed)."""
    claimable = [
        Job.cancel_requested.is_(False),
        or_(
            Job.status == "queued",
            (Job.status == "running") & (Job.lease_expires_at < db_now()),
        ),
    ]
    if _cas(
        session,
        job_id,
        [*claimable, Job.attempts >= max_attempts],
        {
            "status": "failed",
            "error": f"gave up after {max_attempts} attempts",
            "finished_at": db_now(),
        },
    ):
        return None
    claimed = session.execute(
        update(Job)
        .where(Job.id == job_id, *claimable)
        .values(
            status="running",
            attempts=Job.attempts + 1,
            claim=Job.claim + 1,
            worker=worker,
            lease_expires_at=db_now(lease_seconds),
            started_at=func.coalesce(Job.started_at, db_now()),
            updated_at=db_now(),
        )
        .returning(Job.claim)
        .execution_options(synchronize_session=False)
    ).scalar_one_or_none()
    return claimed


def report_progress(
    session: Session,
    job_id: uuid.UUID,
    *,
    stage: str | None,
    progress: float,
    lease_seconds: int,
    claim: int | None = None,
) -> bool:
    """Record progress in `stage` and extend the lease. The stage only moves forward and the
    progress only up (concurrent chunk tasks report out of order); `stage` None (a job of no
    stages: training) leaves it as it is. False when the job should stop (cancel requested,
    no longer running, or its lease ran out: the job is up for takeover); `Fenced` when it was
    claimed again since `claim`.

    NOTE: a lease that ran out is never renewed, whoever reports: the sweep ends the lease of
    a job whose worker went silent, and another worker's report must not undo that before the
    sweep claims it (the silent worker's unfinished task would wait for a whole lease)."""
    value = max(0.0, min(1.0, progress))
    values: dict[str, Any] = {
        "progress": case((Job.progress < value, value), else_=Job.progress),
        "lease_expires_at": db_now(lease_seconds),
    }
    if stage is not None:
        values["stage"] = case((_earlier_or_no_stage(stage), stage), else_=Job.stage)
    live_lease = or_(Job.lease_expires_at.is_(None), Job.lease_expires_at >= db_now())
    return _cas(
        session,
        job_id,
        [Job.status == "running", Job.cancel_requested.is_(False), live_lease],
        values,
        claim=claim,
    )


def advance_stage(
    session: Session, job_id: uuid.UUID, *, stage: str, claim: int | None = None
) -> bool:
    """Move a running job to `stage` if that is a step forward. True for the one caller that
    moved it (the compare-and-set that makes a stage's fan-out happen once)."""
    return _cas(
        session,
        job_id,
        [Job.status == "running", Job.cancel_requested.is_(False), _earlier_or_no_stage(stage)],
        {"stage": stage},
        claim=claim,
    )


def should_stop(session: Session, job_id: uuid.UUID) -> bool:
    job = session.execute(
        select(Job.status, Job.cancel_requested).where(Job.id == job_id)
    ).one_or_none()
    return job is None or job.status != "running" or bool(job.cancel_requested)


def finish_cancelled(session: Session, job_id: uuid.UUID, *, claim: int | None = None) -> bool:
    return _cas(
        session,
        job_id,
        [Job.status == "running", Job.cancel_requested.is_(True)],
        {"status": "cancelled", "finished_at": db_now(), "lease_expires_at": None},
        claim=claim,
    )


def complete(session: Session, job_id: uuid.UUID, *, claim: int | None = None) -> bool:
    return _cas(
        session,
        job_id,
        [Job.status == "running", Job.cancel_requested.is_(False)],
        {
            "status": "succeeded",
            "progress": 1.0,
            "stage": None,
            "finished_at": db_now(),
            "lease_expires_at": None,
        },
        claim=claim,
    )


def fail(
    session: Session,
    job_id: uuid.UUID,
    error: str,
    *,
    traceback: str | None = None,
    claim: int | None = None,
) -> bool:
    """Fail an active job with a short `error` (public) and the `traceback` (admins only)."""
    return _cas(
        session,
        job_id,
        [Job.status.in_(ACTIVE)],
        {
            "status": "failed",
            "error": error[-8000:],
            "traceback": traceback[-20000:] if traceback is not None else None,
            "finished_at": db_now(),
            "lease_expires_at": None,
        },
        claim=claim,
    )


def stale_running_jobs(
    session: Session, *, now: datetime | None = None, kind: str | None = None
) -> list[uuid.UUID]:
    """Running jobs whose lease expired (by the database's clock, or at `now`): their worker
    died; they can be claimed again."""
    moment = db_now() if now is None else now
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
        Job.updated_at < db_now(-older_than),
    )
    if kind is not None:
        query = query.where(Job.kind == kind)
    return [row[0] for row in session.execute(query)]
