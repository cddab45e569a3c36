"""The training job: a segmenter trained on classes' shots and accepted samples.

    start ── claim ──▶ train (resumes from the stored checkpoint, if any) ──▶ weights stored
          ──▶ baseline (compare_baseline: the same on the shots alone) ──▶ evaluate on the
          uploaded validation set, if any, else on the shots ──▶ metrics, `complete`
    resume (a job taken over from a dead worker) ──▶ the same, without claiming

`predict` (no job: the API waits for its answer) segments one image with a trained model,
each model loaded once per worker process and kept (`SegmenterCache`).

The database is the truth, as in `worker.synthesis`: every blob (checkpoint, weights) is
written under a key derived from the training's id before the row names it, and a run whose
weights are stored is not trained again, so a retried or resumed job keeps the work done.
"""

from __future__ import annotations

import logging
import threading
import uuid
from collections import OrderedDict
from dataclasses import dataclass
from io import BytesIO
from typing import TYPE_CHECKING, Any, cast

import numpy as np
import numpy.typing as npt
from PIL import Image
from sqlalchemy import select, update
from sqlalchemy.orm import Session

from aligndiff.copy_paste import LabeledImage, ObjectKind, PasteObject
from aligndiff.masks import binarize_mask
from aligndiff.shots import decode_image
from service.contexts.jobs import complete, finish_cancelled, should_stop
from service.models import Sample, SegClass, Training, utcnow
from service.models import Shot as ShotRow
from service.storage import Storage, png_bytes, training_key
from worker import recovery
from worker.celery_app import PREDICT_TASK
from worker.context import ThrottledProgress, WorkerContext

if TYPE_CHECKING:
    from aligndiff.models.segmenters import SegmentationModel
    from aligndiff.training import TrainingState

log = logging.getLogger(__name__)

JOB_KIND = "training"
START = "aligndiff.training.start"
RESUME = "aligndiff.training.resume"
PREDICT = PREDICT_TASK

BINARY, ZIP = "application/octet-stream", "application/zip"


@dataclass(frozen=True)
class TrainingInfo:
    """What the job needs of its training row, read in one short transaction."""

    job_id: uuid.UUID
    id: uuid.UUID
    class_ids: list[uuid.UUID]
    architecture: str
    steps: int
    batch_size: int
    use_synthetic: bool
    copy_paste: bool
    compare_baseline: bool
    weights_key: str | None
    baseline_weights_key: str | None
    checkpoint_key: str | None
    validation_keys: list[list[str]] | None


@dataclass(frozen=True)
class Run:
    """One model to train: on the shots and (`synthetic`) the accepted samples, its weights
    and checkpoint stored under their own keys, reporting progress within `span`."""

    name: str
    synthetic: bool
    weights_column: str
    weights_name: str
    checkpoint_name: str
    span: tuple[float, float]


@dataclass(frozen=True)
class Example:
    """One image of a class with its object's mask; `kind` says where it came from."""

    image: npt.NDArray[np.uint8]
    mask: npt.NDArray[np.bool_]
    class_index: int
    kind: ObjectKind


def start(ctx: WorkerContext, job_id: uuid.UUID) -> None:
    """Claim the job and train. A job that cannot be claimed (running elsewhere, finished,
    cancelled) is left alone; one past its attempts is failed by `claim`."""
    if ctx.claim_job(job_id):
        _run(ctx, job_id)


def resume(ctx: WorkerContext, job_id: uuid.UUID) -> None:
    """Go on with a running job taken over from a dead worker, without claiming it again."""
    with ctx.session() as session:
        if should_stop(session, job_id):
            finish_cancelled(session, job_id)
            return
    _run(ctx, job_id)


def requeue_orphaned_jobs(ctx: WorkerContext) -> list[uuid.UUID]:
    """Take over the training jobs whose worker died and start again those whose start
    message was lost (see `worker.recovery.requeue_orphaned_jobs`)."""
    return recovery.requeue_orphaned_jobs(ctx, kind=JOB_KIND, start_task=START, resume_task=RESUME)


def predict(ctx: WorkerContext, weights_key: str, image: bytes) -> bytes:
    """The label mask of `image` (JPEG, PNG or WEBP bytes, checked by the API) by the trained
    segmenter stored under `weights_key`: a mode L PNG of the image's size, 0 background and
    k the k-th class of the training."""
    from aligndiff.training import predict as predict_labels

    decoded = decode_image(image, source="image", max_pixels=ctx.settings.max_image_pixels)
    model, config = ctx.segmenters.get(weights_key, ctx.storage)
    (labels,) = predict_labels(
        model, [np.asarray(decoded, dtype=np.uint8)], resolution=int(config["resolution"])
    )
    return png_bytes(Image.fromarray(np.asarray(labels, dtype=np.uint8), mode="L"))


