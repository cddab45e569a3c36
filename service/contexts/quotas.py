"""Per-owner quotas on GPU work: queued + running jobs, samples per class, and the bytes of
the uploads an owner's classes and trainings keep. Over the jobs quota, which lifts as jobs
finish, answers 429 with `Retry-After`; over a cap that waiting cannot lift (samples per class,
stored bytes) answers 422 without one (API.md), with the problem type `OVER_LASTING_QUOTA`.

`enforce` is called in the transaction that queues the job, after it has locked the owner's
row: one owner's concurrent requests are then counted one after another, so N racing
creates against a quota of k queue exactly k jobs, on PostgreSQL and on SQLite alike.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass

from sqlalchemy import func, select, update
from sqlalchemy.orm import Session

from service.contexts.jobs import ACTIVE
from service.models import Job, Owner, SegClass, Training
from service.problems import Problem
from service.settings import Settings

# The problem `type` of a refusal that waiting cannot lift (a request over a per-class cap,
# uploads over the bytes quota): clients should change the request, not retry it. Over the
# concurrent-jobs quota keeps "about:blank", like a rate limit: it lifts as jobs finish.
OVER_LASTING_QUOTA = "urn:aligndiff:problem:over-quota"


def lock_owner(session: Session, owner_id: uuid.UUID) -> None:
    """Take the owner's lock until the session's transaction ends.

    NOTE: a no-op UPDATE of the owner's row: PostgreSQL locks that row (a concurrent request
    of the same owner waits here, those of other owners do not), SQLite takes its database
    write lock (every writer waits, for the few statements left to commit).
    """
    session.execute(
        update(Owner)
        .where(Owner.id == owner_id)
        .values(name=Owner.name)
        .execution_options(synchronize_session=False)
    )


def check_samples(settings: Settings, *, num_samples: int, exempt: bool) -> None:
    """422 when a class asks for more samples than an owner's quota per class."""
    cap = settings.quota_samples_per_class
    if exempt or cap == 0 or num_samples <= cap:
        return
    raise _over_quota(
        settings,
        f"{num_samples} samples is over your quota of {cap} per class; ask for fewer",
        errors=[{"field": "num_samples", "message": f"must be at most {cap} for your key"}],
        lasting=True,
    )


@dataclass(frozen=True)
class JobDemand:
    """What a request that queues a job asks of its owner's quotas."""

    owner_id: uuid.UUID
    exempt: bool  # admin keys: no quotas
    upload_bytes: int = 0  # the uploads its class or training will keep


def enforce(session: Session, settings: Settings, demand: JobDemand, *, lock: bool = True) -> None:
    """429 when one more queued job would take the owner over the jobs quota; 422 when keeping
    `demand.upload_bytes` more of uploads would take it over the bytes quota. With `lock`, the
    owner's lock is taken first (see `lock_owner`): the caller then adds its job in the same
    transaction, and the count stays true until it commits. Without, it is an early check that
    saves a doomed request its work."""
    if demand.exempt:
        return
    if lock:
        lock_owner(session, demand.owner_id)
    cap = settings.quota_concurrent_jobs
    if cap:
        active = session.execute(
            select(func.count())
            .select_from(Job)
            .where(Job.owner_id == demand.owner_id, Job.status.in_(ACTIVE))
        ).scalar_one()
        if active >= cap:
            raise _over_quota(
                settings,
                f"you have {active} jobs queued or running, your quota; wait for one to "
                "finish, or cancel one",
            )
    cap = settings.quota_upload_bytes
    if cap and demand.upload_bytes:
        kept = stored_upload_bytes(session, demand.owner_id)
        if kept + demand.upload_bytes > cap:
            raise _over_quota(
                settings,
                f"your classes and trainings keep {kept:,} bytes of uploads; these "
                f"{demand.upload_bytes:,} more would pass your quota of {cap:,}; delete "
                "classes or trainings you no longer need",
                lasting=True,
            )


def stored_upload_bytes(session: Session, owner_id: uuid.UUID) -> int:
    """The bytes of the uploads the owner's classes and trainings keep."""
    classes = select(func.coalesce(func.sum(SegClass.upload_bytes), 0)).where(
        SegClass.owner_id == owner_id
    )
    trainings = select(func.coalesce(func.sum(Training.upload_bytes), 0)).where(
        Training.owner_id == owner_id
    )
    return int(
        session.execute(
            select(classes.scalar_subquery() + trainings.scalar_subquery())
        ).scalar_one()
    )


def _over_quota(
    settings: Settings,
    detail: str,
    *,
    errors: list[dict[str, str]] | None = None,
    lasting: bool = False,
) -> Problem:
    if lasting:
        # NOTE: no Retry-After: waiting does not lift it, the request must change.
        return Problem(422, detail, errors=errors, type_=OVER_LASTING_QUOTA, title="Over quota")
    return Problem(
        429, detail, errors=errors, headers={"Retry-After": str(settings.quota_retry_after_seconds)}
    )
