"""The synthesis job as resumable steps over the database and the blob store.

What `aligndiff.synth.synthesize` does in one process, split into steps that any number of
workers run in parallel. The database is the truth: every step reads what is stored, does only
what is missing and stores blobs (keys derived from ids) before the rows that name them, so a
step can be re-run (redelivered, retried, resumed) without redoing or duplicating work.

    start ── claim ──▶ inversion (skipped when the class has its embedding) ──▶ dispatch
    resume (a job taken over from a dead worker) ──▶ the same, without claiming
    dispatch: fan out the first unfinished stage, judged from what is stored:
      sample_chunk × k    last finisher: CAS stage sampling → annotation, fans out pass 1
      annotate_chunk × k  pass 1 (consensus); last finisher: CAS annotation → scoring
      recalibrate         the barrier, once: prototypes on shots + consensus samples
      finalize_chunk × k  pass 2: pseudo-labels, OOD filter, CLIP scores, finalized_at
                          last finisher: class aggregates, then `complete` (itself a CAS)

In the normal flow each fan-out happens once (the stage CAS has one winner). A resumed job
(`start` after a retry, `resume` after a dead worker's job was taken over) dispatches from
what is stored and may enqueue chunks that are also still queued: they find their work done.

One holder per job: every step works under a claim (`start` its own, the others the job's
current one when they begin, `ClassInfo.claim`), and its writes are fenced by it
(`service.contexts.jobs.hold`): once the job was claimed again, a step's next write raises
`Fenced` and the task is abandoned (`worker.tasks`). The blobs written once per class, the
embedding and the prototypes, go under a key of their claim, so a fenced worker's never
replaces the one its successor's row names.
"""

from __future__ import annotations

import io
import logging
import tempfile
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import numpy as np
import numpy.typing as npt
import torch
from PIL import Image
from safetensors.torch import load as load_tensors
from safetensors.torch import save as save_tensors
from sqlalchemy import ColumnElement, select, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session

from aligndiff.acceptance import (
    AcceptanceThresholds,
    SemanticCheck,
    calibrate,
    final_signals,
    verdict,
)
from aligndiff.annotation import consensus_pass, pseudo_label_pass, recalibrate
from aligndiff.fss import Prototypes
from aligndiff.instances import count_instances
from aligndiff.inversion import load_embedding, save_embedding
from aligndiff.masks import BoolMask, mask_to_image
from aligndiff.names import PROMPT_STYLES, PromptStyle
from aligndiff.prompts import prompt_bank
from aligndiff.sampling import GeneratedSample, Sampler
from aligndiff.scoring import SampleScore, mean_clip_score
from aligndiff.shots import Shot, decode_image, load_shot
from aligndiff.synth import learn_token
from service.contexts.jobs import (
    Fenced,
    advance_stage,
    claim_prefix,
    complete,
    fail,
    finish_cancelled,
    hold,
    report_progress,
    should_stop,
)
from service.models import Job, Sample, SegClass, utcnow
from service.models import Shot as ShotRow
from service.queue import synthesis_queue
from service.storage import class_prefix, png_bytes, sample_key
from worker import recovery
from worker.context import ThrottledProgress, WorkerContext

log = logging.getLogger(__name__)

JOB_KIND = "synthesis"
START = "aligndiff.synthesis.start"
RESUME = "aligndiff.synthesis.resume"
SAMPLE_CHUNK = "aligndiff.synthesis.sample_chunk"
ANNOTATE_CHUNK = "aligndiff.synthesis.annotate_chunk"
RECALIBRATE = "aligndiff.synthesis.recalibrate"
FINALIZE_CHUNK = "aligndiff.synthesis.finalize_chunk"

# Share of the job's progress per stage (sampling dominates on real models).
PROGRESS_SPANS = {
    "inversion": (0.0, 0.15),
    "sampling": (0.15, 0.80),
    "annotation": (0.80, 0.90),
    "scoring": (0.90, 1.0),
}
INVERSION_REPORT_SECONDS = 1.0

IMAGE, COARSE_MASK, MASK = "image.png", "coarse_mask.npy", "mask.png"
EMBEDDING, PROTOTYPES = "embedding.safetensors", "prototypes.safetensors"
PNG, BINARY = "image/png", "application/octet-stream"


