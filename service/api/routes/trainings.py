"""`/v1/trainings`: train a segmenter on finished classes (202, its training job queued),
read, list, download the trained weights and predict with them."""

from __future__ import annotations

import uuid
from typing import Annotated

from fastapi import APIRouter, Depends, File, Request, Response, UploadFile

from service.api.deps import (
    CurrentPrincipal,
    Cursor,
    IdempotencyKey,
    Limit,
    QueueDep,
    SegmentersDep,
    SessionDep,
    SettingsDep,
    StorageDep,
    require_multipart,
)
from service.api.responses import PNG, answer_response, blob_response, problem_responses
from service.contexts import job_control, trainings
from service.pagination import DEFAULT_LIMIT
from service.schemas import Page, TrainingCreate, TrainingPublic

router = APIRouter(prefix="/v1/trainings", tags=["trainings"])

LOCATION = {"Location": {"description": "The new training's URL.", "schema": {"type": "string"}}}


@router.post(
    "",
    status_code=202,
    response_model=TrainingPublic,
    responses={
        202: {"description": "The training, its job queued.", "headers": LOCATION},
        **problem_responses(401, 404, 409, 422),
    },
)
def create_training(
    request: Request,
    session: SessionDep,
    queue: QueueDep,
    settings: SettingsDep,
    principal: CurrentPrincipal,
    training_in: TrainingCreate,
    idempotency_key: IdempotencyKey = None,
) -> Response:
    """Train a segmenter on classes whose synthesis succeeded, and queue its job."""
    accepted = trainings.create_training(
        session=session,
        settings=settings,
        principal=principal,
        training_in=training_in,
        idempotency_key=idempotency_key,
        location_of=lambda training_id: str(
            request.url_for("get_training", training_id=training_id)
        ),
    )
    job_control.start_job(queue=queue, start=accepted.start)
    return answer_response(accepted.answer)


@router.get("", response_model=Page[TrainingPublic], responses=problem_responses(400, 401, 422))
def list_trainings(
    session: SessionDep,
    principal: CurrentPrincipal,
    limit: Limit = DEFAULT_LIMIT,
    cursor: Cursor = None,
) -> Page[TrainingPublic]:
    """The caller's trainings, newest first."""
    return trainings.list_trainings(
        session=session, principal=principal, limit=limit, cursor=cursor
    )


@router.get(
    "/{training_id}", response_model=TrainingPublic, responses=problem_responses(401, 404, 422)
)
def get_training(
    session: SessionDep, principal: CurrentPrincipal, training_id: uuid.UUID
) -> TrainingPublic:
    """A training, with the state of its job and, once it succeeded, its metrics."""
    return trainings.get_training(session=session, principal=principal, training_id=training_id)


@router.get(
    "/{training_id}/weights",
    response_class=Response,
    responses={
        200: {
            "description": "A zip of `model.safetensors` and `config.json` (architecture, "
            "class names, resolution).",
            "content": {"application/zip": {}},
        },
        **problem_responses(401, 404, 409, 422),
    },
)
def get_training_weights(
    session: SessionDep,
    storage: StorageDep,
    settings: SettingsDep,
    principal: CurrentPrincipal,
    training_id: uuid.UUID,
) -> Response:
    """Download the trained segmenter; 409 until the training succeeded."""
    key, filename = trainings.weights_blob(
        session=session, principal=principal, training_id=training_id
    )
    return blob_response(
        storage,
        key,
        media_type="application/zip",
        filename=filename,
        disposition="attachment",
        presign_seconds=settings.presign_seconds,
    )


@router.post(
    "/{training_id}/predict",
    response_class=Response,
    dependencies=[Depends(require_multipart)],
    responses={
        200: {
            "description": "The label mask, a grayscale PNG of the image's size: 0 is "
            "background, k the k-th of the training's classes.",
            "content": {PNG: {}},
        },
        **problem_responses(401, 404, 409, 413, 415, 422),
    },
)
def predict_with_training(
    session: SessionDep,
    storage: StorageDep,
    settings: SettingsDep,
    segmenters: SegmentersDep,
    principal: CurrentPrincipal,
    training_id: uuid.UUID,
    image: Annotated[UploadFile, File(description="A JPEG, PNG or WEBP image.")],
) -> Response:
    """Segment an image with the trained model; 409 until the training succeeded."""
    mask = trainings.predict_mask(
        session=session,
        storage=storage,
        settings=settings,
        segmenters=segmenters,
        principal=principal,
        training_id=training_id,
        # NOTE: the body is already parsed and capped by the body size limit.
        image=image.file.read(),
    )
    return Response(mask, media_type=PNG)
