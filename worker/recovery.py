"""Recovery inside the workers: the sweeper (`service.contexts.sweeper`) run periodically by
every worker, and the rules that keep a fault from failing or duplicating a job.

- Every worker sweeps when it starts and then every `sweep_interval_seconds` (± 25 %): jobs
  whose worker died are taken over, lost start messages are sent again, stale rows and orphaned
  blobs go. Several workers sweeping at once is safe (the sweeper's changes are
  compare-and-sets).
- A redelivered task is not run (`is_redelivery`): its first delivery is still running (the
  broker's visibility timeout ran out) or died with its worker. Either way the job's lease
  decides: a live job goes on; a dead one is taken over by the sweep, which counts an attempt
  and sends the work that is not stored yet. So a task delivered twice does its work once, and
  a task that kills its worker every time cannot loop without counting attempts.
- A task that fails because the broker, the database or the blob store cannot be reached
  (`is_transient`) does not fail its job: the job is left running, its lease runs out, and the
  sweep resumes it from what is stored once the outage is over. One whose job was taken over
  meanwhile (its worker was cut off for longer than `worker_lost_after_seconds`) was fenced
  off it (`fenced_off`), and says so.
"""

from __future__ import annotations

import logging
import random
import threading
import time
import uuid
from typing import Any

from celery.signals import worker_ready, worker_shutdown
from kombu.exceptions import OperationalError as BrokerError
from sqlalchemy.exc import DBAPIError, SQLAlchemyError
from sqlalchemy.exc import OperationalError as DatabaseError

from service.contexts.jobs import Fenced, current_claim
from service.contexts.sweeper import SweepReport, recover_jobs, sweep
from service.storage import StorageUnavailable
from worker.celery_app import AlignDiffCelery
from worker.context import WorkerContext

log = logging.getLogger(__name__)

JITTER = 0.25


def requeue_orphaned_jobs(
    ctx: WorkerContext, *, kind: str, start_task: str, resume_task: str
) -> list[uuid.UUID]:
    """Take over the jobs of `kind` whose worker died and send their `resume_task`, and send
    `start_task` again for queued ones never claimed (see `sweeper.recover_jobs`). Returns the
    jobs sent a task."""
    recovery = recover_jobs(
        sessions=ctx.session,
        queue=ctx.queue,
        settings=ctx.settings,
        worker=ctx.worker_name,
        tasks={kind: (start_task, resume_task)},
    )
    return recovery.resumed + recovery.restarted


def fenced_off(
    ctx: WorkerContext, job_id: uuid.UUID, *, patience: float | None = None
) -> Fenced | None:
    """Whether the task that ran in this process for the job was fenced off it meanwhile: the
    job was claimed again since the claim it worked under. None when it held none, or when the
    database cannot tell within `patience` seconds (default: twice `worker_lost_after_seconds`,
    by when a worker cut off from it has had its job taken over, and is likely back)."""
    held = ctx.claims.get(job_id)
    if held is None:
        return None
    wait = 2 * ctx.settings.worker_lost_after_seconds if patience is None else patience
    deadline = time.monotonic() + wait
    while True:
        try:
            with ctx.session() as session:
                current = current_claim(session, job_id)
        except SQLAlchemyError:
            if time.monotonic() >= deadline:
                return None
            time.sleep(min(1.0, wait))
            continue
        return None if current == held else Fenced(job_id, held, current)


def is_redelivery(request: Any) -> bool:
    """Whether a task's message was delivered before (the broker says so: Redis marks the
    messages it restores after a visibility timeout or a lost worker)."""
    delivery_info = getattr(request, "delivery_info", None) or {}
    return bool(delivery_info.get("redelivered"))


def is_transient(error: BaseException) -> bool:
    """Whether `error` says a dependency is unreachable (broker, database, blob store) rather
    than that the work itself failed."""
    if isinstance(error, BrokerError | DatabaseError | StorageUnavailable):
        return True
    return isinstance(error, DBAPIError) and error.connection_invalidated


class PeriodicSweep:
    """A daemon thread that sweeps at once and then every `sweep_interval_seconds` (± 25 %:
    workers started together do not sweep in step). The blob store is listed at most once per
    `orphan_grace_seconds` (a younger orphan could not be deleted anyway)."""

    def __init__(self, ctx: WorkerContext, *, rng: random.Random | None = None) -> None:
        self.ctx = ctx
        self.interval = ctx.settings.sweep_interval_seconds
        self.blob_interval = max(self.interval, float(ctx.settings.orphan_grace_seconds))
        self._rng = rng or random.Random()
        self._next_blob_sweep = time.monotonic() + self._rng.uniform(0, self.blob_interval)
        self._stopped = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="aligndiff-sweep", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stopped.set()
        if self._thread is not None:
            self._thread.join(timeout=10)

    def run_once(self) -> SweepReport:
        blobs = time.monotonic() >= self._next_blob_sweep
        report = sweep(
            sessions=self.ctx.session,
            storage=self.ctx.storage,
            queue=self.ctx.queue,
            settings=self.ctx.settings,
            worker=self.ctx.worker_name,
            blobs=blobs,
        )
        if blobs:
            self._next_blob_sweep = time.monotonic() + self._jittered(self.blob_interval)
        return report

    def _jittered(self, seconds: float) -> float:
        return seconds * self._rng.uniform(1 - JITTER, 1 + JITTER)

    def _run(self) -> None:
        while not self._stopped.is_set():
            try:
                report = self.run_once()
            except Exception:
                # NOTE: an outage must not stop the sweeps: the next one tries again.
                log.warning("the sweep failed; trying again next interval", exc_info=True)
            else:
                # NOTE: said whenever it did something, or listed the blob store (at most
                # once per grace period): a sweep that deleted nothing says so too.
                if len(report.lines()) > 1 or report.orphaned_blobs is not None:
                    log.info("sweep: %s", report.summary())
            self._stopped.wait(self._jittered(self.interval))


def install_sweeper(app: AlignDiffCelery) -> None:
    """Sweep periodically in `app`'s worker (its main process), from when it is ready until
    it shuts down."""
    sweeps: list[PeriodicSweep] = []

    def start(sender: Any = None, **_: Any) -> None:
        if getattr(sender, "app", None) is app and not sweeps:
            sweeps.append(PeriodicSweep(app.context))
            sweeps[0].start()

    def stop(**_: Any) -> None:
        while sweeps:
            sweeps.pop().stop()

    # weak=False: the receivers are closures that would otherwise be collected at once.
    worker_ready.connect(start, weak=False)
    worker_shutdown.connect(stop, weak=False)