@dataclass(frozen=True)
class ClassInfo:
    """What the steps need of a job's class, read in one short transaction."""

    job_id: uuid.UUID
    id: uuid.UUID
    name: str
    seed: int
    prompts: list[str]
    prompt_style: PromptStyle
    num_samples: int
    embedding_key: str | None
    prototypes_key: str | None
    bg_lambda: float | None
    bg_lambda_auto: bool
    acceptance: dict[str, Any] | None
    # The deployment model whose queue its tasks go to (`service.queue.synthesis_queue`).
    model: str
    # The claim of the job this step works under: what its writes carry.
    claim: int


# Steps: one per task.


def start(ctx: WorkerContext, job_id: uuid.UUID) -> None:
    """Claim the job, learn the class token unless the class has one, and fan out the first
    unfinished stage. A job that cannot be claimed (running elsewhere, finished, cancelled) is
    left alone; one past its attempts is failed by `claim`."""
    claim = ctx.claim_job(job_id)
    if claim is not None:
        _run(ctx, job_id, claim)


def resume(ctx: WorkerContext, job_id: uuid.UUID) -> None:
    """Go on with a running job that was taken over from a dead worker (`claim`ed by
    `requeue_orphaned_jobs`): like `start`, under the claim that took it over."""
    if _stopping(ctx, job_id):
        return
    _run(ctx, job_id, ctx.hold_claim(job_id))


def _run(ctx: WorkerContext, job_id: uuid.UUID, claim: int) -> None:
    info = _load_class(ctx, job_id, claim=claim, record_models=True)
    if info.embedding_key is None:
        if not _invert(ctx, info):
            return
        info = _load_class(ctx, job_id, claim=claim)
    dispatch(ctx, info)


def sample_chunk(ctx: WorkerContext, job_id: uuid.UUID, indices: Sequence[int]) -> None:
    """Draw the samples of `indices` that are not stored yet; each sample's blobs are written
    before its row, which is inserted only if absent. Cancel is checked before every batch."""
    if _stopping(ctx, job_id):
        return
    info = _load_class(ctx, job_id)
    if info.embedding_key is None:
        raise RuntimeError(f"class {info.id} has no embedding: sampling cannot start")
    with ctx.session() as session:
        wanted = [i for i in sorted(set(indices)) if 0 <= i < info.num_samples]
        stored = _indices(session, info, Sample.index.in_(wanted))
    missing = [i for i in wanted if i not in stored]
    if missing:
        log.info("job %s: drawing samples %s", job_id, ",".join(map(str, missing)))
        specs = prompt_bank(
            info.name,
            num_samples=info.num_samples,
            class_seed=info.seed,
            prompts=info.prompts,
            prompt_style=info.prompt_style,
        )
        _, embedding = _embedding_from_bytes(ctx.storage.get(info.embedding_key))
        sampler = Sampler(
            ctx.models.diffusion,
            class_name=info.name,
            token_embedding=embedding,
            config=ctx.config.sampling,
        )
        stop = _StopCheck(lambda: not _report(ctx, info, "sampling"))
        for generated in sampler.generate([specs[i] for i in missing], should_stop=stop):
            _store_sample(ctx, info, generated)
        if stop.stopped:
            _halt(ctx, info)
            return
    if not _report(ctx, info, "sampling"):
        _halt(ctx, info)
        return
    _advance_when_done(ctx, info, done_stage="sampling", next_stage="annotation")


