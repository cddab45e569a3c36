"""Trainings: creating one from finished classes (which queues its training job), reading
and listing them, downloading the trained weights, and predicting with them."""

from __future__ import annotations

import logging
import math
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from io import BytesIO
from typing import Any

import numpy as np
from PIL import Image
from sqlalchemy import Select, select
from sqlalchemy.orm import Session

from aligndiff.shots import ShotError, ShotFormatError, decode_image
from service.auth import Principal
from service.contexts import jobs, quotas
from service.contexts.access import visible_to
from service.contexts.idempotency import (
    Answer,
    IdempotencyClaim,
    claim_for,
    commit_with_answer,
    find_answer,
)
from service.contexts.idempotency import fingerprint as request_fingerprint
from service.contexts.job_control import Accepted, StartTask
from service.contexts.uploads import Upload, file_digests
from service.models import Job, SegClass, Training
from service.pagination import newest_first, newest_first_cursor, split_page
from service.problems import Problem, not_found
from service.queue import TaskFailed, TaskQueue, TaskTimeout, TaskUnavailable
from service.schemas import Page, TrainingCreate, TrainingMetrics, TrainingPublic
from service.settings import Settings
from service.storage import (
    Storage,
    delete_prefix_quietly,
    png_bytes,
    training_key,
    training_prefix,
)

log = logging.getLogger(__name__)

TRAINING = "training"
PNG = "image/png"
IGNORE_LABEL = 255
# What a training is evaluated on (`Training.eval_set`, `metrics.eval_set`).
VALIDATION, HELD_OUT_SHOTS, TRAINING_SHOTS = "validation", "held_out_shots", "training_shots"
# The worker task that predicts (`worker.training.predict`), sent by name.
PREDICT_TASK = "aligndiff.training.predict"


@dataclass(frozen=True)
class ValidationPair:
    """A checked validation pair: an RGB image and its label map (0 background, k the k-th
    class, 255 ignored) of the same size."""

    image: Image.Image
    labels: Image.Image


def create_training(
    *,
    session: Session,
    storage: Storage,
    settings: Settings,
    principal: Principal,
    training_in: TrainingCreate,
    val_images: Sequence[Upload] = (),
    val_masks: Sequence[Upload] = (),
    idempotency_key: str | None,
    location_of: Callable[[uuid.UUID], str],
) -> Accepted:
    """Record a training of the caller's classes with its queued job; the caller starts the
    job (`job_control.start_job`) afterwards.

    Each class must be visible to the caller (else 404) and its synthesis succeeded (else
    409); `steps` over the server's maximum and repeated classes answer 422.

    With a validation set (`val_images` paired by order with `val_masks`, label maps whose
    values are 0, k for the k-th class or 255 ignored) the training is evaluated on it; else,
    when every class has 2 or more shots, on held-out shots (leave-one-shot-out folds); else
    on the shots it trained on. `compare_baseline` needs one of the first two (else 422: a
    comparison on the training shots says nothing). The validation pairs are all checked
    first (415 for a file of a type not accepted, else 422 naming `val_images[i]` /
    `val_masks[i]`), stored under the training's prefix before the rows, and deleted again
    when the rows cannot be committed.

    Over one of the owner's quotas (`service.contexts.quotas`; admins have none) answers 429.
    """
    owner_id = principal.owner_id
    claim = claim_for(owner_id, idempotency_key, _fingerprint(training_in, val_images, val_masks))
    if (replay := find_answer(session, claim)) is not None:
        return Accepted(replay, start=None)
    _check_fields(training_in, settings, val_images=val_images, val_masks=val_masks)
    shots = _check_classes(session, principal, training_in.class_ids)
    _check_baseline_can_be_compared(training_in, shots, validation=bool(val_images))
    demand = quotas.JobDemand(
        owner_id,
        exempt=principal.is_admin,
        upload_bytes=sum(len(upload.data) for upload in (*val_images, *val_masks)),
    )
    record = partial(
        _record_training, session, settings, claim, demand, training_in, location_of=location_of
    )
    if not val_images:
        eval_set = HELD_OUT_SHOTS if min(count for _, count in shots) >= 2 else TRAINING_SHOTS
        return record(uuid.uuid4(), None, eval_set=eval_set)

    # Early, before the work on the validation set; again below, under the owner's lock.
    quotas.enforce(session, settings, demand, lock=False)
    # NOTE: decoding and storing the validation set takes a while; the connection goes back
    # to the pool meanwhile rather than sit idle in a transaction (the classes are checked
    # again below, in the transaction that records the training).
    session.rollback()
    pairs = _load_validation(val_images, val_masks, training_in=training_in, settings=settings)
    training_id = uuid.uuid4()
    try:
        keys = _store_validation(storage, training_id, pairs)
        _check_classes(session, principal, training_in.class_ids)
        accepted = record(training_id, keys, eval_set=VALIDATION)
    except BaseException:
        session.rollback()
        delete_prefix_quietly(storage, training_prefix(training_id))
        raise
    if accepted.answer.replayed:
        # A concurrent request with the same Idempotency-Key won: this one's rows were rolled
        # back, and its blobs go too.
        delete_prefix_quietly(storage, training_prefix(training_id))
    return accepted


