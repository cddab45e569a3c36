"""What a worker process needs to run tasks, created lazily and once per process."""

from __future__ import annotations

import logging
import os
import socket
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

from sqlalchemy import Engine
from sqlalchemy.orm import Session, sessionmaker

from service.contexts.jobs import claim, current_claim, report_progress
from service.db import make_engine, make_session_factory, session_scope
from service.queue import CeleryQueue, TaskQueue
from service.settings import Settings
from service.storage import Storage, make_storage

if TYPE_CHECKING:
    from aligndiff.synth import Models, SynthConfig
    from worker.training import SegmenterCache

log = logging.getLogger(__name__)


class WorkerContext:
    """Settings, database, blob storage, task queue and models of one worker process.

    Everything but the settings is built on first use, so importing the Celery app (the API
    does, to send tasks) loads no model and opens no connection. The database engine, storage
    and models belong to the process that built them: a forked pool child builds its own.
    `queue`, `storage` and `models` may be given (tests run the tasks in process with them).
    """

    def __init__(
        self,
        settings: Settings,
        *,
        celery_app: Any = None,
        queue: TaskQueue | None = None,
        storage: Storage | None = None,
        models: Models | None = None,
    ) -> None:
        self.settings = settings
        self._celery_app = celery_app
        self._given_queue, self._given_storage, self._given_models = queue, storage, models
        self._reset()

    def _reset(self) -> None:
        self._pid = os.getpid()
        self._engine: Engine | None = None
        self._session_factory: sessionmaker[Session] | None = None
        self._queue: TaskQueue | None = self._given_queue
        self._storage: Storage | None = self._given_storage
        self._models: Models | None = self._given_models
        self._config: SynthConfig | None = None
        self._segmenters: SegmenterCache | None = None
        # The claim this process works under, per job of the task it runs (`hold_claim`):
        # what its writes carry, the failure it records included.
        self.claims: dict[uuid.UUID, int] = {}

    def _own_process(self) -> None:
        # NOTE: a prefork child inherits its parent's objects; pooled connections (and CUDA
        # state) must not be shared across processes, so the child drops them and rebuilds.
        if os.getpid() != self._pid:
            if self._engine is not None:
                self._engine.dispose(close=False)
            self._reset()

    @property
    def worker_name(self) -> str:
        return f"{socket.gethostname()}:{os.getpid()}"

    @property
    def engine(self) -> Engine:
        self._own_process()
        if self._engine is None:
            # NOTE: a transaction left open by a worker cut off or paused mid-way holds its
            # job's row lock, and the claim that takes the job over would wait for it: the
            # server ends such a session once the worker would be taken as dead anyway.
            self._engine = make_engine(
                self.settings.resolved_database_url,
                idle_in_transaction_timeout=self.settings.worker_lost_after_seconds,
            )
        return self._engine

    @contextmanager
    def session(self) -> Iterator[Session]:
        """A short transaction: commits on success, rolls back on error."""
        engine = self.engine
        if self._session_factory is None:
            self._session_factory = make_session_factory(engine)
        with session_scope(self._session_factory) as session:
            yield session

    def claim_job(self, job_id: uuid.UUID) -> int | None:
        """Take a job for this worker (compare-and-set; counts an attempt): the claim its
        writes carry. None when it is running elsewhere, finished, cancelled, or was failed
        for running out of attempts."""
        with self.session() as session:
            claimed = claim(
                session,
                job_id,
                worker=self.worker_name,
                lease_seconds=self.settings.job_lease_seconds,
                max_attempts=self.settings.max_job_attempts,
            )
        if claimed is None:
            log.info("job %s not claimed (already running, finished or out of attempts)", job_id)
        else:
            self.claims[job_id] = claimed
        return claimed

    def hold_claim(self, job_id: uuid.UUID, claim: int | None = None) -> int:
        """The claim this process works under for the job in the task it runs: `claim` (its
        own, from `claim_job`), else the job's current one (a task sent for the job by its
        holder, or a job's resume sent by the sweep that took it over)."""
        if claim is None:
            with self.session() as session:
                claim = current_claim(session, job_id)
            if claim is None:
                raise LookupError(f"job {job_id} does not exist")
        self.claims[job_id] = claim
        return claim

    @property
    def storage(self) -> Storage:
        self._own_process()
        if self._storage is None:
            self._storage = make_storage(
                self.settings.resolved_storage_url,
                endpoint_url=self.settings.s3_endpoint_url,
                region=self.settings.s3_region,
            )
        return self._storage

    @property
    def queue(self) -> TaskQueue:
        self._own_process()
        if self._queue is None:
            if self._celery_app is None:
                raise RuntimeError("this worker context has neither a queue nor a Celery app")
            self._queue = CeleryQueue(self._celery_app)
        return self._queue

    @property
    def models(self) -> Models:
        """The pipeline's models, loaded on first use and kept for the life of the process."""
        self._own_process()
        if self._models is None:
            from aligndiff.synth import load_models

            self._models = load_models(self.settings)
        return self._models

    @property
    def segmenters(self) -> SegmenterCache:
        """The trained segmenters `predict` used last, each loaded once by this process."""
        self._own_process()
        if self._segmenters is None:
            from worker.training import SegmenterCache

            self._segmenters = SegmenterCache(self.settings.predict_cache_size)
        return self._segmenters

    @property
    def config(self) -> SynthConfig:
        """Every stage's settings; the same on every worker of one model, so a sample's bits
        do not depend on which worker drew it. A `batch_size` setting is applied once; "auto"
        sizes from this worker's free device memory (then bits depend on the device)."""
        from aligndiff.synth import SynthConfig

        if self.settings.batch_size is None:
            return SynthConfig.from_settings(self.settings)
        self._own_process()
        if self._config is None:
            self._config = SynthConfig.for_settings(self.settings, self.models.diffusion)
        return self._config


class ThrottledProgress:
    """`progress` and `should_stop` callbacks for a long loop (inversion, training): progress
    is written, and the job's lease renewed, at most once per `interval` seconds, since a step
    is far shorter than a lease; `should_stop` turns true once the job is no longer running
    or asked to stop, and stays true. Under `claim`: once the job was claimed again,
    `should_stop` raises `Fenced` (the loop is abandoned, not stopped)."""

    def __init__(
        self,
        ctx: WorkerContext,
        job_id: uuid.UUID,
        *,
        claim: int,
        stage: str | None,
        span: tuple[float, float],
        interval: float,
    ) -> None:
        self.ctx, self.job_id, self.claim, self.stage, self.span = ctx, job_id, claim, stage, span
        self.interval = interval
        self.fraction = 0.0
        self.stopped = False
        self.last: float | None = None

    def progress(self, done: int, total: int) -> None:
        self.fraction = done / max(total, 1)

    def should_stop(self) -> bool:
        now = time.monotonic()
        if self.last is None or now - self.last >= self.interval:
            self.last = now
            low, high = self.span
            with self.ctx.session() as session:
                going = report_progress(
                    session,
                    self.job_id,
                    stage=self.stage,
                    progress=low + (high - low) * self.fraction,
                    lease_seconds=self.ctx.settings.job_lease_seconds,
                    claim=self.claim,
                )
            self.stopped = self.stopped or not going
        return self.stopped