def annotate_chunk(ctx: WorkerContext, job_id: uuid.UUID, indices: Sequence[int]) -> None:
    """Pass 1 over `indices`: each sample's CLIP scores are stored; the segmenter calibrated on
    the shots predicts each sample, its IoU with the coarse mask is stored, and where they agree
    and the prediction passes the class's semantic check it becomes the sample's mask
    (`consensus`)."""
    if _stopping(ctx, job_id):
        return
    info = _load_class(ctx, job_id)
    with ctx.session() as session:
        rows = _sample_rows(
            session, info, Sample.index.in_(list(indices)), Sample.consensus_iou.is_(None)
        )
    if rows:
        segmenter, scorer = ctx.models.segmenter, ctx.models.scorer
        shots = _load_shots(ctx, info)
        shot_images = [shot.image_array for shot in shots]
        shot_masks = [shot.mask for shot in shots]
        shot_features = segmenter.embed(shot_images)
        prototypes = segmenter.calibrate(shot_features, shot_masks)
        images = [_decode_rgb(ctx.storage.get(row.image_key)) for row in rows]
        coarse = [_decode_npy(ctx.storage.get(row.coarse_mask_key)) for row in rows]
        scores = scorer.score(
            images,
            scorer.reference(class_name=info.name, shot_images=shot_images),
        )
        semantic = SemanticCheck.for_shots(
            segmenter, shot_features, shot_masks, _thresholds(ctx, info, shots)
        )
        results = consensus_pass(
            segmenter,
            prototypes,
            segmenter.embed(images),
            coarse,
            ctx.config.annotation,
            semantic=semantic,
            shot_similarities=[score.shot_similarity for score in scores],
        )
        values: list[dict[str, Any]] = []
        for row, result, score in zip(rows, results, scores, strict=True):
            update_values: dict[str, Any] = {
                "consensus_iou": result.consensus_iou,
                "clip_score": score.clip_score,
                "shot_similarity": score.shot_similarity,
            }
            if result.consensus_mask is not None:
                key = sample_key(info.id, row.index, MASK)
                ctx.storage.put(key, _mask_png(result.consensus_mask), content_type=PNG)
                update_values |= {"mask_key": key, "mask_source": "consensus"}
            values.append(update_values)
        with ctx.session() as session:
            hold(session, info.job_id, claim=info.claim)
            for row, update_values in zip(rows, values, strict=True):
                _update_unfinalized(session, row, update_values)
    if not _report(ctx, info, "annotation"):
        _halt(ctx, info)
        return
    _advance_when_done(ctx, info, done_stage="annotation", next_stage="scoring")


def recalibrate_class(ctx: WorkerContext, job_id: uuid.UUID) -> None:
    """The barrier between the passes: prototypes calibrated on the shots plus every consensus
    sample, stored for the class; the caller that stores them fans out pass 2."""
    if _stopping(ctx, job_id):
        return
    info = _load_class(ctx, job_id)
    if info.prototypes_key is not None:
        return  # a redelivery: the first delivery stored them and fanned out pass 2
    with ctx.session() as session:
        if _pending(session, info, "annotation"):
            raise RuntimeError("re-calibration before pass 1 finished")
        consensus = _sample_rows(session, info, Sample.mask_source == "consensus")
    segmenter = ctx.models.segmenter
    shots = _load_shots(ctx, info)
    shot_features = segmenter.embed([shot.image_array for shot in shots])
    consensus_features = (
        segmenter.embed([_decode_rgb(ctx.storage.get(row.image_key)) for row in consensus])
        if consensus
        else shot_features.select([])
    )
    prototypes = recalibrate(
        segmenter,
        shot_features,
        [shot.mask for shot in shots],
        consensus_features,
        [_decode_mask(ctx.storage.get(_required(row.mask_key))) for row in consensus],
    )
    key = _claimed_key(info, PROTOTYPES)
    ctx.storage.put(key, _prototypes_to_bytes(prototypes), content_type=BINARY)
    with ctx.session() as session:
        hold(session, info.job_id, claim=info.claim)
        stored = session.execute(
            update(SegClass)
            .where(SegClass.id == info.id, SegClass.prototypes_key.is_(None))
            .values(prototypes_key=key)
        )
        won = bool(stored.rowcount)  # type: ignore[attr-defined]
    if not _report(ctx, info, "scoring"):
        _halt(ctx, info)
        return
    if won:
        _fan_out(ctx, info, "scoring")


def finalize_chunk(ctx: WorkerContext, job_id: uuid.UUID, indices: Sequence[int]) -> None:
    """Pass 2 over `indices`: pseudo-label the samples without consensus with the re-calibrated
    prototypes, then judge every sample (OOD IoU, prototype similarity, and its verdict with
    the CLIP scores pass 1 stored), write its final mask and mark it finalized. The last
    finisher completes the job."""
    if _stopping(ctx, job_id):
        return
    info = _load_class(ctx, job_id)
    if info.prototypes_key is None:
        raise RuntimeError(f"class {info.id} has no re-calibrated prototypes: pass 2 cannot run")
    with ctx.session() as session:
        rows = _sample_rows(
            session, info, Sample.index.in_(list(indices)), Sample.finalized_at.is_(None)
        )
    if rows:
        _finalize(ctx, info, rows)
    if not _report(ctx, info, "scoring"):
        _halt(ctx, info)
        return
    with ctx.session() as session:
        done = not _pending(session, info, "scoring")
    if done:
        _finish(ctx, info)


def dispatch(ctx: WorkerContext, info: ClassInfo) -> None:
    """Fan out the first stage whose work is not all stored (or finish the job)."""
    with ctx.session() as session:
        stage = next(
            (stage for stage in ("sampling", "annotation") if _pending(session, info, stage)),
            "scoring",
        )
        advance_stage(session, info.job_id, stage=stage, claim=info.claim)
    if not _report(ctx, info, stage):
        _halt(ctx, info)
        return
    _fan_out(ctx, info, stage)


