"""The training job: a segmenter trained on classes' shots and accepted samples.

    start ── claim ──▶ runs, each resuming from its stored checkpoint, if any ──▶ metrics,
          `complete`
    resume (a job taken over from a dead worker) ──▶ the same, without claiming

What its runs are depends on the training's `eval_set`, so that its metrics come from images
it did not train on wherever the data allows:
- `validation` (a validation set was uploaded): the model (weights stored), the baseline
  (compare_baseline: the same on the shots alone), then both evaluated on the validation set.
- `held_out_shots` (2+ shots in every class): leave-one-shot-out folds first. Fold k holds out
  the k-th shot of every class, trains on the rest (+ the samples), and is evaluated on the
  held-out shots; with compare_baseline a fold baseline on the remaining shots alone too. Each
  fold run's result is stored in `Training.fold_results` as it ends. Then the model on all
  shots (its weights stored, not evaluated: the metrics are the fold means).
- `training_shots` (a class with 1 shot): as `validation`, evaluated on the training shots
  themselves, an optimistic measure.

`predict` (no job: the API waits for its answer) segments one image with a trained model,
each model loaded once per worker process and kept (`SegmenterCache`).

The database is the truth, as in `worker.synthesis`: every blob (checkpoint, weights) is
written under a key derived from the training's id and the claim it works under before the
row names it, and a run whose weights (or fold result) are stored is not trained again, so a
retried or resumed job keeps the work done. Its writes are fenced by that claim: a worker whose
job was taken over abandons it at its next write, and its blobs, under its own claim's keys,
never replace its successor's.
"""

from __future__ import annotations

import logging
import statistics
import threading
import uuid
from collections import OrderedDict
from dataclasses import dataclass, replace
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
from service.contexts.jobs import claim_prefix, complete, finish_cancelled, hold, should_stop
from service.models import Sample, SegClass, Training, utcnow
from service.models import Shot as ShotRow
from service.storage import Storage, png_bytes, training_key, training_prefix
from worker import recovery
from worker.celery_app import PREDICT_TASK
from worker.context import ThrottledProgress, WorkerContext

if TYPE_CHECKING:
    from aligndiff.models.segmenters import SegmentationModel
    from aligndiff.training import TrainingState

log = logging.getLogger(__name__)

JOB_KIND = "training"
VALIDATION, HELD_OUT_SHOTS, TRAINING_SHOTS = "validation", "held_out_shots", "training_shots"
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
    eval_set: str
    weights_key: str | None
    baseline_weights_key: str | None
    checkpoint_key: str | None
    validation_keys: list[list[str]] | None
    fold_results: dict[str, Any]
    # The claim of the job this worker trains under: what its writes carry.
    claim: int


@dataclass(frozen=True)
class Run:
    """One model to train: on the shots (all, or all but fold `fold`'s held-out ones) and
    (`synthetic`) the accepted samples, checkpointed under its own key, reporting progress
    within `span`. A final run stores its weights (`weights_column` names them, under
    `weights_name`); a fold run (`fold` set) stores its result in `Training.fold_results`."""

    name: str
    synthetic: bool
    checkpoint_name: str
    span: tuple[float, float] = (0.0, 1.0)
    weights_column: str | None = None
    weights_name: str | None = None
    fold: int | None = None


@dataclass(frozen=True)
class Example:
    """One image of a class with its object's mask; `kind` says where it came from, and
    `position` is a shot's position in its class (None for a sample)."""

    image: npt.NDArray[np.uint8]
    mask: npt.NDArray[np.bool_]
    class_index: int
    kind: ObjectKind
    position: int | None = None


def start(ctx: WorkerContext, job_id: uuid.UUID) -> None:
    """Claim the job and train. A job that cannot be claimed (running elsewhere, finished,
    cancelled) is left alone; one past its attempts is failed by `claim`."""
    claim = ctx.claim_job(job_id)
    if claim is not None:
        _run(ctx, job_id, claim)


def resume(ctx: WorkerContext, job_id: uuid.UUID) -> None:
    """Go on with a running job taken over from a dead worker, under the claim that took it
    over."""
    with ctx.session() as session:
        if should_stop(session, job_id):
            finish_cancelled(session, job_id)
            return
    _run(ctx, job_id, ctx.hold_claim(job_id))


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