def _record_training(
    session: Session,
    settings: Settings,
    claim: IdempotencyClaim | None,
    demand: quotas.JobDemand,
    training_in: TrainingCreate,
    training_id: uuid.UUID,
    validation_keys: list[list[str]] | None,
    *,
    eval_set: str,
    location_of: Callable[[uuid.UUID], str],
) -> Accepted:
    owner_id = demand.owner_id
    quotas.enforce(session, settings, demand)
    job = jobs.create_job(session, kind=TRAINING, owner_id=owner_id, target_id=training_id)
    training = Training(
        id=training_id,
        owner_id=owner_id,
        class_ids=[str(class_id) for class_id in training_in.class_ids],
        architecture=training_in.architecture,
        steps=training_in.steps,
        batch_size=training_in.batch_size,
        use_synthetic=training_in.use_synthetic,
        copy_paste=training_in.copy_paste,
        compare_baseline=training_in.compare_baseline,
        eval_set=eval_set,
        validation_keys=validation_keys,
        job_id=job.id,
        upload_bytes=demand.upload_bytes,
    )
    session.add(training)
    session.flush()
    body = training_public(training, job).model_dump_json()
    answer = commit_with_answer(session, claim, Answer(202, body, location_of(training_id)))
    return Accepted(answer, start=None if answer.replayed else StartTask(TRAINING, job.id))


def list_trainings(
    *, session: Session, principal: Principal, limit: int, cursor: str | None
) -> Page[TrainingPublic]:
    """The trainings `principal` may see, newest first."""
    statement = newest_first(
        _trainings_with_jobs().where(visible_to(principal, Training.owner_id)),
        created_at=Training.created_at,
        id_=Training.id,
        cursor=cursor,
        limit=limit,
    )
    rows, next_cursor = split_page(
        session.execute(statement).tuples().all(),
        limit=limit,
        cursor_after=lambda row: newest_first_cursor(row[0].created_at, row[0].id),
    )
    return Page[TrainingPublic](
        items=[training_public(training, job) for training, job in rows], next_cursor=next_cursor
    )


def get_training(
    *, session: Session, principal: Principal, training_id: uuid.UUID
) -> TrainingPublic:
    return training_public(*_visible_training(session, principal, training_id))


def weights_blob(
    *, session: Session, principal: Principal, training_id: uuid.UUID
) -> tuple[str, str]:
    """The blob key of the trained weights (a zip: model.safetensors + config.json) and a file
    name for it; 409 until the training succeeded."""
    return _trained(session, principal, training_id), f"training-{training_id}.zip"