def send_to_its_model(ctx: WorkerContext, task_name: str, args: Sequence[Any]) -> bool:
    """Send a task of another model's class on to that model's queue (True), or leave it to
    this worker (False): one that serves the class's model.

    NOTE: senders route every synthesis task to its model's queue, so this only meets tasks
    sent before the deployment named its models (to the shared jobs queue, which every worker
    consumes): they are passed on rather than run on this worker's weights, or failed by the
    `model_ids` check.
    """
    job_id = uuid.UUID(str(args[0]))
    with ctx.session() as session:
        model = session.scalar(
            select(SegClass.model).join(Job, Job.target_id == SegClass.id).where(Job.id == job_id)
        )
    model = model or ctx.settings.default_model
    if model == ctx.settings.served_model:
        return False
    log.info("job %s is of model %s: task %s sent to its queue", job_id, model, task_name)
    ctx.queue.enqueue(task_name, *args, queue=synthesis_queue(model))
    return True


def record_failure(ctx: WorkerContext, job_id: uuid.UUID, error: BaseException, trace: str) -> None:
    """Fail the job (if it is still active) with a one-line error and, for admins, the
    formatted traceback. A job asked to stop ends `cancelled` instead (say, its class was
    deleted under the task). Under the claim the task worked under, if it took one: a task
    fenced off the job fails nothing."""
    message = str(error).strip().splitlines()
    summary = f"{type(error).__name__}: {message[0]}" if message else type(error).__name__
    claim = ctx.claims.get(job_id)
    try:
        with ctx.session() as session:
            if not finish_cancelled(session, job_id, claim=claim):
                fail(session, job_id, summary, traceback=trace.rstrip() or None, claim=claim)
    except Fenced as fenced:
        log.warning("fenced: %s; its failure is not recorded", fenced)


def requeue_orphaned_jobs(ctx: WorkerContext) -> list[uuid.UUID]:
    """Take over the synthesis jobs whose worker died and start again those whose start
    message was lost (see `worker.recovery.requeue_orphaned_jobs`)."""
    return recovery.requeue_orphaned_jobs(ctx, kind=JOB_KIND, start_task=START, resume_task=RESUME)


# Stage plumbing.


def _fan_out(ctx: WorkerContext, info: ClassInfo, stage: str) -> None:
    """Enqueue the tasks of `stage` for the samples it has not done (after commit): chunks,
    or the barrier when pass 2 has no prototypes yet; a stage with nothing left to do goes on
    (`scoring`: the job finishes)."""
    tasks = {
        "sampling": (SAMPLE_CHUNK, ctx.settings.sample_chunk_size),
        "annotation": (ANNOTATE_CHUNK, ctx.settings.annotation_chunk_size),
        "scoring": (FINALIZE_CHUNK, ctx.settings.annotation_chunk_size),
    }
    with ctx.session() as session:
        pending = _pending(session, info, stage)
        prototypes_key = session.scalar(
            select(SegClass.prototypes_key).where(SegClass.id == info.id)
        )
    if not pending:
        if stage == "scoring":
            _finish(ctx, info)
        return
    if stage == "scoring" and prototypes_key is None:
        ctx.queue.enqueue(RECALIBRATE, str(info.job_id), queue=synthesis_queue(info.model))
        return
    task, size = tasks[stage]
    for first in range(0, len(pending), size):
        chunk = pending[first : first + size]
        ctx.queue.enqueue(task, str(info.job_id), chunk, queue=synthesis_queue(info.model))


def _advance_when_done(
    ctx: WorkerContext, info: ClassInfo, *, done_stage: str, next_stage: str
) -> None:
    """When every sample is through `done_stage`, move the job to `next_stage` (one caller wins
    the compare-and-set) and let the winner fan it out."""
    with ctx.session() as session:
        won = not _pending(session, info, done_stage) and advance_stage(
            session, info.job_id, stage=next_stage, claim=info.claim
        )
    if won:
        _fan_out(ctx, info, next_stage)


