"""The Celery application, configured from the service settings."""

from __future__ import annotations

from celery import Celery

from service.settings import Settings


def make_celery(settings: Settings) -> Celery:
    """A Celery app on the configured broker (Redis in production; a SQLite-backed kombu
    transport that needs no server in the embedded single-machine mode)."""
    broker = settings.resolved_broker_url
    if broker.startswith("sqla+sqlite"):
        settings.data_dir.mkdir(parents=True, exist_ok=True)
    app = Celery("aligndiff", broker=broker)
    app.conf.update(
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        task_default_queue="aligndiff",
        broker_transport_options={"visibility_timeout": settings.task_visibility_timeout},
        broker_connection_retry_on_startup=True,
        task_ignore_result=True,
        worker_hijack_root_logger=False,
    )
    return app