def _run(ctx: WorkerContext, job_id: uuid.UUID, claim: int) -> None:
    from aligndiff.models.segmenters import load_segmenter

    info = _load_training(ctx, job_id, claim)
    class_names = _class_names(ctx, info)
    shots = _load_examples(ctx, info, synthetic=False)
    folds = _fold_count(ctx, info, shots)
    samples: list[Example] | None = None
    models: dict[str, tuple[SegmentationModel, int]] = {}
    for run in _runs(info, folds):
        if run.fold is not None and run.name in info.fold_results:
            continue
        stored = getattr(info, run.weights_column) if run.weights_column else None
        if stored is not None:
            if not folds:
                model, config = load_segmenter(ctx.storage.get(stored))
                models[run.name] = model, int(config["resolution"])
            continue
        trained_on, held_out = _split(shots, run.fold)
        if run.synthetic:
            samples = _load_examples(ctx, info, synthetic=True) if samples is None else samples
            trained_on = trained_on + samples
        trained = _train(ctx, info, run, class_names, trained_on)
        if trained is None:
            with ctx.session() as session:
                finish_cancelled(session, job_id, claim=claim)
            return
        if run.fold is None:
            models[run.name] = trained, ctx.settings.training_resolution
        else:
            result = _measure(
                trained,
                [example.image for example in held_out],
                [_labels(example) for example in held_out],
                class_names,
                resolution=ctx.settings.training_resolution,
            )
            held = {class_names[example.class_index - 1]: example.position for example in held_out}
            _store_fold_result(ctx, info, run.name, {"held_out": held, **result})
        info = _load_training(ctx, job_id, claim)

    if folds:
        metrics = _fold_metrics(info, folds)
    else:
        metrics = _final_metrics(ctx, info, models, class_names, shots)
    with ctx.session() as session:
        hold(session, job_id, claim=claim)
        _update_training(session, info.id, {"metrics": metrics})
        if not complete(session, job_id, claim=claim):
            finish_cancelled(session, job_id, claim=claim)


def _fold_count(ctx: WorkerContext, info: TrainingInfo, shots: list[Example]) -> int:
    """How many leave-one-shot-out folds the training is evaluated by: none unless its
    `eval_set` is `held_out_shots`, else as many as the class with fewest shots allows, at
    most `settings.eval_max_folds`."""
    if info.validation_keys or info.eval_set != HELD_OUT_SHOTS:
        return 0
    fewest = min(
        sum(example.class_index == index for example in shots)
        for index in range(1, len(info.class_ids) + 1)
    )
    if fewest < 2:
        raise ValueError(
            f"held-out evaluation needs 2 or more shots in every class; one class has {fewest}"
        )
    return min(ctx.settings.eval_max_folds, fewest)


def _runs(info: TrainingInfo, folds: int) -> list[Run]:
    """The runs in the order they are trained: the folds' (when evaluated by folds), then the
    final model on all the shots, and its baseline (compare_baseline, without folds)."""
    runs: list[Run] = []
    for fold in range(folds):
        runs.append(
            Run(
                _fold_run(fold),
                synthetic=info.use_synthetic,
                checkpoint_name=f"folds/{fold}/checkpoint.bin",
                fold=fold,
            )
        )
        if info.compare_baseline:
            runs.append(
                Run(
                    _fold_run(fold, baseline=True),
                    synthetic=False,
                    checkpoint_name=f"folds/{fold}/baseline/checkpoint.bin",
                    fold=fold,
                )
            )
    runs.append(
        Run(
            "model",
            synthetic=info.use_synthetic,
            checkpoint_name="checkpoint.bin",
            weights_column="weights_key",
            weights_name="weights.zip",
        )
    )
    if info.compare_baseline and not folds:
        runs.append(
            Run(
                "baseline",
                synthetic=False,
                checkpoint_name="baseline/checkpoint.bin",
                weights_column="baseline_weights_key",
                weights_name="baseline/weights.zip",
            )
        )
    # Every run trains the same steps: each gets an equal share of the job's progress.
    return [
        replace(run, span=(index / len(runs), (index + 1) / len(runs)))
        for index, run in enumerate(runs)
    ]


def _fold_run(fold: int, *, baseline: bool = False) -> str:
    return f"fold-{fold}-baseline" if baseline else f"fold-{fold}"