def _finish(ctx: WorkerContext, info: ClassInfo) -> None:
    """Class aggregates from the finalized samples, then the job succeeds (once)."""
    with ctx.session() as session:
        hold(session, info.job_id, claim=info.claim)
        # The class's row lock first, as a reviewer's verdict takes it: one landing meanwhile
        # is counted here, or waits and recounts after.
        session.execute(select(SegClass.id).where(SegClass.id == info.id).with_for_update())
        rows = session.execute(
            select(Sample.accepted, Sample.clip_score).where(
                Sample.class_id == info.id, Sample.finalized_at.is_not(None)
            )
        ).all()
        session.execute(
            update(SegClass)
            .where(SegClass.id == info.id)
            .values(
                num_samples_done=len(rows),
                num_accepted=sum(1 for accepted, _ in rows if accepted),
                clip_score_mean=mean_clip_score(s for _, s in rows if s is not None),
            )
        )
        if not complete(session, info.job_id, claim=info.claim):
            finish_cancelled(session, info.job_id, claim=info.claim)


def _report(ctx: WorkerContext, info: ClassInfo, stage: str) -> bool:
    """Record the job's progress in `stage` from what is stored (and, while sampling, the
    class's sample count) and extend its lease. False when the job should stop; `Fenced`
    once it was claimed again."""
    with ctx.session() as session:
        done = info.num_samples - len(_pending(session, info, stage))
        low, high = PROGRESS_SPANS[stage]
        # NOTE: the job's row first: it fences the class's write that follows.
        going = report_progress(
            session,
            info.job_id,
            stage=stage,
            progress=low + (high - low) * done / max(info.num_samples, 1),
            lease_seconds=ctx.settings.job_lease_seconds,
            claim=info.claim,
        )
        if stage == "sampling":
            hold(session, info.job_id, claim=info.claim)
            session.execute(
                update(SegClass).where(SegClass.id == info.id).values(num_samples_done=done)
            )
        return going


def _stopping(ctx: WorkerContext, job_id: uuid.UUID) -> bool:
    """Whether the job is not running or asked to stop; a requested cancel ends it here."""
    with ctx.session() as session:
        if not should_stop(session, job_id):
            return False
        finish_cancelled(session, job_id)
    return True


def _halt(ctx: WorkerContext, info: ClassInfo) -> None:
    """Stop work on the job: cancelled if a cancel was requested (else it already ended)."""
    with ctx.session() as session:
        finish_cancelled(session, info.job_id, claim=info.claim)


class _StopCheck:
    """A `should_stop` callback that remembers whether it said stop."""

    def __init__(self, check: Callable[[], bool]) -> None:
        self.check = check
        self.stopped = False

    def __call__(self) -> bool:
        self.stopped = self.stopped or self.check()
        return self.stopped


def _invert(ctx: WorkerContext, info: ClassInfo) -> bool:
    """Learn the class token and store it; False when the job was stopped meanwhile."""
    with ctx.session() as session:
        advance_stage(session, info.job_id, stage="inversion", claim=info.claim)
    shots = _load_shots(ctx, info)
    heartbeat = ThrottledProgress(
        ctx,
        info.job_id,
        claim=info.claim,
        stage="inversion",
        span=PROGRESS_SPANS["inversion"],
        interval=INVERSION_REPORT_SECONDS,
    )
    learned = learn_token(
        ctx.models,
        [shot.image_array for shot in shots],
        [shot.mask for shot in shots],
        class_name=info.name,
        class_seed=info.seed,
        bg_lambda="auto" if info.bg_lambda_auto else info.bg_lambda,
        config=ctx.config,
        prompt_style=info.prompt_style,
        progress=heartbeat.progress,
        should_stop=heartbeat.should_stop,
    )
    if learned is None or heartbeat.stopped:
        _halt(ctx, info)
        return False
    result = learned.inversion
    key = _claimed_key(info, EMBEDDING)
    ctx.storage.put(
        key,
        _embedding_to_bytes(result.token, result.embedding, widths=result.widths),
        content_type=BINARY,
    )
    with ctx.session() as session:
        hold(session, info.job_id, claim=info.claim)
        # NOTE: only where none is set: an embedding, once stored, is never re-trained, and
        # the λ_bg and trials it was learned with are stored with it.
        session.execute(
            update(SegClass)
            .where(SegClass.id == info.id, SegClass.embedding_key.is_(None))
            .values(
                embedding_key=key,
                token=result.token,
                bg_lambda=learned.bg_lambda,
                tuning=learned.tuning,
            )
        )
    return True


# Rows.


