"""Readiness: whether the database, the broker and the blob store answer."""

from __future__ import annotations

import logging
from collections.abc import Callable

from sqlalchemy import text
from sqlalchemy.orm import Session

from service.problems import Problem
from service.queue import TaskQueue
from service.schemas import Readiness
from service.storage import Storage

log = logging.getLogger(__name__)


def readiness(*, session: Session, queue: TaskQueue, storage: Storage) -> Readiness:
    """Check each dependency; 503 naming every one that failed."""
    checks: dict[str, str] = {}
    errors: list[dict[str, str]] = []

    def check(name: str, probe: Callable[[], object]) -> None:
        try:
            probe()
        except Exception as error:
            log.warning("readiness: %s failed: %s", name, error)
            checks[name] = "failed"
            errors.append({"field": name, "message": f"{type(error).__name__}: {error}"})
        else:
            checks[name] = "ok"

    check("database", lambda: session.execute(text("SELECT 1")))
    # A queue without `ping` (one that needs no broker) has nothing to check.
    ping = getattr(queue, "ping", None)
    if ping is not None:
        check("broker", ping)
    check("storage", storage.check)
    if errors:
        failed = ", ".join(e["field"] for e in errors)
        raise Problem(503, f"not ready: {failed} unavailable", errors=errors)
    return Readiness(checks=checks)
