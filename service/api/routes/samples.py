"""Samples: a class's synthetic samples, each sample's image and mask, and their review (a
person's verdict, a mask they drew)."""

from __future__ import annotations

import functools
import uuid
from typing import Annotated, Any, Literal

from anyio import to_thread
from fastapi import APIRouter, Depends, File, Query, Request, Response, UploadFile

from service.api.deps import (
    CurrentPrincipal,
    Cursor,
    Limit,
    SessionDep,
    SettingsDep,
    StorageDep,
    require_multipart,
)
from service.api.fast_reads import ReadRequest, fast_read
from service.api.responses import PNG, json_response, problem_responses, small_blob_response
from service.auth import Principal
from service.contexts import review, samples
from service.contexts.samples import SampleUrls
from service.contexts.uploads import Upload
from service.pagination import DEFAULT_LIMIT, MAX_LIMIT
from service.problems import refuse_unknown_fields
from service.schemas import Page, SamplePublic, SampleReview

router = APIRouter(tags=["samples"])

PNG_OR_REDIRECT: dict[int | str, dict[str, Any]] = {
    200: {"description": "The PNG.", "content": {PNG: {}}},
    307: {"description": "Redirect to a presigned URL, when blobs are in S3."},
}


SAMPLES_PATH = "/v1/classes/{class_id}/samples"
SAMPLE_IMAGE_PATH = "/v1/samples/{sample_id}/image"
SAMPLE_MASK_PATH = "/v1/samples/{sample_id}/mask"


