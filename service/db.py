"""Database engine and sessions."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager, suppress

from sqlalchemy import Engine, create_engine, event
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker

log = logging.getLogger(__name__)


def make_engine(url: str, *, pool_size: int = 32) -> Engine:
    """An engine for `url`; SQLite gets WAL and foreign keys (Postgres has both natively).

    `pool_size` should cover the requests one process serves at once (the API's thread pool):
    connections beyond it are opened and closed per checkout, which costs more than the query.
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
    return create_engine(url, pool_size=pool_size, max_overflow=8, pool_recycle=1800)


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