def predict_mask(
    *,
    session: Session,
    settings: Settings,
    queue: TaskQueue,
    principal: Principal,
    training_id: uuid.UUID,
    image: bytes,
) -> bytes:
    """The trained segmenter's label mask for `image` as a PNG (mode L: 0 background, k the
    k-th class of the training), computed by a worker.

    409 until the training succeeded; an image that is not a JPEG, PNG or WEBP answers 415,
    one that cannot be decoded or is too large 422. 503 with Retry-After when no worker
    answered within `settings.predict_timeout_seconds` or the broker is unreachable; 500 naming
    the error when the worker failed.
    """
    weights_key = _trained(session, principal, training_id)
    # NOTE: the rest reads no rows: the connection goes back to the pool while a worker works.
    session.rollback()
    try:
        decode_image(image, source="image", max_pixels=settings.max_image_pixels)
    except ShotFormatError as error:
        raise Problem(
            415,
            "the image is not of an accepted type: send a JPEG, PNG or WEBP",
            errors=[{"field": "image", "message": error.detail}],
        ) from None
    except ShotError as error:
        raise Problem(
            422, "the image is not valid", errors=[{"field": "image", "message": error.detail}]
        ) from None
    timeout = settings.predict_timeout_seconds
    retry_after = {"Retry-After": str(max(1, math.ceil(timeout)))}
    try:
        # NOTE: the image travels in the message as sent (at most the upload limit): one
        # round trip and nothing to clean up, where a blob written first would need both.
        mask = queue.call(PREDICT_TASK, weights_key, image, timeout=timeout)
    except TaskTimeout:
        raise Problem(
            503,
            f"no worker answered within {timeout:g} s (all may be busy with long jobs); "
            "retry later",
            headers=retry_after,
        ) from None
    except TaskUnavailable:
        log.exception("could not send the prediction of training %s", training_id)
        raise Problem(
            503, "the task queue is unavailable; retry shortly", headers=retry_after
        ) from None
    except TaskFailed as error:
        log.error("the prediction of training %s failed on a worker: %s", training_id, error)
        raise Problem(500, f"the worker could not predict: {error}") from None
    if not isinstance(mask, bytes):
        raise Problem(500, f"the worker answered {type(mask).__name__}, not a PNG")
    return mask


def training_public(training: Training, job: Job | None) -> TrainingPublic:
    """A training as the API shows it: its state comes from its job."""
    succeeded = job is not None and job.status == "succeeded"
    return TrainingPublic(
        id=training.id,
        status=job.status if job is not None else "queued",  # type: ignore[arg-type]
        progress=job.progress if job is not None else 0.0,
        class_ids=[uuid.UUID(class_id) for class_id in training.class_ids],
        architecture=training.architecture,  # type: ignore[arg-type]
        steps=training.steps,
        batch_size=training.batch_size,
        use_synthetic=training.use_synthetic,
        copy_paste=training.copy_paste,
        compare_baseline=training.compare_baseline,
        metrics=_metrics(training.metrics) if succeeded and training.metrics is not None else None,
        job_id=training.job_id,
        error=job.error if job is not None else None,
        created_at=training.created_at,
        updated_at=training.updated_at,
    )


def _metrics(stored: dict[str, Any]) -> TrainingMetrics:
    # NOTE: metrics stored before held-out evaluation (migration 0005) name the training
    # shots `shots`; the migration renamed the column's value, not the JSON's.
    if stored.get("eval_set") == "shots":
        stored = {**stored, "eval_set": TRAINING_SHOTS}
    return TrainingMetrics.model_validate(stored)


def _fingerprint(
    training_in: TrainingCreate, val_images: Sequence[Upload], val_masks: Sequence[Upload]
) -> str:
    fields: dict[str, Any] = training_in.model_dump(mode="json")
    if val_images or val_masks:
        fields |= {"val_images": file_digests(val_images), "val_masks": file_digests(val_masks)}
    return request_fingerprint("create_training", fields)


def _check_fields(
    training_in: TrainingCreate,
    settings: Settings,
    *,
    val_images: Sequence[Upload],
    val_masks: Sequence[Upload],
) -> None:
    errors = []
    if len(val_images) > settings.max_validation_images:
        errors.append(
            {
                "field": "val_images",
                "message": f"at most {settings.max_validation_images} images, "
                f"got {len(val_images)}",
            }
        )
    if len(val_masks) != len(val_images):
        errors.append(
            {
                "field": "val_masks",
                "message": f"{len(val_masks)} masks for {len(val_images)} images; send one "
                "label map per image, in the same order",
            }
        )
    if training_in.steps > settings.max_training_steps:
        errors.append(
            {
                "field": "steps",
                "message": f"must be at most {settings.max_training_steps} on this server",
            }
        )
    if len(set(training_in.class_ids)) != len(training_in.class_ids):
        errors.append({"field": "class_ids", "message": "each class may be named once"})
    if errors:
        raise Problem(422, "the request is not valid", errors=errors)


