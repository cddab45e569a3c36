"""`/admin`: the operators' dashboard (admin keys only): sign-in, the jobs page and its polling
endpoint, cancel and retry, a training's page; the class pages are in `admin_classes`, the keys
page in `admin_keys`, access in `admin_access`.

A browser signs in with an admin key and gets a session cookie (`service.web_sessions`); any
client may instead send `Authorization: Bearer <admin key>`.
"""

from __future__ import annotations

import uuid
from typing import Annotated, Any, Literal

from fastapi import Form, Query, Request, Response
from fastapi.responses import HTMLResponse, RedirectResponse

from service.api.deps import QueueDep, SessionDep, SettingsDep
from service.api.fast_reads import Deferred, ReadRequest, fast_read
from service.api.responses import (
    LastAnswers,
    answer_response,
    problem_responses,
    revalidated_json_response,
)
from service.api.routes import admin_classes, admin_keys
from service.api.routes.admin_access import (
    ApiAdmin,
    CsrfField,
    CsrfHeader,
    NextField,
    PageAdmin,
    admin_router,
    render,
    require_csrf,
    session_access,
    session_codec,
    wants_json,
)
from service.auth import authenticate
from service.contexts import dashboard, job_control
from service.dashboard import STATIC_DIR, STATIC_TYPES
from service.db import database_now
from service.problems import Problem, not_found
from service.web_sessions import (
    SESSION_COOKIE,
    SIGN_IN_COOKIE,
    clear_cookies,
    end_sessions,
    from_this_site,
    safe_next,
    set_session_cookie,
    set_sign_in_cookie,
)

MAX_JOBS_SHOWN = 1000
router = admin_router()


# --- signing in and out ----------------------------------------------------------------------


@router.get("/admin/sign-in", response_class=HTMLResponse, include_in_schema=False)
def sign_in_form(request: Request, settings: SettingsDep, next: str | None = None) -> Response:
    """The sign-in form: paste an admin key."""
    return _sign_in_page(request, settings, next_path=safe_next(next))


def _sign_in_page(
    request: Request,
    settings: Any,
    *,
    next_path: str,
    error: str | None = None,
    status_code: int = 200,
) -> Response:
    token, cookie = session_codec(request).sign_in_token()
    response = render(
        request,
        "sign_in.html",
        {"sign_in_token": token, "next": next_path, "error": error},
        status_code=status_code,
    )
    set_sign_in_cookie(response, cookie, settings)
    return response


@router.post("/admin/sign-in", include_in_schema=False)
def sign_in(
    request: Request,
    session: SessionDep,
    settings: SettingsDep,
    key: Annotated[str, Form(max_length=512)] = "",
    csrf_token: CsrfField = None,
    next: NextField = None,
) -> Response:
    """Exchange an admin key for a session cookie; a user key is refused."""
    codec = session_codec(request)
    if not from_this_site(request) or not codec.sign_in_token_matches(
        request.cookies.get(SIGN_IN_COOKIE), csrf_token
    ):
        raise Problem(403, "cross-site sign-in refused; open the sign-in page and try again")
    next_path = safe_next(next)
    try:
        principal = authenticate(session, f"Bearer {key.strip()}")
    except Problem:
        return _sign_in_page(
            request,
            settings,
            next_path=next_path,
            error="That is not a valid API key.",
            status_code=401,
        )
    if not principal.is_admin:
        return _sign_in_page(
            request,
            settings,
            next_path=next_path,
            error="That key is not an admin key: the dashboard is for admins.",
            status_code=403,
        )
    value, _ = codec.issue(principal.key_id, issued_at=database_now(session))
    response = RedirectResponse(next_path, status_code=303)
    clear_cookies(response, settings, names=(SIGN_IN_COOKIE,))
    set_session_cookie(response, value, settings)
    return response


@router.post("/admin/sign-out", include_in_schema=False)
def sign_out(
    request: Request,
    access: PageAdmin,
    session: SessionDep,
    settings: SettingsDep,
    csrf_token: CsrfField = None,
    csrf_header: CsrfHeader = None,
) -> Response:
    """End the key's dashboard sessions: this browser's cookie is removed, and it and every
    other cookie signed in with the key until now are refused from here on."""
    require_csrf(request, access, csrf_token, csrf_header)
    end_sessions(session, access.principal.key_id)
    session.commit()
    response = RedirectResponse("/admin/sign-in", status_code=303)
    clear_cookies(response, settings)
    return response


# --- jobs ----------------------------------------------------------------------------------

StatusFilter = Annotated[
    Literal["queued", "running", "succeeded", "failed", "cancelled", ""] | None,
    Query(description="Only jobs in this state (empty: all)."),
]
KindFilter = Annotated[
    Literal["synthesis", "training", ""] | None,
    Query(description="Only jobs of this kind (empty: all)."),
]
JobsLimit = Annotated[int, Query(ge=1, le=MAX_JOBS_SHOWN, description="Jobs shown.")]


async def _snapshot(
    state: Any, status: str | None, kind: str | None, limit: int
) -> dashboard.JobsSnapshot:
    return await dashboard.jobs_snapshot(
        reads=state.reads,
        status=status or None,
        kind=kind or None,
        limit=limit,
        heartbeat_seconds=state.settings.worker_heartbeat_seconds,
    )


# The jobs page's poll, encoded once per snapshot of its rows (per filters): the page polls
# every 2 s and its rows change far less often.
_POLLS = LastAnswers(size=8)