def _load_class(
    ctx: WorkerContext,
    job_id: uuid.UUID,
    *,
    claim: int | None = None,
    record_models: bool = False,
) -> ClassInfo:
    """The job's class, worked on under `claim` (by default the job's current claim). Raises
    when either is gone, or when the class was started on other models than this worker's
    (its samples would not match)."""
    models = ctx.models.model_ids
    with ctx.session() as session:
        job = session.get(Job, job_id)
        if job is None:
            raise LookupError(f"job {job_id} does not exist")
        if job.kind != JOB_KIND:
            raise ValueError(f"job {job_id} is a {job.kind} job, not {JOB_KIND}")
        held = ctx.hold_claim(job_id, job.claim if claim is None else claim)
        row = session.get(SegClass, job.target_id)
        if row is None:
            raise LookupError(f"class {job.target_id} of job {job_id} does not exist")
        if row.model_ids and row.model_ids != models:
            raise RuntimeError(
                f"class {row.id} is synthesized with models {row.model_ids}; "
                f"this worker runs {models}"
            )
        if record_models and not row.model_ids:
            hold(session, job_id, claim=held)
            row.model_ids = dict(models)
        return ClassInfo(
            job_id=job_id,
            id=row.id,
            name=row.name,
            seed=row.seed,
            prompts=list(row.prompts or []),
            prompt_style=_prompt_style(row),
            num_samples=row.num_samples_requested,
            embedding_key=row.embedding_key,
            prototypes_key=row.prototypes_key,
            bg_lambda=row.bg_lambda,
            bg_lambda_auto=row.bg_lambda_auto,
            acceptance=row.acceptance,
            model=row.model or ctx.settings.default_model,
            claim=held,
        )


def _prompt_style(row: SegClass) -> PromptStyle:
    """The class's stored prompt style; one this worker does not know fails the job rather
    than draw its samples with other prompts than it was created with."""
    if row.prompt_style not in PROMPT_STYLES:
        raise RuntimeError(
            f"class {row.id} has prompt style {row.prompt_style!r}, unknown to this worker"
        )
    return cast(PromptStyle, row.prompt_style)


def _pending(session: Session, info: ClassInfo, stage: str) -> list[int]:
    """Indices of the class's samples that `stage` has not done yet, in order: not stored
    (sampling), without a pass-1 IoU (annotation), not finalized (scoring)."""
    if stage == "sampling":
        stored = _indices(session, info)
        return [i for i in range(info.num_samples) if i not in stored]
    condition = {
        "annotation": Sample.consensus_iou.is_(None),
        "scoring": Sample.finalized_at.is_(None),
    }[stage]
    return sorted(_indices(session, info, condition))


def _indices(session: Session, info: ClassInfo, *conditions: ColumnElement[bool]) -> set[int]:
    """Indices of the class's stored samples that meet `conditions`."""
    query = select(Sample.index).where(Sample.class_id == info.id, *conditions)
    return set(session.scalars(query))


def _sample_rows(
    session: Session, info: ClassInfo, *conditions: ColumnElement[bool]
) -> list[Sample]:
    query = select(Sample).where(Sample.class_id == info.id, *conditions).order_by(Sample.index)
    return list(session.scalars(query))


def _update_unfinalized(session: Session, row: Sample, values: dict[str, Any]) -> None:
    # NOTE: a finalized sample is never touched again (a straggler task cannot undo pass 2).
    session.execute(
        update(Sample)
        .where(Sample.id == row.id, Sample.finalized_at.is_(None))
        .values(**values)
        .execution_options(synchronize_session=False)
    )


def _insert_sample_if_absent(session: Session, values: dict[str, Any]) -> None:
    """Insert a sample row unless (class, index) exists: a concurrent or repeated draw of the
    same sample (same bits, same blob keys) never makes a second row."""
    dialect = session.get_bind().dialect.name
    insert_for: dict[str, Any] = {"postgresql": postgresql.insert, "sqlite": sqlite.insert}
    if dialect not in insert_for:
        raise RuntimeError(f"unsupported database {dialect!r}")
    statement = (
        insert_for[dialect](Sample)
        .values(id=uuid.uuid4(), created_at=utcnow(), **values)
        .on_conflict_do_nothing(index_elements=["class_id", "index"])
    )
    session.execute(statement)


