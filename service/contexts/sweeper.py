"""The sweeper: what puts the database and the blob store back in order after faults.

Each function does one sweep and returns what it did (with `dry_run`, what it would do);
`sweep` runs them all. Workers run it every `sweep_interval_seconds` (with jitter), and
`aligndiff sweep` runs it once. Several processes may sweep at once: every change is a
compare-and-set, or a DELETE whose conditions are checked again in the transaction that makes it.

What counts as stale, precisely:

- **A running job whose lease expired** lost its worker (leases are renewed by every progress
  report). It is taken over (`jobs.claim`, an attempt counted) and its resume task sent; one
  already at `max_job_attempts` fails instead; one asked to cancel ends `cancelled`.
- **A worker not heard from for `worker_lost_after_seconds`** (its heartbeat row is that old;
  a live worker beats every `worker_heartbeat_seconds`, whatever its task) died: its row goes,
  and the lease of the job it was working on ends at its last beat, so that job is taken over
  in the same sweep rather than when its lease would have run out.
- **A queued job not claimed for `job_lease_seconds`** may have lost its start message (the
  broker was down when the API sent it, or lost it). Its start is sent again, at most once per
  `job_lease_seconds` per job; a second start of a job finds it claimed and does nothing.
- **Unfinished samples** (never finalized) of a class whose job ended `failed` or `cancelled`
  more than `pending_retention_seconds` ago: a retry until then reuses them; afterwards the
  rows and their blobs go (a later retry draws them again, bit for bit).
- **Orphaned blobs**, written more than `orphan_grace_seconds` ago: under `classes/<id>/` when
  class <id> does not exist, under `trainings/<id>/` when training <id> does not exist, and under
  `classes/<id>/samples/<n>/` (and the dashboard's thumbnails of sample n,
  `classes/<id>/thumbnails/sample-<n>-<size>.jpg`) when the class has no sample n and its job
  is not active; and a mask a reviewer drew (`samples/<n>/mask-<hex>.png`) that another
  replaced, once sample n was last reviewed more than the grace period ago. Every blob is
  written before the row that names it, so a younger blob may belong to work in flight and is
  never touched; nor is any key outside these layouts.
- **Idempotency records** older than `idempotency_ttl_seconds`: a repeat after that is new work.

Every age is measured by one clock, the database's (`service.db.db_now`): a heartbeat, a lease
and a job's end are written in its time and compared with its time, and a blob's age is the
store's own timestamp against the database's now. A sweeper whose own clock runs hours off
takes over no live job and deletes no young blob (keep the store's clock and the database's
in step: NTP on the servers is enough, since the workers' clocks no longer matter). Functions
that take `now` judge at that moment instead (a test looking ahead).
"""

from __future__ import annotations

import logging
import os
import socket
import uuid
from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from itertools import groupby
from pathlib import PurePosixPath

from sqlalchemy import delete, func, select, update
from sqlalchemy.orm import Session

from service.contexts import jobs
from service.contexts.job_control import START_TASKS, job_queue
from service.contexts.review import superseded_human_mask
from service.contexts.thumbnails import thumbnail_sample_index
from service.db import DatabaseNow, database_now, db_now
from service.models import (
    IdempotencyRecord,
    Job,
    Sample,
    SegClass,
    Training,
    WorkerHeartbeat,
)
from service.queue import TaskQueue
from service.settings import Settings
from service.storage import (
    BlobInfo,
    Storage,
    class_prefix,
    delete_prefix_quietly,
    sample_key,
    training_prefix,
)

log = logging.getLogger(__name__)

Sessions = Callable[[], AbstractContextManager[Session]]

# The task that goes on with a job taken over from a dead worker, per job kind.
RESUME_TASKS = {
    "synthesis": "aligndiff.synthesis.resume",
    "training": "aligndiff.training.resume",
}
# Per job kind: (start task, resume task).
JOB_TASKS = {kind: (START_TASKS[kind], RESUME_TASKS[kind]) for kind in RESUME_TASKS}


