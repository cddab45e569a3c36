"""Trainings: creating one from finished classes (which queues its training job), reading
and listing them, downloading the trained weights, and predicting with them."""

from __future__ import annotations

import threading
import uuid
from collections import OrderedDict
from collections.abc import Callable
from io import BytesIO
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image
from sqlalchemy import Select, select
from sqlalchemy.orm import Session

from aligndiff.shots import ShotError, ShotFormatError, decode_image
from service.auth import Principal
from service.contexts import jobs
from service.contexts.access import visible_to
from service.contexts.idempotency import Answer, claim_for, commit_with_answer, find_answer
from service.contexts.idempotency import fingerprint as request_fingerprint
from service.contexts.job_control import Accepted, StartTask
from service.models import Job, SegClass, Training
from service.pagination import newest_first, newest_first_cursor, split_page
from service.problems import Problem, not_found
from service.schemas import Page, TrainingCreate, TrainingMetrics, TrainingPublic
from service.settings import Settings
from service.storage import Storage

if TYPE_CHECKING:
    from aligndiff.models.segmenters import SegmentationModel

TRAINING = "training"


def create_training(
    *,
    session: Session,
    settings: Settings,
    principal: Principal,
    training_in: TrainingCreate,
    idempotency_key: str | None,
    location_of: Callable[[uuid.UUID], str],
) -> Accepted:
    """Record a training of the caller's classes with its queued job; the caller starts the
    job (`job_control.start_job`) afterwards.

    Each class must be visible to the caller (else 404) and its synthesis succeeded (else
    409); `steps` over the server's maximum and repeated classes answer 422.
    """
    owner_id = principal.owner_id
    claim = claim_for(
        owner_id,
        idempotency_key,
        request_fingerprint("create_training", training_in.model_dump(mode="json")),
    )
    if (replay := find_answer(session, claim)) is not None:
        return Accepted(replay, start=None)
    _check_fields(training_in, settings)
    _check_classes(session, principal, training_in.class_ids)

    training_id = uuid.uuid4()
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
        eval_set="shots",
        job_id=job.id,
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
    storage: Storage,
    settings: Settings,
    segmenters: SegmenterCache,
    principal: Principal,
    training_id: uuid.UUID,
    image: bytes,
) -> bytes:
    """The trained segmenter's label mask for `image` as a PNG (mode L: 0 background, k the
    k-th class of the training). 409 until the training succeeded; an image that is not a
    JPEG, PNG or WEBP answers 415, one that cannot be decoded or is too large 422."""
    weights_key = _trained(session, principal, training_id)
    # NOTE: the rest reads no rows: the connection goes back to the pool during inference.
    session.rollback()
    try:
        decoded = decode_image(image, source="image", max_pixels=settings.max_image_pixels)
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
    from aligndiff.training import predict

    model, config = segmenters.get(weights_key, storage)
    (labels,) = predict(
        model, [np.asarray(decoded, dtype=np.uint8)], resolution=int(config["resolution"])
    )
    buffer = BytesIO()
    Image.fromarray(np.asarray(labels, dtype=np.uint8), mode="L").save(buffer, "PNG")
    return buffer.getvalue()


class SegmenterCache:
    """The last few trained segmenters loaded by this process, by weights key (a training's
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
        metrics=TrainingMetrics.model_validate(training.metrics)
        if succeeded and training.metrics is not None
        else None,
        job_id=training.job_id,
        error=job.error if job is not None else None,
        created_at=training.created_at,
        updated_at=training.updated_at,
    )


def _check_fields(training_in: TrainingCreate, settings: Settings) -> None:
    errors = []
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


def _check_classes(session: Session, principal: Principal, class_ids: list[uuid.UUID]) -> None:
    """404 unless every class is visible to `principal`; 409 unless each one's synthesis
    succeeded (its samples are final)."""
    rows = session.execute(
        select(SegClass.id, Job.status)
        .outerjoin(Job, Job.id == SegClass.job_id)
        .where(SegClass.id.in_(class_ids), visible_to(principal, SegClass.owner_id))
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