def _split(shots: list[Example], fold: int | None) -> tuple[list[Example], list[Example]]:
    """The shots trained on and those held out: fold k holds out the k-th shot of every
    class (in position order); no fold holds out none."""
    if fold is None:
        return list(shots), []
    trained_on: list[Example] = []
    held_out: list[Example] = []
    seen: dict[int, int] = {}
    for example in shots:
        rank = seen[example.class_index] = seen.get(example.class_index, -1) + 1
        (held_out if rank == fold else trained_on).append(example)
    return trained_on, held_out


def _measure(
    model: SegmentationModel,
    images: list[npt.NDArray[np.uint8]],
    label_maps: list[npt.NDArray[np.uint8]],
    class_names: list[str],
    *,
    resolution: int,
) -> dict[str, Any]:
    from aligndiff.training import evaluate

    result = evaluate(model, images, label_maps, class_names, resolution=resolution)
    return {"per_class_iou": dict(result.per_class_iou), "miou": float(result.miou)}


def _store_fold_result(
    ctx: WorkerContext, info: TrainingInfo, run_name: str, result: dict[str, Any]
) -> None:
    training_id = info.id
    with ctx.session() as session:
        hold(session, info.job_id, claim=info.claim)
        stored = session.scalars(
            select(Training.fold_results).where(Training.id == training_id).with_for_update()
        ).one()
        # NOTE: the whole dict is written: a JSON column's value is replaced, never patched.
        _update_training(
            session, training_id, {"fold_results": {**(stored or {}), run_name: result}}
        )


def _final_metrics(
    ctx: WorkerContext,
    info: TrainingInfo,
    models: dict[str, tuple[SegmentationModel, int]],
    class_names: list[str],
    shots: list[Example],
) -> dict[str, Any]:
    """The final model's (and baseline's) metrics on the validation set, or else on the
    training shots."""
    if info.validation_keys:
        eval_set = VALIDATION
        images, label_maps = _load_validation(ctx, info.validation_keys)
    else:
        eval_set = TRAINING_SHOTS
        images = [example.image for example in shots]
        label_maps = [_labels(example) for example in shots]

    def measured(name: str) -> dict[str, Any]:
        model, resolution = models[name]
        return _measure(model, images, label_maps, class_names, resolution=resolution)

    metrics: dict[str, Any] = {**measured("model"), "eval_set": eval_set}
    if "baseline" in models:
        metrics["baseline"] = measured("baseline")
        metrics["comparison"] = _comparison(metrics, metrics["baseline"], spread=None)
    return metrics


def _fold_metrics(info: TrainingInfo, folds: int) -> dict[str, Any]:
    """The fold means (and standard deviations) of the held-out results, each fold's
    results, and with compare_baseline the baseline's and the comparison, whose `spread` is
    the standard deviation over folds of the per-fold mIoU difference."""
    results = info.fold_results
    per_fold = []
    for fold in range(folds):
        result = results[_fold_run(fold)]
        baseline = results.get(_fold_run(fold, baseline=True)) if info.compare_baseline else None
        per_fold.append(
            {
                "fold": fold,
                "held_out": result["held_out"],
                "per_class_iou": result["per_class_iou"],
                "miou": result["miou"],
                "baseline": None
                if baseline is None
                else {"per_class_iou": baseline["per_class_iou"], "miou": baseline["miou"]},
            }
        )
    metrics: dict[str, Any] = {**_fold_summary(per_fold), "eval_set": HELD_OUT_SHOTS}
    metrics["folds"] = per_fold
    if info.compare_baseline:
        baselines = [fold["baseline"] for fold in per_fold]
        metrics["baseline"] = _fold_summary(baselines)
        differences = [fold["miou"] - fold["baseline"]["miou"] for fold in per_fold]
        metrics["comparison"] = _comparison(
            metrics, metrics["baseline"], spread=statistics.pstdev(differences)
        )
    return metrics


def _fold_summary(results: list[dict[str, Any]]) -> dict[str, Any]:
    """The mean per-class IoU and mIoU over folds, and the per-class standard deviation
    (population: over the folds run)."""
    names = list(results[0]["per_class_iou"])
    return {
        "per_class_iou": {
            name: statistics.fmean(result["per_class_iou"][name] for result in results)
            for name in names
        },
        "miou": statistics.fmean(result["miou"] for result in results),
        "per_class_iou_std": {
            name: statistics.pstdev(result["per_class_iou"][name] for result in results)
            for name in names
        },
    }