@dataclass
class JobRecovery:
    """Jobs the sweep acted on: taken over and resumed, started again, ended."""

    resumed: list[uuid.UUID] = field(default_factory=list)
    restarted: list[uuid.UUID] = field(default_factory=list)
    cancelled: list[uuid.UUID] = field(default_factory=list)
    failed: list[uuid.UUID] = field(default_factory=list)
    lost_workers: list[LostWorker] = field(default_factory=list)


@dataclass(frozen=True)
class LostWorker:
    """A worker taken as dead: its name, when it was last heard from, and the job it was
    working on then (whose lease the sweep ended), if any."""

    name: str
    last_seen_at: datetime
    job_id: uuid.UUID | None

    def line(self, verb: str) -> str:
        seen = self.last_seen_at.strftime("%Y-%m-%d %H:%M:%S")
        job = f", ending the lease of job {self.job_id}" if self.job_id is not None else ""
        return f"{verb}forget dead worker {self.name} (last seen {seen}){job}"


@dataclass
class SweepReport:
    """What one pass of the sweeper did (or, dry, would do)."""

    jobs: JobRecovery | None = None  # None: not swept (the broker is unreachable)
    stale_samples: list[tuple[uuid.UUID, int]] = field(default_factory=list)
    orphaned_blobs: list[str] | None = None  # None: not swept this pass
    expired_idempotency_records: int = 0

    def lines(self, *, dry_run: bool = False) -> list[str]:
        """One line per thing done, then a summary line: what `aligndiff sweep` prints."""
        verb = "would " if dry_run else ""
        out: list[str] = []
        recovery = self.jobs
        if recovery is not None:
            out += [lost.line(verb) for lost in recovery.lost_workers]
            out += [f"{verb}resume job {job_id} (lost its worker)" for job_id in recovery.resumed]
            out += [f"{verb}send the start of job {job_id} again" for job_id in recovery.restarted]
            out += [f"{verb}end job {job_id} cancelled" for job_id in recovery.cancelled]
            out += [f"{verb}fail job {job_id} (out of attempts)" for job_id in recovery.failed]
        out += [
            f"{verb}remove unfinished sample {index} of class {class_id}"
            for class_id, index in self.stale_samples
        ]
        out += [f"{verb}delete orphaned blob {key}" for key in self.orphaned_blobs or []]
        if self.expired_idempotency_records:
            out.append(f"{verb}expire {self.expired_idempotency_records} idempotency record(s)")
        out.append(self.summary())
        return out

    def summary(self) -> str:
        recovery = self.jobs
        jobs_part = (
            "jobs: broker unreachable, not swept"
            if recovery is None
            else f"jobs: {len(recovery.resumed)} resumed, {len(recovery.restarted)} restarted, "
            f"{len(recovery.cancelled)} cancelled, {len(recovery.failed)} failed"
        )
        blobs = "not swept" if self.orphaned_blobs is None else str(len(self.orphaned_blobs))
        return (
            f"{jobs_part}; unfinished samples: {len(self.stale_samples)}; "
            f"orphaned blobs: {blobs}; idempotency records: {self.expired_idempotency_records}"
        )


def sweep(
    *,
    sessions: Sessions,
    storage: Storage,
    queue: TaskQueue,
    settings: Settings,
    worker: str,
    blobs: bool = True,
    dry_run: bool = False,
    now: datetime | None = None,
) -> SweepReport:
    """Every sweep once. Jobs are skipped while the broker does not answer (nothing could be
    sent); `blobs=False` skips listing the blob store (the costly sweep)."""
    report = SweepReport()
    if broker_answers(queue):
        report.jobs = recover_jobs(
            sessions=sessions, queue=queue, settings=settings, worker=worker, dry_run=dry_run
        )
    report.stale_samples = remove_stale_samples(
        sessions=sessions,
        storage=storage,
        retention_seconds=settings.pending_retention_seconds,
        now=now,
        dry_run=dry_run,
    )
    with sessions() as session:
        report.expired_idempotency_records = expire_idempotency_records(
            session, ttl_seconds=settings.idempotency_ttl_seconds, now=now, dry_run=dry_run
        )
    # NOTE: last, as it raises while the blob store is down (the next pass tries again).
    if blobs:
        report.orphaned_blobs = remove_orphaned_blobs(
            sessions=sessions,
            storage=storage,
            grace_seconds=settings.orphan_grace_seconds,
            now=now,
            dry_run=dry_run,
        )
    return report