def _store_sample(ctx: WorkerContext, info: ClassInfo, sample: GeneratedSample) -> None:
    spec = sample.spec
    image_key = sample_key(info.id, spec.index, IMAGE)
    coarse_key = sample_key(info.id, spec.index, COARSE_MASK)
    ctx.storage.put(image_key, png_bytes(Image.fromarray(sample.image)), content_type=PNG)
    ctx.storage.put(coarse_key, _npy(sample.coarse_mask), content_type=BINARY)
    height, width = sample.image.shape[:2]
    with ctx.session() as session:
        hold(session, info.job_id, claim=info.claim)
        _insert_sample_if_absent(
            session,
            {
                "class_id": info.id,
                "index": spec.index,
                "prompt": spec.prompt,
                "prompt_kind": spec.prompt_kind,
                "seed": spec.seed,
                "width": int(width),
                "height": int(height),
                "image_key": image_key,
                "coarse_mask_key": coarse_key,
            },
        )


def _finalize(ctx: WorkerContext, info: ClassInfo, rows: list[Sample]) -> None:
    models, config = ctx.models, ctx.config
    segmenter = models.segmenter
    shots = _load_shots(ctx, info)
    shot_images = [shot.image_array for shot in shots]
    shot_masks = [shot.mask for shot in shots]
    shot_features = segmenter.embed(shot_images)
    images = [_decode_rgb(ctx.storage.get(row.image_key)) for row in rows]
    features = segmenter.embed(images)

    masks: dict[int, BoolMask] = {}
    rest = [i for i, row in enumerate(rows) if row.mask_source != "consensus"]
    if rest:
        prototypes = _prototypes_from_bytes(ctx.storage.get(_required(info.prototypes_key)))
        pseudo = pseudo_label_pass(segmenter, prototypes, features.select(rest), config.annotation)
        masks.update(zip(rest, pseudo, strict=True))
    for i, row in enumerate(rows):
        if i not in masks:
            masks[i] = _decode_mask(ctx.storage.get(_required(row.mask_key)))
    final_masks = [masks[i] for i in range(len(rows))]

    thresholds = _thresholds(ctx, info, shots)
    signals = final_signals(
        segmenter,
        samples=features,
        sample_masks=final_masks,
        shots=shot_features,
        shot_masks=shot_masks,
        semantic=SemanticCheck.for_shots(segmenter, shot_features, shot_masks, thresholds),
        ood=config.ood,
    )
    ood, similarities = signals.ood_iou, signals.prototype_similarity
    scores = _clip_scores(ctx, info, rows, images, shot_images)
    verdicts = [
        verdict(
            prompt_kind=row.prompt_kind,  # type: ignore[arg-type]
            ood_iou=ood[i],
            prototype_similarity=similarities[i],
            shot_similarity=scores[i].shot_similarity,
            ood=config.ood,
            thresholds=thresholds,
        )
        for i, row in enumerate(rows)
    ]
    for i in rest:
        key = sample_key(info.id, rows[i].index, MASK)
        ctx.storage.put(key, _mask_png(final_masks[i]), content_type=PNG)
    now = utcnow()
    with ctx.session() as session:
        hold(session, info.job_id, claim=info.claim)
        for i, row in enumerate(rows):
            _update_unfinalized(
                session,
                row,
                {
                    "mask_key": sample_key(info.id, row.index, MASK),
                    "mask_source": "pseudo_label" if i in rest else "consensus",
                    "ood_iou": ood[i],
                    "clip_score": scores[i].clip_score,
                    "shot_similarity": scores[i].shot_similarity,
                    "prototype_similarity": similarities[i],
                    "accepted": verdicts[i][0],
                    "accepted_by": "filter",
                    "rejected_by": verdicts[i][1],
                    "instances": count_instances(
                        final_masks[i], min_area=ctx.settings.instance_min_area
                    ),
                    "finalized_at": now,
                },
            )


def _clip_scores(
    ctx: WorkerContext,
    info: ClassInfo,
    rows: list[Sample],
    images: list[npt.NDArray[np.uint8]],
    shot_images: list[npt.NDArray[np.uint8]],
) -> list[SampleScore]:
    """The rows' CLIP scores as pass 1 stored them; rows without (pass 1 ran before scores
    moved there) are scored now."""
    missing = [i for i, row in enumerate(rows) if row.shot_similarity is None]
    fresh: dict[int, SampleScore] = {}
    if missing:
        scorer = ctx.models.scorer
        reference = scorer.reference(class_name=info.name, shot_images=shot_images)
        fresh = dict(
            zip(missing, scorer.score([images[i] for i in missing], reference), strict=True)
        )
    return [
        fresh[i]
        if i in fresh
        else SampleScore(
            clip_score=row.clip_score or 0.0, shot_similarity=row.shot_similarity or 0.0
        )
        for i, row in enumerate(rows)
    ]