async def _jobs_poll(
    state: Any, status: str | None, kind: str | None, limit: int, if_none_match: str | None
) -> Response:
    status, kind = status or None, kind or None  # "": all
    snapshot = await _snapshot(state, status, kind, limit)
    served_models = tuple(state.settings.served_models)
    encoded = _POLLS.get(
        (status, kind, limit, served_models),
        snapshot,
        lambda: dashboard.overview_of(snapshot, served_models=served_models).to_json(),
    )
    # Kept by the browser for revalidation only, never reused unasked, never shared.
    return revalidated_json_response(
        if_none_match, encoded, headers={"Cache-Control": "private, no-cache"}
    )


@router.get(
    "/admin",
    response_class=HTMLResponse,
    responses={
        303: {"description": "A browser without a session: to the sign-in page."},
        **problem_responses(401, 403, 422),
    },
)
async def admin_dashboard(
    request: Request,
    access: PageAdmin,
    status: StatusFilter = None,
    kind: KindFilter = None,
    limit: JobsLimit = 100,
) -> HTMLResponse:
    """The admin dashboard (HTML): every job, the queue's depth and the workers online."""
    overview = dashboard.overview_of(
        await _snapshot(request.app.state, status, kind, limit),
        served_models=tuple(request.app.state.settings.served_models),
    )
    return render(
        request,
        "jobs.html",
        {
            "overview": overview,
            "status": status or "",
            "kind": kind or "",
            "limit": limit,
            "statuses": dashboard.JOB_STATUSES,
            "kinds": dashboard.JOB_KINDS,
        },
        access=access,
    )


@router.get("/admin/api/jobs", include_in_schema=False)
async def admin_jobs_json(
    request: Request,
    _: ApiAdmin,
    status: StatusFilter = None,
    kind: KindFilter = None,
    limit: JobsLimit = 100,
) -> Response:
    """What the jobs page polls: the queue, the workers online and the jobs. The same data
    has the same ETag (in every process), and a poll naming it is answered 304."""
    return await _jobs_poll(
        request.app.state, status, kind, limit, request.headers.get("if-none-match")
    )


# The filters' values, "" meaning all (`StatusFilter`, `KindFilter`).
_STATUS_CHOICES = frozenset(("", *dashboard.JOB_STATUSES))
_KIND_CHOICES = frozenset(("", *dashboard.JOB_KINDS))


@fast_read("/admin/api/jobs")
async def admin_jobs_json_fast(read: ReadRequest) -> Response:
    # The page's own poll: a signed-in session's cookie. A Bearer key (refused unless an
    # admin's) and a request without a valid session are FastAPI's to answer.
    if read.header(b"authorization") is not None:
        raise Deferred
    if await session_access(read.state, read.cookie(SESSION_COOKIE)) is None:
        raise Deferred
    return await _jobs_poll(
        read.state,
        read.query_choice("status", _STATUS_CHOICES),
        read.query_choice("kind", _KIND_CHOICES),
        read.query_int("limit", default=100, ge=1, le=MAX_JOBS_SHOWN),
        read.header(b"if-none-match"),
    )


def _after_action(request: Request, next_path: str | None, answer_body: Response) -> Response:
    if wants_json(request):
        return answer_body
    return RedirectResponse(safe_next(next_path), status_code=303)


@router.post("/admin/jobs/{job_id}/cancel", include_in_schema=False)
def admin_cancel_job(
    request: Request,
    access: ApiAdmin,
    session: SessionDep,
    job_id: uuid.UUID,
    csrf_token: CsrfField = None,
    csrf_header: CsrfHeader = None,
    next: NextField = None,
) -> Response:
    """Cancel any owner's job (as `POST /v1/jobs/{id}/cancel`)."""
    require_csrf(request, access, csrf_token, csrf_header)
    answer = job_control.cancel_job(
        session=session, principal=access.principal, job_id=job_id, idempotency_key=None
    )
    return _after_action(request, next, answer_response(answer))


@router.post("/admin/jobs/{job_id}/retry", include_in_schema=False)
def admin_retry_job(
    request: Request,
    access: ApiAdmin,
    session: SessionDep,
    queue: QueueDep,
    settings: SettingsDep,
    job_id: uuid.UUID,
    csrf_token: CsrfField = None,
    csrf_header: CsrfHeader = None,
    next: NextField = None,
) -> Response:
    """Queue any owner's failed or cancelled job again (as `POST /v1/jobs/{id}/retry`)."""
    require_csrf(request, access, csrf_token, csrf_header)
    accepted = job_control.retry_job(
        session=session,
        settings=settings,
        principal=access.principal,
        job_id=job_id,
        idempotency_key=None,
    )
    job_control.start_job(queue=queue, start=accepted.start)
    return _after_action(request, next, answer_response(accepted.answer))


# --- trainings -------------------------------------------------------------------------------


@router.get("/admin/trainings/{training_id}", response_class=HTMLResponse, include_in_schema=False)
def admin_training(
    request: Request, access: PageAdmin, session: SessionDep, training_id: uuid.UUID
) -> HTMLResponse:
    """Any owner's training: what it is measured on, its metrics per class and per fold, and
    the comparison with its baseline."""
    found = dashboard.training_page(session=session, training_id=training_id)
    return render(request, "training.html", {"training": found}, access=access)


# --- static files ----------------------------------------------------------------------------


@router.get("/admin/static/{name}", include_in_schema=False)
def admin_static(name: str) -> Response:
    """The dashboard's CSS and JavaScript (their URLs carry a version, so they are cached)."""
    path = STATIC_DIR / name
    if "/" in name or path.suffix not in STATIC_TYPES or not path.is_file():
        raise not_found("file")
    return Response(
        path.read_bytes(),
        media_type=STATIC_TYPES[path.suffix],
        headers={"Cache-Control": "public, max-age=31536000, immutable"},
    )


router.include_router(admin_classes.router)
router.include_router(admin_keys.router)