def _check_classes(
    session: Session, principal: Principal, class_ids: list[uuid.UUID]
) -> list[tuple[str, int]]:
    """404 unless every class is visible to `principal`; 409 unless each one's synthesis
    succeeded (its samples are final). Each class's name and number of shots, in order."""
    rows = session.execute(
        select(SegClass.id, Job.status, SegClass.name, SegClass.num_shots)
        .outerjoin(Job, Job.id == SegClass.job_id)
        .where(SegClass.id.in_(class_ids), visible_to(principal, SegClass.owner_id))
        # NOTE: held until the training commits, so a class deleted meanwhile waits for it
        # and then cancels it (see `classes.delete_class`).
        .with_for_update(read=True, of=SegClass)
    ).all()
    status = {row[0]: row[1] for row in rows}
    missing = [class_id for class_id in class_ids if class_id not in status]
    if missing:
        raise Problem(
            404,
            "class not found",
            errors=[
                {"field": f"class_ids[{class_ids.index(class_id)}]", "message": "not found"}
                for class_id in missing
            ],
        )
    unfinished = [class_id for class_id in class_ids if status[class_id] != "succeeded"]
    if unfinished:
        raise Problem(
            409,
            "every class's synthesis must have succeeded before it can be trained on",
            errors=[
                {
                    "field": f"class_ids[{class_ids.index(class_id)}]",
                    "message": f"its synthesis is {status[class_id] or 'not started'}",
                }
                for class_id in unfinished
            ],
        )
    shots = {row[0]: (row[2], row[3]) for row in rows}
    return [shots[class_id] for class_id in class_ids]


def _check_baseline_can_be_compared(
    training_in: TrainingCreate, shots: list[tuple[str, int]], *, validation: bool
) -> None:
    """422 for `compare_baseline` without held-out data to compare on: neither a validation
    set nor 2 or more shots in every class."""
    single = [name for name, count in shots if count < 2]
    if not training_in.compare_baseline or validation or not single:
        return
    has = "has" if len(single) == 1 else "have"
    message = (
        "compare_baseline needs images that neither model is trained on: upload a validation "
        "set (val_images with val_masks), or give each class at least 2 shots "
        f"({_listed(single)} {has} 1 shot)"
    )
    raise Problem(422, message, errors=[{"field": "compare_baseline", "message": message}])


def _listed(names: list[str]) -> str:
    quoted = [f"'{name}'" for name in names]
    if len(quoted) == 1:
        return f"class {quoted[0]}"
    return f"classes {', '.join(quoted[:-1])} and {quoted[-1]}"


def _load_validation(
    images: Sequence[Upload],
    masks: Sequence[Upload],
    *,
    training_in: TrainingCreate,
    settings: Settings,
) -> list[ValidationPair]:
    """Decode and check every pair, reporting every bad file at once: 415 when a file is of a
    type that is not accepted, else 422."""
    pairs: list[ValidationPair] = []
    errors: list[dict[str, str]] = []
    wrong_type = False
    num_classes = len(training_in.class_ids)
    for index, (image, mask) in enumerate(zip(images, masks, strict=True)):
        try:
            decoded = decode_image(
                image.data, source=f"val_images[{index}]", max_pixels=settings.max_image_pixels
            )
            labels = _decode_label_map(
                mask.data, source=f"val_masks[{index}]", size=decoded.size, classes=num_classes
            )
            pairs.append(ValidationPair(image=decoded, labels=labels))
        except ShotError as error:
            wrong_type = wrong_type or isinstance(error, ShotFormatError)
            errors.append({"field": error.source, "message": error.detail})
    if wrong_type:
        raise Problem(
            415,
            "an uploaded file is not of an accepted type: validation images must be JPEG, PNG "
            "or WEBP, their label maps PNG",
            errors=errors,
        )
    if errors:
        raise Problem(422, "the uploaded validation set is not valid", errors=errors)
    if pairs and not any(_has_class_pixels(pair.labels) for pair in pairs):
        # NOTE: masks in the shots' format (0 and 255) pass as label maps of nothing but
        # ignored pixels, and every IoU measured on them would be meaningless.
        message = (
            "the validation set holds no pixel of any class: its label maps hold only 0 "
            f"(background) and {IGNORE_LABEL} (ignored). Mark the pixels of the k-th class of "
            f"class_ids with k: a mask in the shots' format (0 and 255) must become 0 and 1"
        )
        raise Problem(
            422,
            "the uploaded validation set is not valid",
            errors=[{"field": "val_masks", "message": message}],
        )
    return pairs