class SegmenterCache:
    """The last few trained segmenters this process loaded, by weights key (a training's
    weights never change once stored, so an entry is never stale)."""

    def __init__(self, size: int) -> None:
        self.size = size
        self._entries: OrderedDict[str, tuple[SegmentationModel, dict[str, Any]]] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: str, storage: Storage) -> tuple[SegmentationModel, dict[str, Any]]:
        with self._lock:
            if key in self._entries:
                self._entries.move_to_end(key)
                return self._entries[key]
        from aligndiff.models.segmenters import load_segmenter

        # NOTE: loaded outside the lock (two first requests may both load; both are right).
        entry = load_segmenter(storage.get(key))
        with self._lock:
            self._entries[key] = entry
            self._entries.move_to_end(key)
            while len(self._entries) > self.size:
                self._entries.popitem(last=False)
        return entry


def _run(ctx: WorkerContext, job_id: uuid.UUID) -> None:
    from aligndiff.models.segmenters import load_segmenter
    from aligndiff.training import evaluate

    info = _load_training(ctx, job_id)
    class_names = _class_names(ctx, info)
    shots = _load_examples(ctx, info, synthetic=False)
    models: dict[str, tuple[SegmentationModel, int]] = {}
    for run in _runs(info):
        stored = getattr(info, run.weights_column)
        if stored is not None:
            model, config = load_segmenter(ctx.storage.get(stored))
            models[run.name] = model, int(config["resolution"])
            continue
        examples = shots + (_load_examples(ctx, info, synthetic=True) if run.synthetic else [])
        trained = _train(ctx, info, run, class_names, examples)
        if trained is None:
            with ctx.session() as session:
                finish_cancelled(session, job_id)
            return
        models[run.name] = trained, ctx.settings.training_resolution
        info = _load_training(ctx, job_id)

    if info.validation_keys:
        eval_set = "validation"
        images, label_maps = _load_validation(ctx, info.validation_keys)
    else:
        eval_set = "shots"
        images = [example.image for example in shots]
        label_maps = [_labels(example) for example in shots]

    def measured(name: str) -> dict[str, Any]:
        model, resolution = models[name]
        result = evaluate(model, images, label_maps, class_names, resolution=resolution)
        return {"per_class_iou": dict(result.per_class_iou), "miou": float(result.miou)}

    metrics: dict[str, Any] = {**measured("model"), "eval_set": eval_set}
    if "baseline" in models:
        metrics["baseline"] = measured("baseline")
    with ctx.session() as session:
        _update_training(session, info.id, {"metrics": metrics})
        if not complete(session, job_id):
            finish_cancelled(session, job_id)


def _runs(info: TrainingInfo) -> list[Run]:
    model = Run(
        name="model",
        synthetic=info.use_synthetic,
        weights_column="weights_key",
        weights_name="weights.zip",
        checkpoint_name="checkpoint.bin",
        span=(0.0, 0.5 if info.compare_baseline else 1.0),
    )
    if not info.compare_baseline:
        return [model]
    baseline = Run(
        name="baseline",
        synthetic=False,
        weights_column="baseline_weights_key",
        weights_name="baseline/weights.zip",
        checkpoint_name="baseline/checkpoint.bin",
        span=(0.5, 1.0),
    )
    return [model, baseline]


def _train(
    ctx: WorkerContext,
    info: TrainingInfo,
    run: Run,
    class_names: list[str],
    examples: list[Example],
) -> SegmentationModel | None:
    """Train `run` (from its checkpoint, when one is stored) and store its weights; None when
    the job was asked to stop."""
    from aligndiff.models.segmenters import build_segmenter, save_segmenter
    from aligndiff.training import TrainingConfig, TrainingSet, TrainingState, train_segmenter

    settings = ctx.settings
    config = TrainingConfig(
        architecture=info.architecture,
        steps=info.steps,
        batch_size=info.batch_size,
        copy_paste=info.copy_paste,
        checkpoint_every=settings.training_checkpoint_every,
        resolution=settings.training_resolution,
    )
    data = TrainingSet(
        class_names=class_names,
        images=[LabeledImage(image=example.image, labels=_labels(example)) for example in examples],
        objects=[
            PasteObject(
                image=example.image,
                mask=example.mask,
                class_index=example.class_index,
                kind=example.kind,
            )
            for example in examples
        ],
    )
    model = build_segmenter(
        info.architecture,
        num_classes=len(class_names) + 1,
        spec=settings.segmenter_backbone,
        cache_dir=settings.model_cache_dir,
    )
    checkpoint_key = training_key(info.id, run.checkpoint_name)
    resume_from = None
    if info.checkpoint_key == checkpoint_key:
        resume_from = TrainingState.from_bytes(ctx.storage.get(checkpoint_key))
        log.info("training %s: resuming the %s from step %d", info.id, run.name, resume_from.step)

    def save_checkpoint(state: TrainingState) -> None:
        ctx.storage.put(checkpoint_key, state.to_bytes(), content_type=BINARY)
        with ctx.session() as session:
            _update_training(session, info.id, {"checkpoint_key": checkpoint_key})

    heartbeat = ThrottledProgress(
        ctx,
        info.job_id,
        stage=None,
        span=run.span,
        interval=ctx.settings.training_report_seconds,
    )
    outcome = train_segmenter(
        model,
        data,
        config,
        progress=heartbeat.progress,
        should_stop=heartbeat.should_stop,
        checkpoint=save_checkpoint,
        resume=resume_from,
    )
    if outcome.stopped:
        return None
    weights_key = training_key(info.id, run.weights_name)
    weights = save_segmenter(model, class_names=class_names, resolution=config.resolution)
    ctx.storage.put(weights_key, weights, content_type=ZIP)
    with ctx.session() as session:
        _update_training(session, info.id, {run.weights_column: weights_key})
    return model


