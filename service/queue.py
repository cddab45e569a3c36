"""How the API hands work to workers: by task name, after the transaction commits; and, for
the little work it waits on (predict), by task name with a bounded wait for the answer."""

from __future__ import annotations

from contextlib import suppress
from typing import Any, Protocol

# A class's synthesis tasks go to its model's queue, which only the workers serving that model
# consume (`aligndiff worker --model NAME`); training and predictions need no diffusion model
# and keep the shared queues (`worker.celery_app`).
SYNTHESIS_QUEUE_PREFIX = "aligndiff.synthesis."


def synthesis_queue(model: str) -> str:
    """The queue of the synthesis tasks of the classes of deployment model `model`."""
    return SYNTHESIS_QUEUE_PREFIX + model


class TaskTimeout(Exception):
    """No worker answered in time (none free, or none consuming the task's queue)."""


class TaskUnavailable(Exception):
    """The task could not be sent: the broker is unreachable."""


class TaskFailed(Exception):
    """The worker ran the task and it raised; the message says what it raised."""


class TaskQueue(Protocol):
    def enqueue(self, task_name: str, *args: Any, queue: str | None = None) -> None: ...

    def call(self, task_name: str, *args: Any, timeout: float) -> Any: ...


class CeleryQueue:
    """Sends tasks by name, so the API process never imports the workers' code."""

    def __init__(self, celery_app: Any) -> None:
        self.celery_app = celery_app

    def enqueue(self, task_name: str, *args: Any, queue: str | None = None) -> None:
        """Send a task to `queue`, or to its route's (`worker.celery_app`) when None."""
        options: dict[str, Any] = {} if queue is None else {"queue": queue}
        # NOTE: nobody waits for a job task's result. Without `ignore_result`, every send also
        # subscribes to the result backend for its answer: one subscription per task, and, with
        # the broker's Redis down, a send held ~20 s by the backend's reconnects.
        self.celery_app.send_task(task_name, args=list(args), ignore_result=True, **options)

    def call(self, task_name: str, *args: Any, timeout: float) -> Any:
        """Send a task and return its result, waiting `timeout` seconds at most.

        Raises TaskUnavailable when the broker refuses it, TaskTimeout when no worker answered
        in time, TaskFailed when the task raised. A task no worker took within `timeout` expires
        unrun: nobody waits for its answer any more.
        """
        from celery.exceptions import TimeoutError as CeleryTimeout
        from kombu.exceptions import OperationalError

        try:
            result = self.celery_app.send_task(task_name, args=list(args), expires=timeout)
        except Exception as error:
            raise TaskUnavailable(f"{type(error).__name__}: {error}") from error
        unreachable = (
            OSError,
            OperationalError,
            *getattr(self.celery_app.backend, "connection_errors", ()),
        )
        try:
            # NOTE: `interval` paces the database result backend's polling; Redis's answers
            # arrive by pub/sub without polling.
            value = result.get(timeout=timeout, interval=0.05, propagate=False)
        except CeleryTimeout:
            raise TaskTimeout(f"no answer from a worker in {timeout:g} s") from None
        except unreachable as error:
            raise TaskUnavailable(f"{type(error).__name__}: {error}") from error
        else:
            if result.failed():
                # NOTE: `value` is what the task raised, re-created from its type's name
                # (Celery imports nothing for it), so the API needs none of the worker's
                # libraries to report it.
                raise TaskFailed(f"{type(value).__name__}: {value}")
            return value
        finally:
            # The answer is read (or no longer awaited): drop it from the backend now rather
            # than after `result_expires`; a backend that is down keeps it until then.
            with suppress(Exception):
                result.forget()

    def ping(self) -> None:
        """Raise unless the broker answers."""
        with self.celery_app.connection_for_write() as connection:
            connection.ensure_connection(max_retries=1, timeout=2)


class RecordingQueue:
    """A queue that only records (for API tests that run no worker): a task waited on is
    never answered."""

    def __init__(self) -> None:
        self.sent: list[tuple[str, tuple[Any, ...]]] = []
        # The queue each sent task was sent to (None: its route's), in the order of `sent`.
        self.queues: list[str | None] = []

    def enqueue(self, task_name: str, *args: Any, queue: str | None = None) -> None:
        self.sent.append((task_name, args))
        self.queues.append(queue)

    def call(self, task_name: str, *args: Any, timeout: float) -> Any:
        self.sent.append((task_name, args))
        self.queues.append(None)
        raise TaskTimeout("no worker runs this queue's tasks")

    def ping(self) -> None:
        return None