def _comparison(
    with_synthetic: dict[str, Any], baseline: dict[str, Any], *, spread: float | None
) -> dict[str, Any]:
    """With minus without synthetic data; whether the mIoU difference exceeds `spread` (None
    where there is no spread to compare with)."""
    difference = with_synthetic["miou"] - baseline["miou"]
    return {
        "miou_difference": difference,
        "per_class_difference": {
            name: iou - baseline["per_class_iou"][name]
            for name, iou in with_synthetic["per_class_iou"].items()
        },
        "spread": spread,
        "exceeds_spread": None if spread is None else abs(difference) > spread,
    }


def _train(
    ctx: WorkerContext,
    info: TrainingInfo,
    run: Run,
    class_names: list[str],
    examples: list[Example],
) -> SegmentationModel | None:
    """Train `run` (from its checkpoint, when one is stored) and store its weights (a final
    run); None when the job was asked to stop."""
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
    checkpoint_key = _claimed_key(info, run.checkpoint_name)
    resume_from = None
    if info.checkpoint_key is not None and _checkpoint_of(info, info.checkpoint_key, run):
        resume_from = TrainingState.from_bytes(ctx.storage.get(info.checkpoint_key))
        log.info("training %s: resuming the %s from step %d", info.id, run.name, resume_from.step)

    def save_checkpoint(state: TrainingState) -> None:
        ctx.storage.put(checkpoint_key, state.to_bytes(), content_type=BINARY)
        with ctx.session() as session:
            hold(session, info.job_id, claim=info.claim)
            _update_training(session, info.id, {"checkpoint_key": checkpoint_key})

    heartbeat = ThrottledProgress(
        ctx,
        info.job_id,
        claim=info.claim,
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
    if run.weights_column is not None and run.weights_name is not None:
        weights_key = _claimed_key(info, run.weights_name)
        weights = save_segmenter(model, class_names=class_names, resolution=config.resolution)
        ctx.storage.put(weights_key, weights, content_type=ZIP)
        with ctx.session() as session:
            hold(session, info.job_id, claim=info.claim)
            _update_training(session, info.id, {run.weights_column: weights_key})
    return model


def _claimed_key(info: TrainingInfo, name: str) -> str:
    """The key of a blob of the training written by this worker's claim (a checkpoint, the
    weights): a fenced worker's never replaces the one the training's row names."""
    return f"{claim_prefix(training_prefix(info.id), info.claim)}{name}"


def _checkpoint_of(info: TrainingInfo, key: str, run: Run) -> bool:
    """Whether `key` (the training's latest checkpoint) is one of `run`, written under any
    claim of the job (or, stored before claims had keys, under the training's own folder)."""
    if key == training_key(info.id, run.checkpoint_name):
        return True
    folder = claim_prefix(training_prefix(info.id))
    claim, _, name = key.removeprefix(folder).partition("/")
    return key.startswith(folder) and claim.isdigit() and name == run.checkpoint_name


def _load_training(ctx: WorkerContext, job_id: uuid.UUID, claim: int) -> TrainingInfo:
    """The job's training, trained under `claim`."""
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
            eval_set=row.eval_set,
            weights_key=row.weights_key,
            baseline_weights_key=row.baseline_weights_key,
            checkpoint_key=row.checkpoint_key,
            validation_keys=row.validation_keys,
            fold_results=dict(row.fold_results or {}),
            claim=claim,
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
    keys: list[tuple[str, str, int, ObjectKind, int | None]] = []
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
                    (image, cast(str, mask), class_index, cast(ObjectKind, kind), None)
                    for image, mask, kind in samples
                ]
            else:
                shots = session.execute(
                    select(ShotRow.image_key, ShotRow.mask_key, ShotRow.position)
                    .where(ShotRow.class_id == class_id)
                    .order_by(ShotRow.position)
                ).all()
                keys += [
                    (image, mask, class_index, "shot", position) for image, mask, position in shots
                ]
    return [
        Example(
            image=np.asarray(
                decode_image(ctx.storage.get(image_key), source=image_key), dtype=np.uint8
            ),
            mask=_decode_mask(ctx.storage.get(mask_key)),
            class_index=class_index,
            kind=kind,
            position=position,
        )
        for image_key, mask_key, class_index, kind, position in keys
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
