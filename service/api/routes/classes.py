"""`/v1/classes`: create a class from shots (202, its synthesis job queued), read, list,
delete, download its learned embedding, and report on it."""

from __future__ import annotations

import uuid
from typing import Annotated

from fastapi import APIRouter, Depends, File, Form, Request, Response, UploadFile

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
from service.api.fast_reads import ReadRequest, fast_read
from service.api.responses import answer_response, blob_response, json_response, problem_responses
from service.contexts import classes, job_control, reports
from service.contexts.uploads import Upload
from service.pagination import DEFAULT_LIMIT, MAX_LIMIT
from service.problems import refuse_unknown_fields
from service.schemas import ClassCreate, ClassPublic, ClassReport, Page

router = APIRouter(prefix="/v1/classes", tags=["classes"])

LOCATION = {"Location": {"description": "The new class's URL.", "schema": {"type": "string"}}}


# The multipart fields of `POST /v1/classes`; any other is refused (422), never ignored.
CREATE_FIELDS = frozenset({*ClassCreate.model_fields, "images", "masks"})


async def known_fields_only(request: Request) -> None:
    # NOTE: FastAPI has parsed the form already; this reads Starlette's cached parse.
    refuse_unknown_fields((await request.form()).keys(), CREATE_FIELDS)


@router.post(
    "",
    status_code=202,
    response_model=ClassPublic,
    dependencies=[Depends(require_multipart), Depends(known_fields_only)],
    responses={
        202: {"description": "The class, its synthesis job queued.", "headers": LOCATION},
        **problem_responses(400, 401, 413, 415, 422),
    },
)
def create_class(
    request: Request,
    session: SessionDep,
    storage: StorageDep,
    queue: QueueDep,
    settings: SettingsDep,
    principal: CurrentPrincipal,
    class_in: Annotated[ClassCreate, Form()],
    images: Annotated[
        list[UploadFile], File(min_length=1, description="1–10 shot images: JPEG, PNG, WEBP.")
    ],
    masks: Annotated[
        list[UploadFile],
        File(min_length=1, description="One PNG mask per image, in the images' order."),
    ],
    idempotency_key: IdempotencyKey = None,
) -> Response:
    """Create a class from a few real image + mask shots and queue its synthesis."""
    accepted = classes.create_class(
        session=session,
        storage=storage,
        settings=settings,
        owner_id=principal.owner_id,
        class_in=class_in,
        images=[_read(upload) for upload in images],
        masks=[_read(upload) for upload in masks],
        idempotency_key=idempotency_key,
        location_of=lambda class_id: str(request.url_for("get_class", class_id=class_id)),
        quota_exempt=principal.is_admin,
    )
    job_control.start_job(queue=queue, start=accepted.start)
    return answer_response(accepted.answer)


@router.get("", response_model=Page[ClassPublic], responses=problem_responses(400, 401, 422))
async def list_classes(
    request: Request,
    principal: CurrentPrincipal,
    limit: Limit = DEFAULT_LIMIT,
    cursor: Cursor = None,
) -> Response:
    """The caller's classes, newest first."""
    state = request.app.state
    return json_response(
        await classes.list_classes(
            reads=state.reads,
            principal=principal,
            limit=limit,
            cursor=cursor,
            default_model=state.settings.default_model,
        )
    )


@fast_read("/v1/classes")
async def list_classes_fast(read: ReadRequest) -> Response:
    return json_response(
        await classes.list_classes(
            reads=read.state.reads,
            principal=read.principal,
            limit=read.query_int("limit", default=DEFAULT_LIMIT, ge=1, le=MAX_LIMIT),
            cursor=read.query_str("cursor"),
            default_model=read.state.settings.default_model,
        )
    )


@router.get("/{class_id}", response_model=ClassPublic, responses=problem_responses(401, 404, 422))
async def get_class(request: Request, principal: CurrentPrincipal, class_id: uuid.UUID) -> Response:
    """A class, with the state of its synthesis job."""
    state = request.app.state
    return json_response(
        await classes.get_class(
            reads=state.reads,
            principal=principal,
            class_id=class_id,
            default_model=state.settings.default_model,
        )
    )


@fast_read("/v1/classes/{class_id}")
async def get_class_fast(read: ReadRequest) -> Response:
    return json_response(
        await classes.get_class(
            reads=read.state.reads,
            principal=read.principal,
            class_id=read.path_uuid("class_id"),
            default_model=read.state.settings.default_model,
        )
    )


@router.delete(
    "/{class_id}",
    status_code=204,
    response_class=Response,
    responses=problem_responses(401, 404, 422),
)
def delete_class(
    session: SessionDep, storage: StorageDep, principal: CurrentPrincipal, class_id: uuid.UUID
) -> Response:
    """Delete a class, its shots, samples and blobs; its job, if active, is cancelled."""
    classes.delete_class(session=session, storage=storage, principal=principal, class_id=class_id)
    return Response(status_code=204)


@router.get(
    "/{class_id}/embedding",
    response_class=Response,
    responses={
        200: {
            "description": "The learned token as safetensors (diffusers' "
            "`load_textual_inversion` loads it).",
            "content": {"application/octet-stream": {}},
        },
        **problem_responses(401, 404, 409, 422),
    },
)
def get_class_embedding(
    session: SessionDep, storage: StorageDep, principal: CurrentPrincipal, class_id: uuid.UUID
) -> Response:
    """Download the class's learned embedding; 409 until its inversion stage has finished."""
    key, filename = classes.embedding_blob(session=session, principal=principal, class_id=class_id)
    return blob_response(
        storage,
        key,
        media_type="application/octet-stream",
        filename=filename,
        disposition="attachment",
    )


@router.get(
    "/{class_id}/report", response_model=ClassReport, responses=problem_responses(401, 404, 422)
)
def get_class_report(
    session: SessionDep, principal: CurrentPrincipal, class_id: uuid.UUID
) -> ClassReport:
    """A class's report: its finished samples counted by prompt kind, mask source and verdict,
    histograms of their scores (fixed bins), its acceptance thresholds and bg_lambda tuning,
    and the caller's trainings on it with their mIoU and baseline."""
    return reports.class_report(session=session, principal=principal, class_id=class_id)


def _read(upload: UploadFile) -> Upload:
    # NOTE: the body is already parsed (spooled to disk past 1 MB) and capped by the body size
    # limit, so reading a whole file here is bounded.
    return Upload(filename=upload.filename or "", data=upload.file.read())
