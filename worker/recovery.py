"""Recovering jobs whose worker died or whose start message was lost, for every job kind."""

from __future__ import annotations

import logging
import uuid
from datetime import timedelta

from service.contexts.jobs import (
    claim,
    finish_cancelled,
    stale_running_jobs,
    unclaimed_queued_jobs,
)
from worker.context import WorkerContext

log = logging.getLogger(__name__)


def requeue_orphaned_jobs(
    ctx: WorkerContext, *, kind: str, start_task: str, resume_task: str
) -> list[uuid.UUID]:
    """Take over the jobs of `kind` whose worker died (lease expired: `claim` counts an
    attempt, or fails a job out of attempts; one asked to stop ends cancelled) and enqueue
    their `resume_task`; enqueue `start_task` again for queued ones never claimed (their
    message may be lost: a second start of a job finds it claimed and does nothing). Returns
    the jobs enqueued."""
    settings = ctx.settings
    with ctx.session() as session:
        orphans = stale_running_jobs(session, kind=kind)
        unclaimed = unclaimed_queued_jobs(
            session, older_than=timedelta(seconds=settings.job_lease_seconds), kind=kind
        )
    taken = []
    for job_id in orphans:
        with ctx.session() as session:
            # A job whose worker died after a cancel was asked ends cancelled; any other is
            # claimed (or failed, out of attempts).
            claimed = not finish_cancelled(session, job_id) and claim(
                session,
                job_id,
                worker=ctx.worker_name,
                lease_seconds=settings.job_lease_seconds,
                max_attempts=settings.max_job_attempts,
            )
        if claimed:
            log.warning("job %s lost its worker: taken over, resuming it", job_id)
            ctx.queue.enqueue(resume_task, str(job_id))
            taken.append(job_id)
    for job_id in unclaimed:
        log.warning("job %s was never claimed: enqueueing its start again", job_id)
        ctx.queue.enqueue(start_task, str(job_id))
    return taken + unclaimed
