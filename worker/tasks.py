"""Celery tasks of the synthesis and training jobs. Each takes ids and primitives, runs one
step of `worker.synthesis` or `worker.training` with the worker's context, and leaves the job's
status to the step, or to `on_failure` when the step raises (the job fails with the error and
its traceback's tail). A task fenced off its job (`Fenced`: the job was claimed again while it
ran, its worker cut off or paused) is abandoned: it logs so and records nothing.
`predict` belongs to no job: its caller waits for its result."""

from __future__ import annotations

import logging
import uuid
from typing import Any, cast

from billiard.einfo import ExceptionInfo
from celery import Task, shared_task

from service.contexts.jobs import Fenced
from worker import recovery, synthesis, training
from worker.celery_app import AlignDiffCelery
from worker.context import WorkerContext

log = logging.getLogger(__name__)


class ContextTask(Task):
    """A task that reaches its worker's context (`self.context`)."""

    @property
    def context(self) -> WorkerContext:
        return cast(AlignDiffCelery, self.app).context


class JobTask(ContextTask):
    """A task whose first argument is a job id: a failure fails that job, unless it only says
    that a dependency is unreachable. A redelivered message is not run (`worker.recovery`),
    and a task fenced off its job is abandoned."""

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        # NOTE: the claim a task works under is its own (`WorkerContext.hold_claim`), never
        # one an earlier task of this process held.
        self.context.claims.clear()
        if recovery.is_redelivery(self.request):
            log.warning(
                "task %s (%s) was delivered again: not run; the job's lease tells whether its "
                "first delivery is lost, and the sweep then resumes the job",
                self.name,
                self.request.id,
            )
            return None
        if self.sent_elsewhere(*args):
            return None
        try:
            return super().__call__(*args, **kwargs)
        except Fenced as fenced:
            log.warning(
                "fenced: %s; abandoning task %s (%s), which writes nothing more",
                fenced,
                self.name,
                self.request.id,
            )
            return None

    def sent_elsewhere(self, *args: Any) -> bool:
        """Whether the task was sent on to the workers that must run it, instead of here."""
        return False

    def on_failure(
        self,
        exc: BaseException,
        task_id: str,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        einfo: ExceptionInfo,
    ) -> None:
        job_id = args[0] if args else kwargs.get("job_id")
        if recovery.is_transient(exc):
            fenced = recovery.fenced_off(self.context, uuid.UUID(str(job_id)))
            if fenced is not None:
                log.warning(
                    "fenced: %s; abandoning task %s (%s), which writes nothing more (it met "
                    "an outage meanwhile: %r)",
                    fenced,
                    self.name,
                    task_id,
                    exc,
                )
                return
            log.warning(
                "task %s (%s) of job %s met an outage (%r): the job stays running and is "
                "resumed by the sweep once its lease runs out",
                self.name,
                task_id,
                job_id,
                exc,
            )
            return
        log.error("task %s (%s) failed for job %s: %r", self.name, task_id, job_id, exc)
        try:
            synthesis.record_failure(self.context, uuid.UUID(str(job_id)), exc, str(einfo))
        except Exception:
            log.exception("could not record the failure of job %s", job_id)


class SynthesisTask(JobTask):
    """A task of a class's synthesis: run only by a worker serving the class's model."""

    def sent_elsewhere(self, *args: Any) -> bool:
        return synthesis.send_to_its_model(self.context, self.name, args)


@shared_task(bind=True, base=SynthesisTask, name=synthesis.START)
def start_synthesis(self: JobTask, job_id: str) -> None:
    synthesis.start(self.context, uuid.UUID(job_id))


@shared_task(bind=True, base=SynthesisTask, name=synthesis.RESUME)
def resume_synthesis(self: JobTask, job_id: str) -> None:
    synthesis.resume(self.context, uuid.UUID(job_id))


@shared_task(bind=True, base=SynthesisTask, name=synthesis.SAMPLE_CHUNK)
def sample_chunk(self: JobTask, job_id: str, indices: list[int]) -> None:
    synthesis.sample_chunk(self.context, uuid.UUID(job_id), indices)


@shared_task(bind=True, base=SynthesisTask, name=synthesis.ANNOTATE_CHUNK)
def annotate_chunk(self: JobTask, job_id: str, indices: list[int]) -> None:
    synthesis.annotate_chunk(self.context, uuid.UUID(job_id), indices)


@shared_task(bind=True, base=SynthesisTask, name=synthesis.RECALIBRATE)
def recalibrate(self: JobTask, job_id: str) -> None:
    synthesis.recalibrate_class(self.context, uuid.UUID(job_id))


@shared_task(bind=True, base=SynthesisTask, name=synthesis.FINALIZE_CHUNK)
def finalize_chunk(self: JobTask, job_id: str, indices: list[int]) -> None:
    synthesis.finalize_chunk(self.context, uuid.UUID(job_id), indices)


@shared_task(bind=True, base=JobTask, name=training.START)
def start_training(self: JobTask, job_id: str) -> None:
    training.start(self.context, uuid.UUID(job_id))


@shared_task(bind=True, base=JobTask, name=training.RESUME)
def resume_training(self: JobTask, job_id: str) -> None:
    training.resume(self.context, uuid.UUID(job_id))


@shared_task(bind=True, base=ContextTask, name=training.PREDICT, ignore_result=False)
def predict(self: ContextTask, weights_key: str, image: bytes) -> bytes:
    """The API waits for this one's answer: a PNG label mask (see `training.predict`)."""
    return training.predict(self.context, weights_key, image)
