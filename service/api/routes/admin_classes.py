"""`/admin/classes`: every class, and a class's gallery: its shots and samples as thumbnails
with the mask overlaid, sorted and filtered by score, with a histogram of CLIP scores and the
class's report (`service.contexts.reports`); a sample's review (accept or reject) from it."""

from __future__ import annotations

import uuid
from typing import Annotated, Literal

from fastapi import Form, Query, Request, Response
from fastapi.responses import HTMLResponse, JSONResponse, RedirectResponse

from service.api.deps import SessionDep, SettingsDep, StorageDep
from service.api.responses import not_modified
from service.api.routes.admin_access import (
    ApiAdmin,
    CsrfField,
    CsrfHeader,
    NextField,
    PageAdmin,
    admin_router,
    render,
    require_csrf,
    wants_json,
)
from service.api.routes.samples import sample_urls
from service.contexts import dashboard, reports, review, thumbnails
from service.problems import Problem
from service.schemas import SampleReview
from service.web_sessions import safe_next

router = admin_router()

ThumbnailSize = Annotated[
    int, Query(description="The long side in pixels: 128 (grid) or 512 (large).")
]
# Thumbnails of finished samples never change, and only admins may see them.
THUMBNAIL_CACHE = "private, max-age=86400"


@router.get("/admin/classes", response_class=HTMLResponse, include_in_schema=False)
def admin_classes(
    request: Request,
    access: PageAdmin,
    session: SessionDep,
    settings: SettingsDep,
    limit: Annotated[int, Query(ge=1, le=1000)] = 200,
) -> HTMLResponse:
    """Every owner's classes, newest first, each linking to its gallery."""
    rows = dashboard.class_rows(session=session, limit=limit, default_model=settings.default_model)
    return render(request, "classes.html", {"classes": rows, "limit": limit}, access=access)


@router.get("/admin/classes/{class_id}", response_class=HTMLResponse, include_in_schema=False)
def admin_class_gallery(
    request: Request,
    access: PageAdmin,
    session: SessionDep,
    settings: SettingsDep,
    class_id: uuid.UUID,
    sort: Annotated[Literal["index", "clip_score", "ood_iou", "consensus_iou"], Query()] = "index",
    order: Annotated[Literal["asc", "desc"] | None, Query()] = None,
    accepted: Annotated[Literal["true", "false", ""] | None, Query()] = None,
    mask_source: Annotated[
        Literal["consensus", "pseudo_label", "human", ""] | None, Query()
    ] = None,
    prompt_kind: Annotated[Literal["inversion", "text", ""] | None, Query()] = None,
    page: Annotated[int, Query(ge=1)] = 1,
) -> HTMLResponse:
    """A class's shots and samples (scores sort best first unless `order` says otherwise) and
    its report: score histograms, accepted shares, rejections, tuning and trainings."""
    filters = dashboard.GalleryFilters(
        sort=sort,
        order=order or ("asc" if sort == "index" else "desc"),
        accepted=None if not accepted else accepted == "true",
        mask_source=mask_source or None,
        prompt_kind=prompt_kind or None,
        page=page,
    )
    found = dashboard.gallery(
        session=session, class_id=class_id, filters=filters, default_model=settings.default_model
    )
    report = reports.class_report(session=session, principal=access.principal, class_id=class_id)
    return render(
        request,
        "gallery.html",
        {
            "gallery": found,
            "report": dashboard.report_view(report),
            "filters": filters,
            "accepted": accepted or "",
            "sort_keys": dashboard.SORT_KEYS,
            "here": request.url.path + (f"?{request.url.query}" if request.url.query else ""),
        },
        access=access,
    )


@router.post("/admin/samples/{sample_id}/review", include_in_schema=False)
def admin_review_sample(
    request: Request,
    access: ApiAdmin,
    session: SessionDep,
    sample_id: uuid.UUID,
    accepted: Annotated[bool, Form()],
    csrf_token: CsrfField = None,
    csrf_header: CsrfHeader = None,
    next: NextField = None,
) -> Response:
    """Accept or reject any owner's finished sample (as `PATCH /v1/samples/{id}`). Asked for
    JSON (the gallery's script), it answers the sample, its tile's verdict and the class's
    accepted count; a plain form post goes back to the gallery."""
    require_csrf(request, access, csrf_token, csrf_header)
    reviewed = review.review_sample(
        session=session,
        principal=access.principal,
        sample_id=sample_id,
        review_in=SampleReview(accepted=accepted),
        urls=sample_urls(request),
    )
    if wants_json(request):
        return JSONResponse(dashboard.review_json(reviewed), headers={"Cache-Control": "no-store"})
    return RedirectResponse(safe_next(next), status_code=303)


@router.get("/admin/samples/{sample_id}/thumbnail", include_in_schema=False)
def admin_sample_thumbnail(
    request: Request,
    _: PageAdmin,
    session: SessionDep,
    storage: StorageDep,
    sample_id: uuid.UUID,
    size: ThumbnailSize = 128,
) -> Response:
    """A finished sample with its mask overlaid (JPEG), drawn once and then kept."""
    _check_size(size)
    found = thumbnails.sample_thumbnail(
        session=session, storage=storage, sample_id=sample_id, size=size
    )
    return _thumbnail_response(request, found)


@router.get("/admin/shots/{shot_id}/thumbnail", include_in_schema=False)
def admin_shot_thumbnail(
    request: Request,
    _: PageAdmin,
    session: SessionDep,
    storage: StorageDep,
    shot_id: uuid.UUID,
    size: ThumbnailSize = 128,
) -> Response:
    """A shot with its mask overlaid (JPEG), drawn once and then kept."""
    _check_size(size)
    found = thumbnails.shot_thumbnail(session=session, storage=storage, shot_id=shot_id, size=size)
    return _thumbnail_response(request, found)


def _check_size(size: int) -> None:
    if size not in thumbnails.SIZES:
        sizes = " or ".join(str(s) for s in thumbnails.SIZES)
        raise Problem(
            422,
            "the request is not valid",
            errors=[{"field": "size", "message": f"Input should be {sizes}"}],
        )


def _thumbnail_response(request: Request, found: thumbnails.Thumbnail) -> Response:
    headers = {"Cache-Control": THUMBNAIL_CACHE, "ETag": found.etag}
    if not_modified(request.headers.get("if-none-match"), found.etag):
        return Response(status_code=304, headers=headers)
    return Response(found.data, media_type=thumbnails.JPEG, headers=headers)
