"""The FastAPI application factory."""

from __future__ import annotations

from fastapi import FastAPI

from aligndiff import __version__
from service.db import make_engine, make_session_factory
from service.problems import install_problem_handlers
from service.queue import TaskQueue
from service.settings import Settings
from service.storage import Storage, make_storage


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
    )
    engine = make_engine(settings.resolved_database_url)
    app.state.settings = settings
    app.state.engine = engine
    app.state.session_factory = make_session_factory(engine)
    app.state.storage = storage or make_storage(
        settings.resolved_storage_url,
        endpoint_url=settings.s3_endpoint_url,
        region=settings.s3_region,
    )
    if queue is None:
        from service.queue import CeleryQueue
        from worker.celery_app import make_celery

        queue = CeleryQueue(make_celery(settings))
    app.state.queue = queue
    install_problem_handlers(app)
    return app