def broker_answers(queue: TaskQueue) -> bool:
    """Whether the broker answers (a queue without `ping` needs no broker)."""
    ping = getattr(queue, "ping", None)
    if ping is None:
        return True
    try:
        ping()
    except Exception as error:
        log.warning("the broker does not answer (%s): jobs are not swept now", error)
        return False
    return True


def recover_jobs(
    *,
    sessions: Sessions,
    queue: TaskQueue,
    settings: Settings,
    worker: str,
    tasks: Mapping[str, tuple[str, str]] = JOB_TASKS,
    dry_run: bool = False,
) -> JobRecovery:
    """Take over the running jobs whose lease expired and send their resume task (or end them:
    cancelled if asked, failed when out of attempts), and send again the start of queued jobs
    not claimed for `job_lease_seconds`. `tasks` gives the kinds swept: kind → (start, resume).
    Each job is decided in a transaction of its own; tasks are sent after it commits."""
    lease = settings.job_lease_seconds
    recovery = JobRecovery()
    recovery.lost_workers = end_leases_of_lost_workers(
        sessions=sessions, lost_after=settings.worker_lost_after_seconds, dry_run=dry_run
    )
    cutoff = db_now(-lease)
    kinds = list(tasks)
    with sessions() as session:
        lost = session.execute(
            select(Job.id, Job.kind, Job.cancel_requested, Job.attempts, Job.target_id)
            .where(Job.status == "running", Job.lease_expires_at < db_now(), Job.kind.in_(kinds))
            .order_by(Job.created_at)
        ).all()
        unclaimed = session.execute(
            select(Job.id, Job.kind, Job.target_id)
            .where(
                Job.status == "queued",
                Job.cancel_requested.is_(False),
                Job.updated_at < cutoff,
                Job.kind.in_(kinds),
            )
            .order_by(Job.created_at)
        ).all()
    for job_id, kind, cancel_requested, attempts, target_id in lost:
        if dry_run:
            if cancel_requested:
                recovery.cancelled.append(job_id)
            elif attempts >= settings.max_job_attempts:
                recovery.failed.append(job_id)
            else:
                recovery.resumed.append(job_id)
            continue
        with sessions() as session:
            if jobs.finish_cancelled(session, job_id):
                outcome = recovery.cancelled
            elif _give_up(session, job_id, max_attempts=settings.max_job_attempts, lease=lease):
                outcome = recovery.failed
            elif jobs.claim(
                session,
                job_id,
                worker=worker,
                lease_seconds=lease,
                max_attempts=settings.max_job_attempts,
            ):
                outcome = recovery.resumed
            else:
                continue  # another sweeper (or a redelivered start) got there first
            routed_to = job_queue(
                session, kind=kind, target_id=target_id, default_model=settings.default_model
            )
        outcome.append(job_id)
        if outcome is recovery.resumed:
            log.warning("job %s lost its worker: taken over, resuming it", job_id)
            queue.enqueue(tasks[kind][1], str(job_id), queue=routed_to)
        else:
            log.warning("job %s lost its worker: ended", job_id)
    for job_id, kind, target_id in unclaimed:
        if not dry_run:
            with sessions() as session:
                routed_to = job_queue(
                    session, kind=kind, target_id=target_id, default_model=settings.default_model
                )
                # NOTE: touching `updated_at` is the compare-and-set that makes one sweeper
                # send the start, once per lease period however many sweep.
                touched = session.execute(
                    update(Job)
                    .where(
                        Job.id == job_id,
                        Job.status == "queued",
                        Job.cancel_requested.is_(False),
                        Job.updated_at < cutoff,
                    )
                    .values(updated_at=db_now())
                    .execution_options(synchronize_session=False)
                )
            if not touched.rowcount:  # type: ignore[attr-defined]
                continue
            log.warning("job %s was never claimed: sending its start again", job_id)
            queue.enqueue(tasks[kind][0], str(job_id), queue=routed_to)
        recovery.restarted.append(job_id)
    return recovery


