"""Database engine and sessions, and the database's clock."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import Engine, create_engine, event, make_url, select
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.ext.compiler import compiles
from sqlalchemy.orm import Session, sessionmaker
from sqlalchemy.sql.expression import ColumnElement
from sqlalchemy.sql.visitors import InternalTraversal

from service.models import UTCDateTime

log = logging.getLogger(__name__)


class DatabaseNow(ColumnElement[datetime]):
    """SQL: the database's current time, plus `seconds` (negative: before now).

    Every lease, heartbeat, sweep cutoff and grace period is computed from this one clock,
    never from the clock of the process that writes or reads it: workers on other machines
    may run minutes or hours off (no NTP, a VM resumed from suspend), the database is one.
    PostgreSQL's `now()` is its transaction's start (transactions here last milliseconds);
    SQLite's is the machine's (an embedded database is on the machine of every process that
    opens it), written in the very text format SQLAlchemy stores its datetimes in, at the
    millisecond, so that comparisons with stored values are right as text."""

    type = UTCDateTime()
    inherit_cache = True
    # The offset is part of the statement's cache key: it is rendered into the SQL.
    _traverse_internals = [("seconds", InternalTraversal.dp_plain_obj)]  # noqa: RUF012

    def __init__(self, seconds: float = 0.0) -> None:
        self.seconds = float(seconds)


def db_now(offset: timedelta | float = 0.0) -> DatabaseNow:
    """SQL: the database's now, plus `offset` (a timedelta or seconds; negative: earlier)."""
    seconds = offset.total_seconds() if isinstance(offset, timedelta) else float(offset)
    return DatabaseNow(seconds)


def database_now(session: Session) -> datetime:
    """The database's current time, read once (for comparisons made outside SQL: the blob
    store's timestamps)."""
    now = session.scalar(select(db_now()))
    if now is None:
        raise RuntimeError("the database did not tell its time")
    return now


@compiles(DatabaseNow, "postgresql")
def _postgresql_now(element: DatabaseNow, compiler: Any, **kw: Any) -> str:
    if not element.seconds:
        return "now()"
    return f"(now() + interval '{element.seconds:.6f} seconds')"


@compiles(DatabaseNow, "sqlite")
def _sqlite_now(element: DatabaseNow, compiler: Any, **kw: Any) -> str:
    # NOTE: SQLAlchemy stores a datetime on SQLite as 'YYYY-MM-DD HH:MM:SS.ffffff' (UTC here);
    # CURRENT_TIMESTAMP is 'YYYY-MM-DD HH:MM:SS' (whole seconds), which sorts before every
    # stored value of the same second. %f is 'SS.SSS': three zeros make it six digits.
    return f"strftime('%Y-%m-%d %H:%M:%f000', 'now', '{element.seconds:+.6f} seconds')"


@compiles(DatabaseNow)
def _standard_now(element: DatabaseNow, compiler: Any, **kw: Any) -> str:
    if not element.seconds:
        return "CURRENT_TIMESTAMP"
    return f"(CURRENT_TIMESTAMP + INTERVAL '{element.seconds:.6f}' SECOND)"


# PostgreSQL connections give up on a server they cannot reach rather than wait for the
# kernel (a connect whose packets are dropped waits ~2 minutes, a query ~15): the API answers
# 503 instead of holding its threads. Seconds: to connect; for data sent and not acknowledged
# (TCP_USER_TIMEOUT), which also ends keepalive probes unanswered that long; idle before the
# first probe; to wait for a connection from a full pool. A database URL's own query
# parameters of these names (`?connect_timeout=…&tcp_user_timeout=…`, libpq's) win.
CONNECT_TIMEOUT_SECONDS = 5
TCP_TIMEOUT_SECONDS = 10
KEEPALIVE_IDLE_SECONDS = 10
POOL_TIMEOUT_SECONDS = 10


