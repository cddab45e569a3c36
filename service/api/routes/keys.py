"""`/v1/keys`: the caller's API keys (an admin's: everyone's); create, list, revoke."""

from __future__ import annotations

import uuid

from fastapi import APIRouter, Response

from service.api.deps import CurrentPrincipal, Cursor, Limit, PrincipalCacheDep, SessionDep
from service.api.responses import problem_responses
from service.contexts import keys
from service.pagination import DEFAULT_LIMIT
from service.schemas import KeyCreate, KeyCreated, KeyPublic, Page

router = APIRouter(prefix="/v1/keys", tags=["keys"])


@router.post(
    "",
    status_code=201,
    response_model=KeyCreated,
    responses=problem_responses(400, 401, 403, 422),
)
def create_key(
    session: SessionDep, principal: CurrentPrincipal, key_in: KeyCreate, response: Response
) -> KeyCreated:
    """Create an API key; `key` is in this answer only (it is stored as a hash). A user key
    creates keys of its own owner (403 for another owner, or for `admin: true`); an admin key
    may name any owner, or none for a new owner named like the key.

    `Idempotency-Key` is not honoured here: a replay would have to return the secret, which
    the server does not keep. A create retried after a lost answer makes a second key; the
    first, whose secret nobody saw, is listed with `last_used_at` null and can be revoked.
    """
    # The answer holds a secret: no cache on the way may keep it.
    response.headers["Cache-Control"] = "no-store"
    return keys.create_key(session=session, principal=principal, key_in=key_in)


@router.get("", response_model=Page[KeyPublic], responses=problem_responses(400, 401, 422))
def list_keys(
    session: SessionDep,
    principal: CurrentPrincipal,
    limit: Limit = DEFAULT_LIMIT,
    cursor: Cursor = None,
) -> Page[KeyPublic]:
    """The keys of the caller's owner (an admin's: everyone's), revoked ones included, newest
    first. Never their secrets."""
    return keys.list_keys(session=session, principal=principal, limit=limit, cursor=cursor)


@router.delete("/{key_id}", status_code=204, responses=problem_responses(401, 404, 422))
def revoke_key(
    session: SessionDep, principal: CurrentPrincipal, cache: PrincipalCacheDep, key_id: uuid.UUID
) -> Response:
    """Revoke a key (the caller's own included): this process refuses it at once, every other
    within `ALIGNDIFF_AUTH_CACHE_SECONDS`, and its dashboard sessions end at once. Revoking a
    revoked key answers 204 too. Another owner's key answers 404."""
    keys.revoke_key(session=session, principal=principal, key_id=key_id, cache=cache)
    return Response(status_code=204)