@router.get(
    SAMPLES_PATH,
    response_model=Page[SamplePublic],
    responses=problem_responses(400, 401, 404, 422),
)
async def list_samples(
    request: Request,
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
    page = await samples.list_samples(
        reads=request.app.state.reads,
        principal=principal,
        class_id=class_id,
        accepted=accepted,
        min_clip_score=min_clip_score,
        limit=limit,
        cursor=cursor,
        urls=sample_urls(request),
    )
    return json_response(page)


@fast_read(SAMPLES_PATH)
async def list_samples_fast(read: ReadRequest) -> Response:
    page = await samples.list_samples(
        reads=read.state.reads,
        principal=read.principal,
        class_id=read.path_uuid("class_id"),
        accepted=read.query_bool("accepted"),
        min_clip_score=read.query_decimal("min_clip_score"),
        limit=read.query_int("limit", default=DEFAULT_LIMIT, ge=1, le=MAX_LIMIT),
        cursor=read.query_str("cursor"),
        urls=sample_urls_under(read.base_url),
    )
    return json_response(page)


def sample_urls(request: Request) -> SampleUrls:
    """The absolute URLs of a sample's image and mask, as this request reaches the API."""
    return sample_urls_under(str(request.base_url).rstrip("/"))


def sample_urls_under(base_url: str) -> SampleUrls:
    """The absolute URLs of a sample's image and mask, under `base_url` (the API's URL as the
    request reached it, no trailing slash)."""
    image_start, image_end = (base_url + SAMPLE_IMAGE_PATH).split("{sample_id}")
    mask_start, mask_end = (base_url + SAMPLE_MASK_PATH).split("{sample_id}")

    def urls(sample_id: uuid.UUID) -> tuple[str, str]:
        text = str(sample_id)
        return image_start + text + image_end, mask_start + text + mask_end

    return urls


async def sample_png(
    which: Literal["image", "mask"], *, state: Any, principal: Principal, sample_id: uuid.UUID
) -> Response:
    """A sample's image or mask: its key read without a worker thread, the blob in one."""
    key, index = await samples.sample_blob(
        reads=state.reads, principal=principal, sample_id=sample_id, which=which
    )
    suffix = "" if which == "image" else "-mask"
    return await to_thread.run_sync(
        functools.partial(
            small_blob_response,
            state.storage,
            key,
            media_type=PNG,
            filename=f"sample-{index:05d}{suffix}.png",
            presign_seconds=state.settings.presign_seconds,
        )
    )


@router.get(
    SAMPLE_IMAGE_PATH,
    response_class=Response,
    responses={**PNG_OR_REDIRECT, **problem_responses(401, 404, 422)},
)
async def get_sample_image(
    request: Request, principal: CurrentPrincipal, sample_id: uuid.UUID
) -> Response:
    """A sample's image (PNG)."""
    return await sample_png(
        "image", state=request.app.state, principal=principal, sample_id=sample_id
    )


@fast_read(SAMPLE_IMAGE_PATH)
async def get_sample_image_fast(read: ReadRequest) -> Response:
    return await sample_png(
        "image", state=read.state, principal=read.principal, sample_id=read.path_uuid("sample_id")
    )


@router.get(
    SAMPLE_MASK_PATH,
    response_class=Response,
    responses={**PNG_OR_REDIRECT, **problem_responses(401, 404, 422)},
)
async def get_sample_mask(
    request: Request, principal: CurrentPrincipal, sample_id: uuid.UUID
) -> Response:
    """A sample's final mask (PNG)."""
    return await sample_png(
        "mask", state=request.app.state, principal=principal, sample_id=sample_id
    )


@fast_read(SAMPLE_MASK_PATH)
async def get_sample_mask_fast(read: ReadRequest) -> Response:
    return await sample_png(
        "mask", state=read.state, principal=read.principal, sample_id=read.path_uuid("sample_id")
    )


@router.patch(
    "/v1/samples/{sample_id}",
    response_model=SamplePublic,
    responses=problem_responses(400, 401, 404, 422),
)
def review_sample(
    request: Request,
    session: SessionDep,
    principal: CurrentPrincipal,
    sample_id: uuid.UUID,
    review_in: SampleReview,
) -> SamplePublic:
    """Accept or reject a finished sample: a reviewer's verdict overrides the acceptance
    filters' (`accepted_by: user`; `rejected_by: user` when rejected) and sets `reviewed_at`.
    The class's `num_accepted`, its report, its `accepted_only` datasets and the trainings
    queued from then on follow it. A sample still being worked on, or of another owner's
    class, answers 404."""
    reviewed = review.review_sample(
        session=session,
        principal=principal,
        sample_id=sample_id,
        review_in=review_in,
        urls=sample_urls(request),
    )
    return reviewed.sample


async def mask_field_only(request: Request) -> None:
    # NOTE: FastAPI has parsed the form already; this reads Starlette's cached parse.
    refuse_unknown_fields((await request.form()).keys(), {review.MASK_FIELD})


@router.put(
    "/v1/samples/{sample_id}/mask",
    response_model=SamplePublic,
    dependencies=[Depends(require_multipart), Depends(mask_field_only)],
    responses=problem_responses(400, 401, 404, 413, 415, 422),
)
def replace_sample_mask(
    request: Request,
    session: SessionDep,
    storage: StorageDep,
    settings: SettingsDep,
    principal: CurrentPrincipal,
    sample_id: uuid.UUID,
    mask: Annotated[
        UploadFile,
        File(
            description="The new mask: a PNG of the sample's size with at least one "
            "foreground pixel (gray >= 128, or a palette index other than 0 and 255) and one "
            "background pixel, checked as a shot's mask is."
        ),
    ],
) -> SamplePublic:
    """Replace a finished sample's mask with one a person drew: the sample's `mask_source`
    becomes `human`, its `instances` are counted in the new mask, and `reviewed_at` is set;
    its verdict stays as it was. Datasets and trainings from then on use the new mask. A mask
    of another size, an empty or full one answers 422 (saying both sizes, for a size
    mismatch); a file that is not a PNG, 415."""
    # NOTE: the body is already parsed and capped by the body size limit.
    upload = Upload(filename=mask.filename or "", data=mask.file.read())
    return review.replace_mask(
        session=session,
        storage=storage,
        settings=settings,
        principal=principal,
        sample_id=sample_id,
        mask=upload,
        urls=sample_urls(request),
    )
