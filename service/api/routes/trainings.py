"""`/v1/trainings`: train a segmenter on finished classes (202, its training job queued),
read, list, download the trained weights and predict with them."""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from typing import Annotated, Any

from fastapi import APIRouter, Depends, File, Request, Response, UploadFile
from fastapi.exceptions import RequestValidationError
from pydantic import ValidationError
from starlette.datastructures import UploadFile as StarletteUploadFile

from service.api.deps import (
    CurrentPrincipal,
    Cursor,
    IdempotencyKey,
    Limit,
    QueueDep,
    SessionDep,
    SettingsDep,
    StorageDep,
    require_multipart,
)
from service.api.responses import PNG, answer_response, blob_response, problem_responses
from service.contexts import job_control, trainings
from service.contexts.uploads import Upload
from service.pagination import DEFAULT_LIMIT
from service.problems import Problem, refuse_unknown_fields
from service.schemas import Page, TrainingCreate, TrainingPublic

router = APIRouter(prefix="/v1/trainings", tags=["trainings"])

LOCATION = {"Location": {"description": "The new training's URL.", "schema": {"type": "string"}}}


MULTIPART = "multipart/form-data"
MULTIPART_FIELDS = frozenset({"request", "val_images", "val_masks"})

_TRAINING_CREATE = TrainingCreate.model_json_schema(ref_template="#/components/schemas/{model}")
CREATE_BODY: dict[str, Any] = {
    "required": True,
    "content": {
        "application/json": {"schema": _TRAINING_CREATE},
        MULTIPART: {
            "schema": {
                "type": "object",
                "required": ["request"],
                "additionalProperties": False,
                "properties": {
                    "request": {
                        **_TRAINING_CREATE,
                        "description": "The JSON body of the `application/json` variant.",
                    },
                    "val_images": {
                        "type": "array",
                        "items": {"type": "string", "format": "binary"},
                        "description": "The validation images: JPEG, PNG or WEBP.",
                    },
                    "val_masks": {
                        "type": "array",
                        "items": {"type": "string", "format": "binary"},
                        "description": "One label map per image, in the images' order: a "
                        "single-channel PNG of its size, 0 background, k the k-th of "
                        "`class_ids`, 255 ignored.",
                    },
                },
            },
            "encoding": {"request": {"contentType": "application/json"}},
        },
    },
}


@dataclass(frozen=True)
class TrainingRequest:
    """The body of `POST /v1/trainings`, either variant."""

    training_in: TrainingCreate
    val_images: list[Upload] = field(default_factory=list)
    val_masks: list[Upload] = field(default_factory=list)


async def training_request(request: Request) -> TrainingRequest:
    """Parse the body by its Content-Type: JSON (a `TrainingCreate`), or multipart/form-data
    with that JSON in `request` and the validation set in `val_images` + `val_masks`."""
    content_type = request.headers.get("content-type", "").lower()
    if content_type.startswith(MULTIPART):
        form = await request.form()
        raw = form.get("request")
        if raw is None:
            raise Problem(
                422,
                "the request is not valid",
                errors=[{"field": "request", "message": "the training's JSON body is required"}],
            )
        refuse_unknown_fields(form.keys(), MULTIPART_FIELDS)
        if isinstance(raw, StarletteUploadFile):
            raw = (await raw.read()).decode("utf-8", errors="replace")
        return TrainingRequest(
            training_in=_validated(raw, location=("body", "request")),
            val_images=[await _read(item) for item in form.getlist("val_images")],
            val_masks=[await _read(item) for item in form.getlist("val_masks")],
        )
    if content_type and not _is_json(content_type):
        raise Problem(415, "send the request as application/json or multipart/form-data")
    return TrainingRequest(training_in=_validated(await request.body(), location=("body",)))


def _is_json(content_type: str) -> bool:
    media_type = content_type.split(";", 1)[0].strip()
    return media_type == "application/json" or media_type.endswith("+json")


def _validated(raw: str | bytes, *, location: tuple[str, ...]) -> TrainingCreate:
    try:
        return TrainingCreate.model_validate_json(raw)
    except ValidationError as error:
        raise RequestValidationError(
            [
                {**detail, "loc": (*location, *detail["loc"])}
                for detail in error.errors(include_url=False)
            ]
        ) from None


async def _read(item: str | StarletteUploadFile) -> Upload:
    if isinstance(item, str):
        return Upload(filename="", data=item.encode())
    # NOTE: the body is already parsed and capped by the body size limit.
    return Upload(filename=item.filename or "", data=await item.read())


@router.post(
    "",
    status_code=202,
    response_model=TrainingPublic,
    responses={
        202: {"description": "The training, its job queued.", "headers": LOCATION},
        **problem_responses(400, 401, 404, 409, 413, 415, 422),
    },
    openapi_extra={"requestBody": CREATE_BODY},
)
def create_training(
    request: Request,
    session: SessionDep,
    storage: StorageDep,
    queue: QueueDep,
    settings: SettingsDep,
    principal: CurrentPrincipal,
    body: Annotated[TrainingRequest, Depends(training_request)],
    idempotency_key: IdempotencyKey = None,
) -> Response:
    """Train a segmenter on classes whose synthesis succeeded, and queue its job.

    Send the training as JSON, or as multipart/form-data with that JSON in `request` and a
    validation set (`val_images` + `val_masks`, paired by order) to measure it on instead of
    the shots.
    """
    accepted = trainings.create_training(
        session=session,
        storage=storage,
        settings=settings,
        principal=principal,
        training_in=body.training_in,
        val_images=body.val_images,
        val_masks=body.val_masks,
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
        **problem_responses(400, 401, 404, 409, 413, 415, 422, 500, 503),
    },
)
def predict_with_training(
    session: SessionDep,
    settings: SettingsDep,
    queue: QueueDep,
    principal: CurrentPrincipal,
    training_id: uuid.UUID,
    image: Annotated[UploadFile, File(description="A JPEG, PNG or WEBP image.")],
) -> Response:
    """Segment an image with the trained model, on a worker; 409 until the training
    succeeded, 503 with Retry-After when no worker answered in time."""
    mask = trainings.predict_mask(
        session=session,
        settings=settings,
        queue=queue,
        principal=principal,
        training_id=training_id,
        # NOTE: the body is already parsed and capped by the body size limit.
        image=image.file.read(),
    )
    return Response(mask, media_type=PNG)
