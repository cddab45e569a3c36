"""How the API hands work to workers: by task name, after the transaction commits."""

from __future__ import annotations

from typing import Any, Protocol


class TaskQueue(Protocol):
    def enqueue(self, task_name: str, *args: Any) -> None: ...


class CeleryQueue:
    """Sends tasks by name, so the API process never imports the workers' code."""

    def __init__(self, celery_app: Any) -> None:
        self.celery_app = celery_app

    def enqueue(self, task_name: str, *args: Any) -> None:
        self.celery_app.send_task(task_name, args=list(args))

    def ping(self) -> None:
        """Raise unless the broker answers."""
        with self.celery_app.connection_for_write() as connection:
            connection.ensure_connection(max_retries=1, timeout=2)


class RecordingQueue:
    """A queue that only records (for API tests that run no worker)."""

    def __init__(self) -> None:
        self.sent: list[tuple[str, tuple[Any, ...]]] = []

    def enqueue(self, task_name: str, *args: Any) -> None:
        self.sent.append((task_name, args))

    def ping(self) -> None:
        return None
