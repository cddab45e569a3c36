"""`/admin/keys`: every owner's API keys; create one (its secret shown once, on the page that
answers the form) and revoke any (as `DELETE /v1/keys/{id}`)."""

from __future__ import annotations

import uuid
from typing import Annotated

from fastapi import Form, Query, Request, Response
from fastapi.responses import HTMLResponse, RedirectResponse
from pydantic import ValidationError
from sqlalchemy.orm import Session

from service.api.deps import PrincipalCacheDep, SessionDep
from service.api.routes.admin_access import (
    AdminAccess,
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
from service.contexts import dashboard, keys
from service.problems import Problem
from service.schemas import KeyCreate, KeyCreated
from service.web_sessions import safe_next

router = admin_router()

MAX_KEYS_SHOWN = 1000
MAX_OWNERS_OFFERED = 1000
KeysLimit = Annotated[int, Query(ge=1, le=MAX_KEYS_SHOWN, description="Keys shown.")]


def _keys_page(
    request: Request,
    access: AdminAccess,
    session: Session,
    *,
    limit: int = 200,
    created: KeyCreated | None = None,
    error: str | None = None,
    status_code: int = 200,
) -> HTMLResponse:
    return render(
        request,
        "keys.html",
        {
            "keys": dashboard.key_rows(session=session, limit=limit),
            "owners": keys.owner_names(session=session, limit=MAX_OWNERS_OFFERED),
            "own_key_id": str(access.principal.key_id),
            "created": created,
            "error": error,
        },
        access=access,
        status_code=status_code,
    )


@router.get("/admin/keys", response_class=HTMLResponse, include_in_schema=False)
def admin_keys(
    request: Request, access: PageAdmin, session: SessionDep, limit: KeysLimit = 200
) -> HTMLResponse:
    """Every owner's keys, newest first, with when each was last used and revoked."""
    return _keys_page(request, access, session, limit=limit)


@router.post("/admin/keys", response_class=HTMLResponse, include_in_schema=False)
def admin_create_key(
    request: Request,
    access: PageAdmin,
    session: SessionDep,
    name: Annotated[str, Form(max_length=1000)] = "",
    admin: Annotated[bool, Form()] = False,
    owner_id: Annotated[str, Form(max_length=100)] = "",
    csrf_token: CsrfField = None,
    csrf_header: CsrfHeader = None,
) -> HTMLResponse:
    """Create a key (as `POST /v1/keys`): the page that answers shows its secret, this once."""
    require_csrf(request, access, csrf_token, csrf_header)
    try:
        key_in = KeyCreate.model_validate(
            {"name": name, "admin": admin, "owner_id": owner_id or None}
        )
        created = keys.create_key(session=session, principal=access.principal, key_in=key_in)
    except ValidationError as invalid:
        fields = ", ".join(str(error["loc"][0]) for error in invalid.errors())
        message = f"The key was not created: check its {fields}."
        return _keys_page(request, access, session, error=message, status_code=422)
    except Problem as refused:
        message = f"The key was not created: {refused.detail}."
        if refused.errors:
            message = "The key was not created: " + "; ".join(
                f"{error['field']}: {error['message']}" for error in refused.errors
            )
        return _keys_page(request, access, session, error=message, status_code=refused.status)
    return _keys_page(request, access, session, created=created, status_code=201)


@router.post("/admin/keys/{key_id}/revoke", include_in_schema=False)
def admin_revoke_key(
    request: Request,
    access: ApiAdmin,
    session: SessionDep,
    cache: PrincipalCacheDep,
    key_id: uuid.UUID,
    csrf_token: CsrfField = None,
    csrf_header: CsrfHeader = None,
    next: NextField = None,
) -> Response:
    """Revoke any owner's key (as `DELETE /v1/keys/{id}`); revoking the key this session
    signed in with ends the session."""
    require_csrf(request, access, csrf_token, csrf_header)
    keys.revoke_key(session=session, principal=access.principal, key_id=key_id, cache=cache)
    if wants_json(request):
        return Response(status_code=204)
    return RedirectResponse(safe_next(next or "/admin/keys"), status_code=303)