def end_leases_of_lost_workers(
    *, sessions: Sessions, lost_after: float, now: datetime | None = None, dry_run: bool = False
) -> list[LostWorker]:
    """Forget the workers whose heartbeat is older than `lost_after` seconds, and end the lease
    of the running job each was working on at its last beat, so that `recover_jobs` takes the
    job over now. (Even when other workers' reports keep the lease renewed: the dead worker's
    task is lost, and without a takeover it would be redone only once the others finish and
    the lease runs out.) Each worker in a transaction of its own; deleting its row, as last
    read, is the compare-and-set that makes one sweep act on it (a worker that beats again
    meanwhile is left alone).

    A silent worker of this host whose process is alive is not dead: the machine slept (a
    laptop's lid closed), and its beats resume with it. Taking it over would only count an
    attempt against a job that goes on."""
    cutoff = _before(now, lost_after)
    with sessions() as session:
        silent = session.execute(
            select(
                WorkerHeartbeat.name,
                WorkerHeartbeat.last_seen_at,
                WorkerHeartbeat.current_job_id,
                WorkerHeartbeat.hostname,
                WorkerHeartbeat.pid,
            )
            .where(WorkerHeartbeat.last_seen_at < cutoff)
            .order_by(WorkerHeartbeat.last_seen_at)
        ).all()
    here = socket.gethostname()
    lost_workers = [
        LostWorker(name, seen, job_id)
        for name, seen, job_id, hostname, pid in silent
        if not (hostname == here and _process_alive(pid))
    ]
    if dry_run:
        return lost_workers
    forgotten: list[LostWorker] = []
    for lost in lost_workers:
        with sessions() as session:
            deleted = session.execute(
                delete(WorkerHeartbeat).where(
                    WorkerHeartbeat.name == lost.name,
                    WorkerHeartbeat.last_seen_at == lost.last_seen_at,
                )
            )
            if not deleted.rowcount:  # type: ignore[attr-defined]
                continue
            if lost.job_id is not None:
                session.execute(
                    update(Job)
                    .where(
                        Job.id == lost.job_id,
                        Job.status == "running",
                        Job.lease_expires_at > lost.last_seen_at,
                    )
                    .values(lease_expires_at=lost.last_seen_at, updated_at=db_now())
                    .execution_options(synchronize_session=False)
                )
        log.warning(
            "worker %s not heard from since %s: taken as dead%s",
            lost.name,
            lost.last_seen_at.isoformat(),
            f"; its job {lost.job_id} is taken over" if lost.job_id else "",
        )
        forgotten.append(lost)
    return forgotten


def _before(now: datetime | None, seconds: float) -> datetime | DatabaseNow:
    """`seconds` before `now`, or (None) before the database's now: a cutoff for SQL."""
    return db_now(-seconds) if now is None else now - timedelta(seconds=seconds)


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process: alive
        return True
    return True


def _give_up(session: Session, job_id: uuid.UUID, *, max_attempts: int, lease: int) -> bool:
    """Fail a job that lost its worker on its last allowed attempt (compare-and-set: still
    running, lease still expired, not cancelled)."""
    now = db_now()
    result = session.execute(
        update(Job)
        .where(
            Job.id == job_id,
            Job.status == "running",
            Job.lease_expires_at < now,
            Job.cancel_requested.is_(False),
            Job.attempts >= max_attempts,
        )
        .values(
            status="failed",
            error=f"gave up after {max_attempts} attempts: its worker was lost each time "
            f"(no progress report within {lease} s)",
            finished_at=now,
            lease_expires_at=None,
            updated_at=now,
        )
        .execution_options(synchronize_session=False)
    )
    return bool(result.rowcount)  # type: ignore[attr-defined]


