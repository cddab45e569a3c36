"""Request dependencies as `Annotated` aliases; tests swap them with dependency_overrides.

Dependencies that do no I/O are `async def`: FastAPI runs sync ones in the thread pool, a hop
per dependency per request.
"""

from __future__ import annotations

import hmac
from collections.abc import Iterator
from typing import Annotated

from fastapi import Depends, Header, Query, Request
from sqlalchemy.orm import Session, sessionmaker

from service.auth import Principal, PrincipalCache, authenticate_cached
from service.db import close_session
from service.metrics import Metrics
from service.pagination import MAX_LIMIT
from service.problems import Problem
from service.queue import TaskQueue
from service.settings import Settings
from service.storage import Storage


async def get_settings(request: Request) -> Settings:
    return request.app.state.settings  # type: ignore[no-any-return]


READ_METHODS = frozenset({"GET", "HEAD"})


def get_session(request: Request) -> Iterator[Session]:
    """The request's session. GET and HEAD requests, which never write, get one in autocommit
    (`service.db.read_only`): a page is one round trip to the database instead of three."""
    if request.method in READ_METHODS:
        session = request.app.state.read_session_factory()
    else:
        session = request.app.state.session_factory()
    try:
        yield session
    finally:
        close_session(session)


async def get_session_factory(request: Request) -> sessionmaker[Session]:
    """For work that outlives the request's session (a streamed response opens its own)."""
    return request.app.state.session_factory  # type: ignore[no-any-return]


async def get_storage(request: Request) -> Storage:
    return request.app.state.storage  # type: ignore[no-any-return]


async def get_queue(request: Request) -> TaskQueue:
    return request.app.state.queue  # type: ignore[no-any-return]


async def get_metrics(request: Request) -> Metrics:
    return request.app.state.metrics  # type: ignore[no-any-return]


async def get_principal_cache(request: Request) -> PrincipalCache:
    """This process's recently verified keys (a revoked key is dropped from it at once)."""
    return request.app.state.principal_cache  # type: ignore[no-any-return]


SettingsDep = Annotated[Settings, Depends(get_settings)]
SessionDep = Annotated[Session, Depends(get_session)]
SessionFactoryDep = Annotated[sessionmaker[Session], Depends(get_session_factory)]
StorageDep = Annotated[Storage, Depends(get_storage)]
QueueDep = Annotated[TaskQueue, Depends(get_queue)]
MetricsDep = Annotated[Metrics, Depends(get_metrics)]
PrincipalCacheDep = Annotated[PrincipalCache, Depends(get_principal_cache)]

# Query and header parameters shared by several routes.
Limit = Annotated[int, Query(ge=1, le=MAX_LIMIT, description="Page size.")]
Cursor = Annotated[
    str | None, Query(description="The `next_cursor` of the previous page (opaque).")
]
IdempotencyKey = Annotated[
    str | None,
    Header(
        alias="Idempotency-Key",
        min_length=1,
        max_length=255,
        description="Send the same key with the same request to get the first answer again "
        "instead of doing the work twice (e.g. when retrying after a timeout).",
    ),
]


async def get_principal(
    request: Request, authorization: Annotated[str | None, Header()] = None
) -> Principal:
    # NOTE: /v1 requests were authenticated by the `AuthenticateAndLimit` middleware, before
    # their body was read; the principal it found is reused, never looked up twice.
    principal = getattr(request.state, "principal", None)
    if isinstance(principal, Principal):
        return principal
    return await authenticate_cached(
        authorization, request.app.state.principal_cache, request.app.state.read_session_factory
    )


CurrentPrincipal = Annotated[Principal, Depends(get_principal)]


def get_admin(principal: CurrentPrincipal) -> Principal:
    if not principal.is_admin:
        raise Problem(403, "an admin key is required")
    return principal


AdminPrincipal = Annotated[Principal, Depends(get_admin)]


async def require_metrics_token(request: Request) -> None:
    """401 unless the request bears the metrics token, when the settings set one."""
    token = request.app.state.settings.metrics_token
    if token is None:
        return
    expected = f"Bearer {token.get_secret_value()}".encode()
    if not hmac.compare_digest(request.headers.get("authorization", "").encode(), expected):
        raise Problem(
            401,
            "the metrics need their token: Authorization: Bearer <metrics token>",
            headers={"WWW-Authenticate": "Bearer"},
        )


def require_multipart(request: Request) -> None:
    """415 unless the body is multipart/form-data (uploads)."""
    if not request.headers.get("content-type", "").lower().startswith("multipart/form-data"):
        raise Problem(415, "send the request as multipart/form-data")