def _thresholds(ctx: WorkerContext, info: ClassInfo, shots: list[Shot]) -> AcceptanceThresholds:
    """The class's acceptance thresholds: stored with the class, else calibrated on its shots
    and stored (the first to store wins; calibration is deterministic, so any worker's are the
    same)."""
    if info.acceptance is not None:
        return AcceptanceThresholds.from_dict(info.acceptance)
    models = ctx.models
    thresholds = calibrate(
        models.segmenter,
        models.scorer.embed_images,
        [shot.image_array for shot in shots],
        [shot.mask for shot in shots],
        ctx.config.acceptance,
    )
    with ctx.session() as session:
        hold(session, info.job_id, claim=info.claim)
        session.execute(
            update(SegClass)
            .where(SegClass.id == info.id, SegClass.acceptance.is_(None))
            .values(acceptance=thresholds.to_dict())
        )
        stored = session.scalar(select(SegClass.acceptance).where(SegClass.id == info.id))
    return AcceptanceThresholds.from_dict(stored) if stored else thresholds


def _load_shots(ctx: WorkerContext, info: ClassInfo) -> list[Shot]:
    """The class's real shots (normalized copies), in upload order."""
    with ctx.session() as session:
        rows = list(
            session.scalars(
                select(ShotRow).where(ShotRow.class_id == info.id).order_by(ShotRow.position)
            )
        )
    if not rows:
        raise ValueError(f"class {info.id} has no shots")
    return [
        load_shot(
            ctx.storage.get(row.image_key),
            ctx.storage.get(row.mask_key),
            stem=f"{row.position:02d}",
            max_pixels=ctx.settings.max_image_pixels,
            image_source=row.image_key,
            mask_source=row.mask_key,
        )
        for row in rows
    ]


def _claimed_key(info: ClassInfo, name: str) -> str:
    """The key of a blob written once per class (the embedding, the prototypes) by the step's
    claim: a fenced worker's never replaces the one the class's row names."""
    return f"{claim_prefix(class_prefix(info.id), info.claim)}{name}"


def _required(key: str | None) -> str:
    if key is None:
        raise RuntimeError("a blob key that an earlier stage should have stored is missing")
    return key


# Blob encodings.


def _mask_png(mask: BoolMask) -> bytes:
    return png_bytes(mask_to_image(mask))


def _decode_rgb(data: bytes) -> npt.NDArray[np.uint8]:
    return np.asarray(decode_image(data, source="sample image"), dtype=np.uint8)


def _decode_mask(data: bytes) -> BoolMask:
    return np.asarray(Image.open(io.BytesIO(data)).convert("L")) >= 128


def _npy(array: npt.NDArray[Any]) -> bytes:
    # NOTE: the coarse mask is kept as exact float32 (not an 8-bit PNG), so pass 1 cuts the
    # same values as the in-process pipeline does.
    buffer = io.BytesIO()
    np.save(buffer, np.ascontiguousarray(array, dtype=np.float32), allow_pickle=False)
    return buffer.getvalue()


def _decode_npy(data: bytes) -> npt.NDArray[np.float32]:
    return np.load(io.BytesIO(data), allow_pickle=False)


def _embedding_to_bytes(token: str, embedding: torch.Tensor, *, widths: Sequence[int]) -> bytes:
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / EMBEDDING
        save_embedding(path, token, embedding, widths=widths)
        return path.read_bytes()


def _embedding_from_bytes(data: bytes) -> tuple[str, torch.Tensor]:
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / EMBEDDING
        path.write_bytes(data)
        return load_embedding(path)


def _prototypes_to_bytes(prototypes: Any) -> bytes:
    if not isinstance(prototypes, Prototypes):
        raise TypeError(f"cannot store {type(prototypes).__name__} between the annotation passes")
    return save_tensors(
        {
            "foreground": prototypes.foreground.detach().float().cpu().contiguous(),
            "background": prototypes.background.detach().float().cpu().contiguous(),
            "weights": torch.tensor(
                [prototypes.foreground_weight, prototypes.background_weight], dtype=torch.float64
            ),
        }
    )


def _prototypes_from_bytes(data: bytes) -> Prototypes:
    tensors = load_tensors(data)
    foreground_weight, background_weight = tensors["weights"].tolist()
    return Prototypes(
        foreground=tensors["foreground"],
        background=tensors["background"],
        foreground_weight=float(foreground_weight),
        background_weight=float(background_weight),
    )
