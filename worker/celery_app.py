"""The Celery application, configured from the service settings."""

from __future__ import annotations

import socket
from typing import Any

from celery import Celery
from kombu import Queue

from service.queue import synthesis_queue
from service.settings import Settings
from worker.context import WorkerContext

TASK_MODULES = ["worker.tasks"]

# The queues every worker consumes: the jobs' tasks (training), and the predictions the API
# waits on, which get a queue of their own so that they are not served after every sampling
# chunk already queued. A worker also consumes its model's synthesis queue
# (`service.queue.synthesis_queue`): the senders name it, from the class's model.
JOBS_QUEUE = "aligndiff"
PREDICT_QUEUE = "aligndiff.predict"
PREDICT_TASK = "aligndiff.training.predict"
# How long a stored answer outlives its task when the API never read it (it gave up waiting).
RESULT_EXPIRES_SECONDS = 600


class AlignDiffCelery(Celery):
    """A Celery app that carries its worker context (`app.context`), so tasks reach settings,
    database, storage and models through the app that runs them, never a module global."""

    context: WorkerContext


def redis_timeouts(seconds: float) -> dict[str, Any]:
    """kombu's Redis transport options that bound every wait on the broker to `seconds`.

    NOTE: without them a send to a Redis whose packets are dropped (a partition) waits for
    the kernel to give up: minutes to connect, ~15 to answer. TCP_USER_TIMEOUT also discards
    a command left unacknowledged in a connection given up on, so that it cannot reach Redis
    after the partition heals, next to the send the sweeper makes again."""
    options: dict[str, Any] = {
        "socket_timeout": seconds,
        "socket_connect_timeout": seconds,
        "socket_keepalive": True,
    }
    if hasattr(socket, "TCP_USER_TIMEOUT"):  # Linux
        options["socket_keepalive_options"] = {socket.TCP_USER_TIMEOUT: int(seconds * 1000)}
    return options


def make_celery(settings: Settings, **context: Any) -> AlignDiffCelery:
    """A Celery app on the configured broker (Redis in production; a SQLite-backed kombu
    transport that needs no server in the embedded single-machine mode).

    Keyword arguments go to the app's `WorkerContext` (a queue, storage or models to use
    instead of building them). Sending tasks by name needs nothing from `worker.tasks`; a worker
    imports it at start.
    """
    broker = settings.resolved_broker_url
    if broker.startswith("sqla+"):
        if broker.startswith("sqla+sqlite"):
            settings.data_dir.mkdir(parents=True, exist_ok=True)
        # NOTE: kombu's SQLAlchemy transport hands its options to `create_engine`, so it gets
        # none of Redis's. It has no visibility timeout either: a task taken by a worker that
        # dies is gone, and the job resumes when a worker starts (see `worker.tasks`).
        transport_options: dict[str, Any] = (
            {"connect_args": {"timeout": 30}} if broker.startswith("sqla+sqlite") else {}
        )
    else:
        # NOTE: Redis hands an unacknowledged task to another worker after this many seconds,
        # so it must be longer than any task; a job's lease (`job_lease_seconds`, renewed
        # after every batch) is what tells a dead worker's job from a slow one.
        transport_options = {"visibility_timeout": settings.task_visibility_timeout}
        transport_options.update(redis_timeouts(settings.broker_socket_timeout_seconds))
    backend = settings.resolved_result_backend_url
    app = AlignDiffCelery("aligndiff", broker=broker, backend=backend, include=TASK_MODULES)
    if backend.startswith("db+sqlite"):
        app.conf.database_engine_options = {"connect_args": {"timeout": 30}}
    app.conf.update(
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        task_default_queue=JOBS_QUEUE,
        task_queues=[
            Queue(JOBS_QUEUE),
            Queue(PREDICT_QUEUE),
            Queue(synthesis_queue(settings.served_model)),
        ],
        task_routes={PREDICT_TASK: {"queue": PREDICT_QUEUE}},
        result_expires=RESULT_EXPIRES_SECONDS,
        broker_transport_options=transport_options,
        broker_connection_retry_on_startup=True,
        # A send that fails is tried once more, on a new connection, then raised: the API
        # answers (its job stays queued, `service.contexts.job_control.start_job`) within
        # about three `broker_socket_timeout_seconds`, never Celery's default of four tries.
        task_publish_retry_policy={
            "max_retries": 1,
            "interval_start": 0,
            "interval_step": 0.2,
            "interval_max": 0.2,
        },
        # Only the tasks the API waits on (predict) store a result.
        task_ignore_result=True,
        worker_hijack_root_logger=False,
    )
    app.context = WorkerContext(settings, celery_app=app, **context)
    return app