def remove_stale_samples(
    *,
    sessions: Sessions,
    storage: Storage,
    retention_seconds: int,
    now: datetime | None = None,
    dry_run: bool = False,
) -> list[tuple[uuid.UUID, int]]:
    """Remove the unfinished samples of classes whose job ended `failed` or `cancelled` more
    than `retention_seconds` ago, rows and blobs, in one transaction per class with its job
    row locked and every condition checked again. Returns (class id, index) per sample."""
    cutoff = _before(now, retention_seconds)
    ended_long_ago = (
        select(SegClass.id)
        .join(Job, Job.id == SegClass.job_id)
        .where(Job.status.in_(("failed", "cancelled")), Job.finished_at < cutoff)
    )
    with sessions() as session:
        found = session.execute(
            select(Sample.class_id, Sample.index)
            .where(Sample.finalized_at.is_(None), Sample.class_id.in_(ended_long_ago))
            .order_by(Sample.class_id, Sample.index)
        ).all()
    by_class: dict[uuid.UUID, list[int]] = defaultdict(list)
    for class_id, index in found:
        by_class[class_id].append(index)
    if dry_run:
        return [(class_id, index) for class_id, index in found]
    removed: list[tuple[uuid.UUID, int]] = []
    for class_id, indices in by_class.items():
        with sessions() as session:
            # NOTE: the job row is locked first, so a concurrent retry (which needs it) waits
            # until these rows are gone, and then draws them again.
            session.execute(select(Job.id).where(Job.target_id == class_id).with_for_update()).all()
            gone = session.scalars(
                delete(Sample)
                .where(
                    Sample.class_id == class_id,
                    Sample.index.in_(indices),
                    Sample.finalized_at.is_(None),
                    Sample.class_id.in_(ended_long_ago),
                )
                .returning(Sample.index)
                .execution_options(synchronize_session=False)
            ).all()
            remaining = select(func.count()).where(Sample.class_id == class_id)
            session.execute(
                update(SegClass)
                .where(SegClass.id == class_id)
                .values(num_samples_done=remaining.scalar_subquery())
            )
            # NOTE: the blobs go while the job row is still locked (a retry cannot start
            # drawing them again meanwhile); one that cannot be deleted stays as an orphan,
            # which is harmless and swept later.
            for index in sorted(gone):
                delete_prefix_quietly(storage, _sample_folder(class_id, index))
                removed.append((class_id, index))
    return removed


def _sample_folder(class_id: uuid.UUID, index: int) -> str:
    return f"{PurePosixPath(sample_key(class_id, index, 'blob')).parent}/"


def remove_orphaned_blobs(
    *,
    sessions: Sessions,
    storage: Storage,
    grace_seconds: int,
    now: datetime | None = None,
    dry_run: bool = False,
) -> list[str]:
    """Delete the blobs no row can name (see the module's docstring) that were written more
    than `grace_seconds` ago. Each owner's blobs are judged and deleted in one transaction,
    with its job row locked where it has one. Returns the keys deleted.

    A blob's age is its store's timestamp (a file's modification time, an S3 object's
    LastModified) against the database's now, read once before listing: a blob written
    since is younger still."""
    if now is None:
        with sessions() as session:
            now = database_now(session)
    cutoff = now - timedelta(seconds=grace_seconds)
    removed: list[str] = []
    for family in ("classes", "trainings"):
        # NOTE: the listing streams and keeps one folder's keys together, so one owner's blobs
        # are held at a time however large the store (an owner seen twice is judged twice).
        for owner, listed in groupby(storage.list_blobs(family), key=lambda b: _owner_of(b.key)):
            blobs = [blob for blob in listed if blob.modified_at < cutoff]
            if owner is None or not blobs:
                continue
            with sessions() as session:
                if family == "classes":
                    orphans = _class_orphans(session, owner, blobs, cutoff=cutoff)
                else:
                    orphans = _training_orphans(session, owner, blobs)
                if orphans and not dry_run:
                    storage.delete_keys(orphans)
            removed += orphans
    if removed and not dry_run:
        log.warning("deleted %d orphaned blob(s)", len(removed))
    return removed


