"""The worker container's health check: exit 0 when a worker process of this container wrote
its heartbeat recently, else print why and exit 1.

A worker's heartbeat thread (`worker.heartbeat`) writes its row in `worker_heartbeats` every
`ALIGNDIFF_WORKER_HEARTBEAT_SECONDS`, named with this container's hostname, while a task runs
too. A broker ping would not do: the solo pool answers it only between tasks, and one task
(an inversion) can take minutes.
"""

from __future__ import annotations

import socket
import sys

from sqlalchemy import func, select
from sqlalchemy.exc import SQLAlchemyError

from service.db import db_now, make_engine
from service.models import WorkerHeartbeat
from service.settings import Settings

# A worker counts as alive for this many heartbeat intervals (the dashboard's "online" too).
ONLINE_INTERVALS = 3


def check(settings: Settings, hostname: str) -> str | None:
    """Why the worker on `hostname` is not healthy, or None when it is."""
    engine = make_engine(settings.resolved_database_url, pool_size=1)
    try:
        with engine.connect() as connection:
            # NOTE: the age by the database's clock, the one heartbeats are written in: this
            # container's clock may run off.
            last_seen, now = connection.execute(
                select(func.max(WorkerHeartbeat.last_seen_at), db_now()).where(
                    WorkerHeartbeat.hostname == hostname
                )
            ).one()
    except SQLAlchemyError as error:
        return f"cannot read the heartbeats: {error}"
    finally:
        engine.dispose()
    if last_seen is None:
        return f"no worker on {hostname} has written a heartbeat"
    age = (now - last_seen).total_seconds()
    limit = ONLINE_INTERVALS * settings.worker_heartbeat_seconds
    if age > limit:
        return f"the last heartbeat on {hostname} is {age:.0f} s old (limit {limit:.0f} s)"
    return None


def main() -> int:
    problem = check(Settings(), socket.gethostname())
    if problem is not None:
        print(f"unhealthy: {problem}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
