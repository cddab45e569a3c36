"""Samples: a class's synthetic samples, and each sample's image and mask."""

from __future__ import annotations

import uuid
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Query, Request, Response
from sqlalchemy.orm import Session

from service.api.deps import CurrentPrincipal, Cursor, Limit, SessionDep, SettingsDep, StorageDep
from service.api.responses import PNG, blob_response, problem_responses
from service.auth import Principal
from service.contexts import samples
from service.pagination import DEFAULT_LIMIT
from service.schemas import Page, SamplePublic
from service.settings import Settings
from service.storage import Storage

router = APIRouter(tags=["samples"])

PNG_OR_REDIRECT: dict[int | str, dict[str, Any]] = {
    200: {"description": "The PNG.", "content": {PNG: {}}},
    307: {"description": "Redirect to a presigned URL, when blobs are in S3."},
}


@router.get(
    "/v1/classes/{class_id}/samples",
    response_model=Page[SamplePublic],
    responses=problem_responses(400, 401, 404, 422),
)
def list_samples(
    request: Request,
    session: SessionDep,
    principal: CurrentPrincipal,
    class_id: uuid.UUID,
    accepted: Annotated[
        bool | None, Query(description="Only samples that passed (or failed) the OOD filter.")
    ] = None,
    min_clip_score: Annotated[
        float | None, Query(ge=0, allow_inf_nan=False, description="Lowest CLIP score kept.")
    ] = None,
    limit: Limit = DEFAULT_LIMIT,
    cursor: Cursor = None,
) -> Response:
    """A class's finished samples, in index order."""
    # One route lookup per page, not two per sample: the URLs differ only in the id.
    marker = uuid.UUID(int=0)
    image_url = str(request.url_for("get_sample_image", sample_id=marker))
    mask_url = str(request.url_for("get_sample_mask", sample_id=marker))

    def urls(sample_id: uuid.UUID) -> tuple[str, str]:
        text = str(sample_id)
        return image_url.replace(str(marker), text), mask_url.replace(str(marker), text)

    page = samples.list_samples(
        session=session,
        principal=principal,
        class_id=class_id,
        accepted=accepted,
        min_clip_score=min_clip_score,
        limit=limit,
        cursor=cursor,
        urls=urls,
    )
    # NOTE: serialized straight by pydantic-core; FastAPI would validate all items again.
    return Response(page.model_dump_json(), media_type="application/json")


def _sample_png(
    which: Literal["image", "mask"],
    *,
    session: Session,
    storage: Storage,
    settings: Settings,
    principal: Principal,
    sample_id: uuid.UUID,
) -> Response:
    key, index = samples.sample_blob(
        session=session, principal=principal, sample_id=sample_id, which=which
    )
    suffix = "" if which == "image" else "-mask"
    return blob_response(
        storage,
        key,
        media_type=PNG,
        filename=f"sample-{index:05d}{suffix}.png",
        presign_seconds=settings.presign_seconds,
    )


@router.get(
    "/v1/samples/{sample_id}/image",
    response_class=Response,
    responses={**PNG_OR_REDIRECT, **problem_responses(401, 404, 422)},
)
def get_sample_image(
    session: SessionDep,
    storage: StorageDep,
    settings: SettingsDep,
    principal: CurrentPrincipal,
    sample_id: uuid.UUID,
) -> Response:
    """A sample's image (PNG)."""
    return _sample_png(
        "image", session=session, storage=storage, settings=settings, principal=principal,
        sample_id=sample_id,
    )  # fmt: skip


@router.get(
    "/v1/samples/{sample_id}/mask",
    response_class=Response,
    responses={**PNG_OR_REDIRECT, **problem_responses(401, 404, 422)},
)
def get_sample_mask(
    session: SessionDep,
    storage: StorageDep,
    settings: SettingsDep,
    principal: CurrentPrincipal,
    sample_id: uuid.UUID,
) -> Response:
    """A sample's final mask (PNG)."""
    return _sample_png(
        "mask", session=session, storage=storage, settings=settings, principal=principal,
        sample_id=sample_id,
    )  # fmt: skip
