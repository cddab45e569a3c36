"""Worker heartbeats: every process that runs tasks writes its row in `worker_heartbeats` every
`worker_heartbeat_seconds`, with the job it is working on, so the dashboard can show the
workers online (seen within `ONLINE_INTERVALS` intervals) without asking the broker.

A beat is written in the database's time (`service.db.db_now`), the clock the sweeper judges
silence by: a worker whose own clock runs minutes or hours off is neither taken as dead while
it beats, nor kept alive once silent."""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
import uuid
from typing import Any

from celery.signals import (
    task_postrun,
    task_prerun,
    worker_process_init,
    worker_process_shutdown,
    worker_shutdown,
)
from sqlalchemy import delete, insert, update
from sqlalchemy.exc import IntegrityError, SQLAlchemyError

from service.db import db_now
from service.models import WorkerHeartbeat
from worker.celery_app import AlignDiffCelery
from worker.context import WorkerContext

log = logging.getLogger(__name__)


class Heartbeat:
    """A daemon thread that upserts this process's heartbeat row until stopped.

    `set_job` records the job being worked on, written at once: the dashboard need not wait a
    whole interval to see a worker pick a job up, and a worker that dies right after a task
    names no job the sweep would take over for nothing.
    """

    def __init__(
        self,
        ctx: WorkerContext,
        *,
        interval: float | None = None,
        draws_classes: bool = True,
    ) -> None:
        self.ctx = ctx
        self.interval = interval if interval is not None else ctx.settings.worker_heartbeat_seconds
        self.name = ctx.worker_name
        # The model whose classes it draws, the one it serves; None when it draws none (a
        # predictions-only worker): the dashboard counts each model's workers by it.
        self.model = ctx.settings.served_model if draws_classes else None
        self._started = time.monotonic()
        self._job_id: uuid.UUID | None = None
        self._wake = threading.Event()
        self._stopped = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="aligndiff-heartbeat", daemon=True)
        self._thread.start()

    def set_job(self, job_id: uuid.UUID | None) -> None:
        changed = job_id != self._job_id
        self._job_id = job_id
        # NOTE: written at once, taken or finished: should this worker die, the sweep takes
        # over the job its row names, so the row must not name a job whose task has ended (it
        # costs two small writes per task, against tasks of seconds to minutes).
        if changed:
            self._wake.set()

    def stop(self, *, remove: bool = True) -> None:
        """Stop beating; with `remove`, delete the row (the worker went away cleanly)."""
        self._stopped.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=max(5.0, self.interval))
        if remove:
            try:
                with self.ctx.session() as session:
                    session.execute(
                        delete(WorkerHeartbeat).where(WorkerHeartbeat.name == self.name)
                    )
            except SQLAlchemyError:
                log.warning("could not remove the heartbeat of %s", self.name, exc_info=True)

    def beat(self) -> None:
        """Write the row now: update it, or insert it the first time."""
        with self.ctx.session() as session:
            updated = session.execute(
                update(WorkerHeartbeat)
                .where(WorkerHeartbeat.name == self.name)
                .values(
                    last_seen_at=db_now(),
                    current_job_id=self._job_id,
                    model=self.model,
                )
            )
            if updated.rowcount:  # type: ignore[attr-defined]
                return
        try:
            with self.ctx.session() as session:
                session.execute(
                    insert(WorkerHeartbeat).values(
                        name=self.name,
                        hostname=socket.gethostname(),
                        pid=os.getpid(),
                        # the process's start, in the database's time
                        started_at=db_now(self._started - time.monotonic()),
                        last_seen_at=db_now(),
                        current_job_id=self._job_id,
                        model=self.model,
                    )
                )
        except IntegrityError:
            # NOTE: only a process of this name writes this row, so a duplicate means an old
            # row of a recycled pid appeared between the update and the insert; next beat wins.
            log.info("heartbeat row %s appeared concurrently", self.name)

    def _run(self) -> None:
        while not self._stopped.is_set():
            try:
                self.beat()
            except Exception:
                # NOTE: nothing may stop the beats of a live worker: one silent for
                # `worker_lost_after_seconds` is taken as dead and its job taken over. In a
                # database outage the row ages out, and the worker shows up again (a new row,
                # should a sweep have removed it) once a beat gets through.
                log.warning("heartbeat of %s failed", self.name, exc_info=True)
            self._wake.wait(self.interval)
            self._wake.clear()


def install_heartbeat(app: AlignDiffCelery, *, draws_classes: bool = True) -> None:
    """Beat from every process of `app`'s worker that runs tasks (the worker itself with the
    solo pool, each child with prefork), naming the job of the task it runs, and the model it
    serves when it `draws_classes` (consumes that model's synthesis queue)."""
    beats: dict[int, Heartbeat] = {}

    def current() -> Heartbeat | None:
        return beats.get(os.getpid())

    def start(**_: Any) -> None:
        # NOTE: sent in the process that will run tasks: the worker for the solo pool, each
        # forked child for prefork (a child inherits the parent's dict, not its thread).
        if current() is None:
            heartbeat = Heartbeat(app.context, draws_classes=draws_classes)
            beats[os.getpid()] = heartbeat
            heartbeat.start()

    def on_task(job_of: Any, task: Any) -> None:
        heartbeat = current()
        if heartbeat is not None and getattr(task, "app", None) is app:
            heartbeat.set_job(job_of)

    def before(task: Any = None, args: Any = None, **_: Any) -> None:
        on_task(_job_id(args), task)

    def after(task: Any = None, **_: Any) -> None:
        on_task(None, task)

    def stop(**_: Any) -> None:
        heartbeat = beats.pop(os.getpid(), None)
        if heartbeat is not None:
            heartbeat.stop()

    # weak=False: the receivers are closures that would otherwise be collected at once.
    worker_process_init.connect(start, weak=False)
    task_prerun.connect(before, weak=False)
    task_postrun.connect(after, weak=False)
    worker_shutdown.connect(stop, weak=False)
    worker_process_shutdown.connect(stop, weak=False)


def _job_id(args: Any) -> uuid.UUID | None:
    try:
        return uuid.UUID(str(args[0]))
    except (TypeError, ValueError, IndexError, KeyError):
        return None