def _owner_of(key: str) -> uuid.UUID | None:
    """The class or training id a key belongs to (`<family>/<id>/…`), None for any other key."""
    parts = key.split("/")
    if len(parts) < 3:
        return None
    try:
        return uuid.UUID(parts[1])
    except ValueError:
        return None


def _class_orphans(
    session: Session, class_id: uuid.UUID, blobs: Iterable[BlobInfo], *, cutoff: datetime
) -> list[str]:
    keys = [blob.key for blob in blobs]
    segclass = session.get(SegClass, class_id)
    if segclass is None:
        return keys
    job = session.execute(
        select(Job.status).where(Job.target_id == class_id).with_for_update()
    ).first()  # locked: a retry waits until these blobs are gone
    if job is not None and job.status in jobs.ACTIVE:
        return []
    superseded = _unnamed_claim_blobs(
        class_prefix(class_id), keys, {segclass.embedding_key, segclass.prototypes_key}
    )
    sample_of = {key: _sample_index(class_id, key) for key in keys}
    indices = {index for index in sample_of.values() if index is not None}
    if not indices:
        return superseded
    # Each stored sample's mask key and last review: n -> (mask_key, reviewed_at).
    stored = {
        index: (mask_key, reviewed_at)
        for index, mask_key, reviewed_at in session.execute(
            select(Sample.index, Sample.mask_key, Sample.reviewed_at).where(
                Sample.class_id == class_id, Sample.index.in_(indices)
            )
        )
    }

    def orphaned(key: str, index: int) -> bool:
        if index not in stored:
            return True
        mask_key, reviewed_at = stored[index]
        return superseded_human_mask(key, mask_key=mask_key, reviewed_at=reviewed_at, before=cutoff)

    return superseded + [
        key for key, index in sample_of.items() if index is not None and orphaned(key, index)
    ]


def _unnamed_claim_blobs(prefix: str, keys: Iterable[str], named: set[str | None]) -> list[str]:
    """The keys under `<prefix>claims/` (an embedding, prototypes or checkpoint written under
    one claim of the job) that the owner's row does not name: written by a worker fenced
    before its row update, or superseded by a later one."""
    folder = jobs.claim_prefix(prefix)
    return [key for key in keys if key.startswith(folder) and key not in named]


def _sample_index(class_id: uuid.UUID, key: str) -> int | None:
    """n for a key under `classes/<id>/samples/<n>/` or of a thumbnail of sample n, else None."""
    rest = key.removeprefix(class_prefix(class_id)).split("/")
    if len(rest) >= 3 and rest[0] == "samples" and rest[1].isdigit():
        return int(rest[1])
    return thumbnail_sample_index(class_id, key)


def _training_orphans(
    session: Session, training_id: uuid.UUID, blobs: Iterable[BlobInfo]
) -> list[str]:
    prefix = training_prefix(training_id)
    keys = [blob.key for blob in blobs if blob.key.startswith(prefix)]
    training = session.get(Training, training_id)
    if training is None:
        return keys
    status = session.scalar(
        select(Job.status).where(Job.id == training.job_id).with_for_update()
    )  # locked: a retry waits until these blobs are gone
    if status in jobs.ACTIVE:
        return []
    named = {training.checkpoint_key, training.weights_key, training.baseline_weights_key}
    return _unnamed_claim_blobs(prefix, keys, named)


def expire_idempotency_records(
    session: Session, *, ttl_seconds: int, now: datetime | None = None, dry_run: bool = False
) -> int:
    """Delete idempotency records older than `ttl_seconds`; returns how many."""
    cutoff = _before(now, ttl_seconds)
    old = IdempotencyRecord.created_at < cutoff
    if dry_run:
        return int(session.scalar(select(func.count()).where(old)) or 0)
    result = session.execute(delete(IdempotencyRecord).where(old))
    return int(result.rowcount)  # type: ignore[attr-defined]