def _has_class_pixels(labels: Image.Image) -> bool:
    values = np.asarray(labels)
    return bool(np.any((values != 0) & (values != IGNORE_LABEL)))


def _decode_label_map(
    data: bytes, *, source: str, size: tuple[int, int], classes: int
) -> Image.Image:
    """A validation label map: a single-channel (L or P) PNG of `size` whose values are 0,
    1..`classes` or 255 (ignored); ShotError (ShotFormatError for another type) otherwise."""
    try:
        image = Image.open(BytesIO(data))
        if image.format != "PNG":
            raise ShotFormatError(
                f"a label map must be a PNG, not {image.format or 'this format'}", source
            )
        if image.mode not in ("L", "P"):
            raise ShotError(
                f"a label map must be single-channel (mode L or P), not mode {image.mode}", source
            )
        if image.size != size:
            raise ShotError(
                f"the label map is {image.size[0]}x{image.size[1]} but its image is "
                f"{size[0]}x{size[1]}",
                source,
            )
        values = np.asarray(image, dtype=np.uint8)
    except ShotError:
        raise
    except Image.UnidentifiedImageError:
        raise ShotFormatError("not an image of a known format: send a PNG", source) from None
    except (OSError, ValueError, Image.DecompressionBombError) as error:
        raise ShotError(f"cannot be decoded: {error}", source) from None
    invalid = sorted({int(v) for v in np.unique(values)} - {*range(classes + 1), IGNORE_LABEL})
    if invalid:
        raise ShotError(
            f"holds the values {invalid[:10]}; a label map holds 0 (background), 1..{classes} "
            f"(the k-th of class_ids) or {IGNORE_LABEL} (ignored)",
            source,
        )
    return Image.fromarray(values, mode="L")


def _store_validation(
    storage: Storage, training_id: uuid.UUID, pairs: Sequence[ValidationPair]
) -> list[list[str]]:
    """Write each pair as PNGs (RGB image, mode L label map); return their keys."""
    keys = []
    for index, pair in enumerate(pairs):
        image_key = training_key(training_id, f"validation/{index:03d}/image.png")
        labels_key = training_key(training_id, f"validation/{index:03d}/labels.png")
        storage.put(image_key, png_bytes(pair.image), content_type=PNG)
        storage.put(labels_key, png_bytes(pair.labels), content_type=PNG)
        keys.append([image_key, labels_key])
    return keys


def _trained(session: Session, principal: Principal, training_id: uuid.UUID) -> str:
    """The weights key of a succeeded training; 409 before."""
    training, job = _visible_training(session, principal, training_id)
    if job is None or job.status != "succeeded" or training.weights_key is None:
        state = job.status if job is not None else "queued"
        raise Problem(409, f"the training is {state}; its model is ready once it succeeded")
    return training.weights_key


def _trainings_with_jobs() -> Select[Training, Job]:
    return select(Training, Job).outerjoin(Job, Job.id == Training.job_id)


def _visible_training(
    session: Session, principal: Principal, training_id: uuid.UUID
) -> tuple[Training, Job | None]:
    row = (
        session.execute(
            _trainings_with_jobs().where(
                Training.id == training_id, visible_to(principal, Training.owner_id)
            )
        )
        .tuples()
        .one_or_none()
    )
    if row is None:
        raise not_found("training")
    return row
