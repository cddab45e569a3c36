"""The FastAPI application factory."""

from __future__ import annotations

import gc
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI

from aligndiff import __version__
from service.api.docs import install_docs
from service.api.fast_reads import FAST_READS, FastReads
from service.api.middleware import AuthenticateAndLimit, BodySizeLimit, RequestMetrics
from service.api.openapi import install_openapi, operation_id
from service.api.routes import api_router
from service.auth import PrincipalCache
from service.db import make_engine, make_session_factory, read_only
from service.metrics import Metrics
from service.problems import install_problem_handlers
from service.queue import TaskQueue
from service.ratelimit import make_rate_limits
from service.reads import ReadDatabase
from service.settings import Settings
from service.storage import Storage, make_storage
from service.web_sessions import install_sign_in_redirect


def create_app(
    settings: Settings | None = None,
    *,
    queue: TaskQueue | None = None,
    storage: Storage | None = None,
) -> FastAPI:
    """Build the app: settings, database, storage and task queue live on `app.state`."""
    settings = settings or Settings()
    app = FastAPI(
        title="AlignDiff",
        version=__version__,
        description="Few-shot image+mask shots in, a scored synthetic segmentation dataset out.",
        generate_unique_id_function=operation_id,
        # Served by `install_docs`, from this app: FastAPI's own pages need a CDN.
        docs_url=None,
        redoc_url=None,
        lifespan=_open_reads,
    )
    engine = make_engine(settings.resolved_database_url, pool_size=settings.database_pool_size)
    app.state.settings = settings
    app.state.principal_cache = PrincipalCache(settings.auth_cache_seconds)
    app.state.engine = engine
    app.state.session_factory = make_session_factory(engine)
    app.state.read_session_factory = make_session_factory(read_only(engine))
    app.state.reads = ReadDatabase(read_only(engine), pool_size=settings.read_pool_size)
    app.state.storage = storage or make_storage(
        settings.resolved_storage_url,
        endpoint_url=settings.s3_endpoint_url,
        region=settings.s3_region,
        public_endpoint_url=settings.s3_public_endpoint_url,
    )
    if queue is None:
        from service.queue import CeleryQueue
        from worker.celery_app import make_celery

        queue = CeleryQueue(make_celery(settings))
    app.state.queue = queue
    app.state.metrics = Metrics(app.state.read_session_factory)
    app.state.rate_limits = make_rate_limits(settings)
    install_problem_handlers(app)
    install_sign_in_redirect(app)
    app.include_router(api_router)
    install_openapi(app)
    install_docs(app)
    # The metrics middleware, added last, is the outermost: refused requests are counted too.
    # The hot reads are answered innermost: after the key, its rate limits and the metrics.
    app.state.fast_reads = True
    app.add_middleware(FastReads, routes=FAST_READS)
    app.add_middleware(BodySizeLimit, max_bytes=settings.max_upload_bytes)
    # Outside the body limit: an anonymous client learns nothing, not even the limit.
    app.add_middleware(
        AuthenticateAndLimit,
        principal_cache=app.state.principal_cache,
        session_factory=app.state.read_session_factory,  # a key lookup only reads
        rate_limits=app.state.rate_limits,
    )
    app.add_middleware(RequestMetrics, metrics=app.state.metrics, routes=app.router.routes)
    return app


@asynccontextmanager
async def _open_reads(app: FastAPI) -> AsyncIterator[None]:
    """A server's event loop reads through the async pool (`service.reads`)."""
    opened = await app.state.reads.open()
    # NOTE: what start-up made (modules, routes, models: most of the heap) is never garbage;
    # frozen, the collector stops walking it in every full collection, a pause of tens of
    # milliseconds that landed on whichever requests were in flight (the p99).
    gc.freeze()
    try:
        yield
    finally:
        if opened:
            await app.state.reads.close()