def postgresql_timeouts(url: str) -> dict[str, Any]:
    """libpq's connection parameters that bound how long a lost server is waited for."""
    bounds: dict[str, Any] = {
        "connect_timeout": CONNECT_TIMEOUT_SECONDS,
        "tcp_user_timeout": TCP_TIMEOUT_SECONDS * 1000,
        "keepalives": 1,
        "keepalives_idle": KEEPALIVE_IDLE_SECONDS,
        "keepalives_interval": max(1, KEEPALIVE_IDLE_SECONDS // 3),
        "keepalives_count": 3,
    }
    given = make_url(url).query
    return {name: value for name, value in bounds.items() if name not in given}


def make_engine(
    url: str, *, pool_size: int = 32, idle_in_transaction_timeout: float | None = None
) -> Engine:
    """An engine for `url`; SQLite gets WAL and foreign keys (Postgres has both natively).

    `pool_size` should cover the requests one process serves at once (the API's thread pool):
    connections beyond it are opened and closed per checkout, which costs more than the query.
    `idle_in_transaction_timeout` (seconds; PostgreSQL): the server ends a session left idle
    inside a transaction that long, so that the row locks of a process cut off from it, or
    paused, mid-transaction do not hold up the workers that take its job over.
    PostgreSQL connections are bounded in time (`CONNECT_TIMEOUT_SECONDS` and below): a
    server cut off fails the statements sent to it with OperationalError (answered 503).
    """
    if url.startswith("sqlite"):
        engine = create_engine(url, connect_args={"check_same_thread": False, "timeout": 30})

        @event.listens_for(engine, "connect")
        def _sqlite_pragmas(connection, _record):  # type: ignore[no-untyped-def]
            cursor = connection.cursor()
            cursor.execute("PRAGMA foreign_keys=ON")
            cursor.execute("PRAGMA journal_mode=WAL")
            cursor.execute("PRAGMA busy_timeout=30000")
            cursor.close()

        return engine
    # NOTE: no pre-ping (a round trip per checkout). A connection that died with its server
    # fails its request once with OperationalError (answered 503); SQLAlchemy then discards
    # the whole pool and the next requests reconnect by themselves.
    connect_args: dict[str, Any] = {}
    if url.startswith("postgresql"):
        connect_args.update(postgresql_timeouts(url))
        if idle_in_transaction_timeout is not None:
            milliseconds = max(1, int(idle_in_transaction_timeout * 1000))
            connect_args["options"] = f"-c idle_in_transaction_session_timeout={milliseconds}"
    return create_engine(
        url,
        pool_size=pool_size,
        max_overflow=8,
        pool_recycle=1800,
        pool_timeout=POOL_TIMEOUT_SECONDS,
        connect_args=connect_args,
    )


def close_session(session: Session) -> None:
    """Close a request's session once its answer is on its way. A connection the database
    dropped meanwhile (it restarted) fails the closing ROLLBACK: it is discarded and logged,
    never raised into a response that has already started."""
    try:
        session.close()
    except SQLAlchemyError as error:
        log.warning("discarding a database connection that failed to close: %s", error)
        with suppress(SQLAlchemyError):
            session.invalidate()


def read_only(engine: Engine) -> Engine:
    """`engine` (the same pool) with its connections in autocommit: each query is a round trip
    of its own, without the BEGIN before it and the ROLLBACK that closes the session after,
    which tripled the round trips of a one-query read. Only for sessions that never write:
    each statement would commit on its own."""
    return engine.execution_options(isolation_level="AUTOCOMMIT")


def make_session_factory(engine: Engine) -> sessionmaker[Session]:
    return sessionmaker(engine, expire_on_commit=False)


@contextmanager
def session_scope(factory: sessionmaker[Session]) -> Iterator[Session]:
    """A session that commits on success and rolls back on error."""
    session = factory()
    try:
        yield session
        session.commit()
    except BaseException:
        session.rollback()
        raise
    finally:
        session.close()