def _load_training(ctx: WorkerContext, job_id: uuid.UUID) -> TrainingInfo:
    with ctx.session() as session:
        row = session.scalars(select(Training).where(Training.job_id == job_id)).one_or_none()
        if row is None:
            raise LookupError(f"job {job_id} has no training")
        return TrainingInfo(
            job_id=job_id,
            id=row.id,
            class_ids=[uuid.UUID(class_id) for class_id in row.class_ids],
            architecture=row.architecture,
            steps=row.steps,
            batch_size=row.batch_size,
            use_synthetic=row.use_synthetic,
            copy_paste=row.copy_paste,
            compare_baseline=row.compare_baseline,
            weights_key=row.weights_key,
            baseline_weights_key=row.baseline_weights_key,
            checkpoint_key=row.checkpoint_key,
            validation_keys=row.validation_keys,
        )


def _class_names(ctx: WorkerContext, info: TrainingInfo) -> list[str]:
    """The classes' names in label order (label k is the k-th class); a class deleted since
    the training was created fails the job."""
    with ctx.session() as session:
        names = dict(
            session.execute(
                select(SegClass.id, SegClass.name).where(SegClass.id.in_(info.class_ids))
            )
            .tuples()
            .all()
        )
    missing = [str(class_id) for class_id in info.class_ids if class_id not in names]
    if missing:
        raise LookupError(f"classes deleted since the training was created: {missing}")
    return [names[class_id] for class_id in info.class_ids]


def _load_examples(ctx: WorkerContext, info: TrainingInfo, *, synthetic: bool) -> list[Example]:
    """The classes' real shots, or (`synthetic`) their accepted finalized samples."""
    keys: list[tuple[str, str, int, ObjectKind]] = []
    with ctx.session() as session:
        for class_index, class_id in enumerate(info.class_ids, start=1):
            if synthetic:
                samples = session.execute(
                    select(Sample.image_key, Sample.mask_key, Sample.prompt_kind)
                    .where(
                        Sample.class_id == class_id,
                        Sample.accepted.is_(True),
                        Sample.finalized_at.is_not(None),
                        Sample.mask_key.is_not(None),
                    )
                    .order_by(Sample.index)
                ).all()
                # NOTE: a finalized sample's mask is its final one (the query keeps only those).
                keys += [
                    (image, cast(str, mask), class_index, cast(ObjectKind, kind))
                    for image, mask, kind in samples
                ]
            else:
                shots = session.execute(
                    select(ShotRow.image_key, ShotRow.mask_key)
                    .where(ShotRow.class_id == class_id)
                    .order_by(ShotRow.position)
                ).all()
                keys += [(image, mask, class_index, "shot") for image, mask in shots]
    return [
        Example(
            image=np.asarray(
                decode_image(ctx.storage.get(image_key), source=image_key), dtype=np.uint8
            ),
            mask=_decode_mask(ctx.storage.get(mask_key)),
            class_index=class_index,
            kind=kind,
        )
        for image_key, mask_key, class_index, kind in keys
    ]


def _load_validation(
    ctx: WorkerContext, keys: list[list[str]]
) -> tuple[list[npt.NDArray[np.uint8]], list[npt.NDArray[np.uint8]]]:
    """The uploaded validation set: RGB images and their label maps (0 background, k the k-th
    class, 255 ignored), stored by the service as PNGs already checked."""
    images, label_maps = [], []
    for image_key, labels_key in keys:
        images.append(
            np.asarray(decode_image(ctx.storage.get(image_key), source=image_key), dtype=np.uint8)
        )
        label_maps.append(np.asarray(Image.open(BytesIO(ctx.storage.get(labels_key))), np.uint8))
    return images, label_maps


def _decode_mask(data: bytes) -> npt.NDArray[np.bool_]:
    # The stored masks are normalized (0/255 PNGs), written by the service itself.
    return binarize_mask(Image.open(BytesIO(data)))


def _labels(example: Example) -> npt.NDArray[np.uint8]:
    labels = np.zeros(example.mask.shape, dtype=np.uint8)
    labels[example.mask] = example.class_index
    return labels


def _update_training(session: Session, training_id: uuid.UUID, values: dict[str, Any]) -> None:
    session.execute(
        update(Training)
        .where(Training.id == training_id)
        .values(**values, updated_at=utcnow())
        .execution_options(synchronize_session=False)
    )
