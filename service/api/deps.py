"""Request dependencies as `Annotated` aliases; tests swap them with dependency_overrides.

Dependencies that do no I/O are `async def`: FastAPI runs sync ones in the thread pool, a hop
per dependency per request.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Annotated

from fastapi import Depends, Header, Query, Request
from fastapi.concurrency import run_in_threadpool
from sqlalchemy.orm import Session, sessionmaker

from service.auth import Principal, authenticate, bearer_key, hash_key
from service.metrics import Metrics
from service.pagination import MAX_LIMIT
from service.problems import Problem
from service.queue import TaskQueue
from service.settings import Settings
from service.storage import Storage


async def get_settings(request: Request) -> Settings:
    return request.app.state.settings  # type: ignore[no-any-return]


def get_session(request: Request) -> Iterator[Session]:
    session = request.app.state.session_factory()
    try:
        yield session
    finally:
        session.close()


async def get_session_factory(request: Request) -> sessionmaker[Session]:
    """For work that outlives the request's session (a streamed response opens its own)."""
    return request.app.state.session_factory  # type: ignore[no-any-return]


async def get_storage(request: Request) -> Storage:
    return request.app.state.storage  # type: ignore[no-any-return]


async def get_queue(request: Request) -> TaskQueue:
    return request.app.state.queue  # type: ignore[no-any-return]


async def get_metrics(request: Request) -> Metrics:
    return request.app.state.metrics  # type: ignore[no-any-return]


SettingsDep = Annotated[Settings, Depends(get_settings)]
SessionDep = Annotated[Session, Depends(get_session)]
SessionFactoryDep = Annotated[sessionmaker[Session], Depends(get_session_factory)]
StorageDep = Annotated[Storage, Depends(get_storage)]
QueueDep = Annotated[TaskQueue, Depends(get_queue)]
MetricsDep = Annotated[Metrics, Depends(get_metrics)]

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
    # NOTE: async so that a recently verified key (the common case) costs no thread hop and no
    # query; only a cache miss goes to the database, in the thread pool.
    cache = request.app.state.principal_cache
    cached = cache.get(hash_key(bearer_key(authorization)))
    if cached is not None:
        return cached  # type: ignore[no-any-return]

    def verify() -> Principal:
        with request.app.state.session_factory() as session:
            return authenticate(session, authorization, cache)

    return await run_in_threadpool(verify)


CurrentPrincipal = Annotated[Principal, Depends(get_principal)]


def get_admin(principal: CurrentPrincipal) -> Principal:
    if not principal.is_admin:
        raise Problem(403, "an admin key is required")
    return principal


AdminPrincipal = Annotated[Principal, Depends(get_admin)]


def require_multipart(request: Request) -> None:
    """415 unless the body is multipart/form-data (uploads)."""
    if not request.headers.get("content-type", "").lower().startswith("multipart/form-data"):
        raise Problem(415, "send the request as multipart/form-data")
