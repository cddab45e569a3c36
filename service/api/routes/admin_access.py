"""What every dashboard route needs: who the admin is (a Bearer admin key or a session cookie),
CSRF checks for state changes, and rendering a page with the dashboard's security headers.

A user key is refused (403) on every dashboard route. Without credentials, a browser asking
for a page is sent to the sign-in form; everyone else gets 401 (`service.web_sessions`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Form, Header, Request
from fastapi.responses import HTMLResponse

from service.api.deps import get_principal
from service.auth import Principal
from service.dashboard import templates
from service.problems import Problem
from service.web_sessions import (
    CSRF_FIELD,
    CSRF_HEADER,
    SESSION_COOKIE,
    SessionCodec,
    SignInRequired,
    check_csrf,
    codec_for,
    session_principal,
)

# Pages are never cached and never framed; scripts and styles come from this site only.
PAGE_HEADERS = {
    "Cache-Control": "no-store",
    "Content-Security-Policy": "default-src 'self'; img-src 'self' data:; style-src 'self'; "
    "script-src 'self'; frame-ancestors 'none'; form-action 'self'; base-uri 'none'",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "same-origin",
    "X-Content-Type-Options": "nosniff",
}


async def refuse_user_keys(request: Request) -> None:
    """Every dashboard route: a Bearer key, when sent, must be a valid admin key."""
    authorization = request.headers.get("authorization")
    if authorization is not None:
        principal = await get_principal(request, authorization)
        if not principal.is_admin:
            raise Problem(403, "an admin key is required")


def admin_router() -> APIRouter:
    """A router of dashboard routes: each refuses user keys."""
    return APIRouter(tags=["admin"], dependencies=[Depends(refuse_user_keys)])


@dataclass(frozen=True)
class AdminAccess:
    """An admin on the dashboard; `csrf_token` is the session's (None for a Bearer key, which
    a third-party page cannot make a browser send)."""

    principal: Principal
    csrf_token: str | None


def session_codec(request: Request) -> SessionCodec:
    return session_codec_of(request.app.state)


def session_codec_of(state: Any) -> SessionCodec:
    """The app's cookie signer (its `state`), made on first use."""
    codec = getattr(state, "session_codec", None)
    if codec is None:
        codec = codec_for(state.settings)
        state.session_codec = codec
    return codec  # type: ignore[no-any-return]


async def _access(request: Request, *, page: bool) -> AdminAccess:
    authorization = request.headers.get("authorization")
    if authorization is not None:
        # `refuse_user_keys` has checked it is an admin key.
        return AdminAccess(await get_principal(request, authorization), csrf_token=None)
    access = await session_access(request.app.state, request.cookies.get(SESSION_COOKIE))
    if access is None:
        raise SignInRequired(page=page)
    return access


async def session_access(state: Any, cookie: str | None) -> AdminAccess | None:
    """The admin signed in with the session cookie `cookie` (the app's `state`), if any."""
    web_session = session_codec_of(state).read(cookie)
    if web_session is None:
        return None
    # NOTE: the key is looked up on every request (no cache), so revoking it ends its
    # sessions at once.
    principal = await session_principal(state.reads, state.engine, web_session)
    if principal is None:
        return None
    return AdminAccess(principal, csrf_token=web_session.csrf_token)


async def page_access(request: Request) -> AdminAccess:
    return await _access(request, page=True)


async def api_access(request: Request) -> AdminAccess:
    return await _access(request, page=False)


PageAdmin = Annotated[AdminAccess, Depends(page_access)]
ApiAdmin = Annotated[AdminAccess, Depends(api_access)]
CsrfField = Annotated[str | None, Form(alias=CSRF_FIELD)]
CsrfHeader = Annotated[str | None, Header(alias=CSRF_HEADER)]
NextField = Annotated[str | None, Form(alias="next")]


def require_csrf(
    request: Request, access: AdminAccess, field: str | None, header: str | None
) -> None:
    """A state change through a session cookie must carry the session's token and come from
    this site; one made with a Bearer key needs neither."""
    if access.csrf_token is not None:
        check_csrf(request, access.csrf_token, header or field)


def render(
    request: Request,
    template: str,
    context: dict[str, Any],
    *,
    access: AdminAccess | None = None,
    status_code: int = 200,
) -> HTMLResponse:
    """A page with the dashboard's security headers."""
    values = {"csrf_token": access.csrf_token if access else None, "csrf_field": CSRF_FIELD}
    response = templates.TemplateResponse(
        request, template, {**values, **context}, status_code=status_code
    )
    response.headers.update(PAGE_HEADERS)
    return response


def wants_json(request: Request) -> bool:
    return "application/json" in request.headers.get("accept", "")
