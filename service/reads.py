"""Hot reads: SQL compiled once, run on an async connection pool, rows as plain tuples.

The reads that users and tools poll (a class's samples, a class, the class and job lists, the
dashboard's jobs) go through a `ReadDatabase`, one per app. On PostgreSQL, inside the event
loop of the server that opened it (`open`, from the app's lifespan), a query runs on a psycopg
async pool: no hop to a worker thread, no ORM, no SQLAlchemy execution per request. Anywhere
else (SQLite, the embedded database; the per-request event loops of a test client; a server
whose pool did not open) the same statement runs on the SQLAlchemy engine in a worker thread.
Both give the same values: SQLAlchemy compiles the statement once per dialect, and its column
types' result processors run on the pool's rows too.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import psycopg
from anyio import to_thread
from psycopg_pool import AsyncConnectionPool, PoolTimeout
from sqlalchemy import ColumnElement, Engine, make_url, or_
from sqlalchemy.engine import Dialect
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import InstrumentedAttribute
from sqlalchemy.sql import Select

from service.db import POOL_TIMEOUT_SECONDS, postgresql_timeouts

log = logging.getLogger(__name__)

Row = tuple[Any, ...]
# A SELECT of any columns (the statements given to `ReadDatabase.rows`).
Query = Select[*tuple[Any, ...]]


class _Compiled:
    """A statement as the pool runs it: its SQL text in psycopg's `%(name)s` style, the values
    of its parameters that are not given per call, and one result processor per column (None
    where the driver's value is the one SQLAlchemy gives), known once the database has said
    the columns' types (the first time the statement runs)."""

    def __init__(self, statement: Query, dialect: Dialect) -> None:
        compiled = statement.compile(dialect=dialect)
        if "POSTCOMPILE" in compiled.string:
            raise ValueError(f"an IN list is rendered per call; use `one_of`: {compiled.string}")
        self.statement = statement
        self.dialect = dialect
        self.sql = compiled.string.encode()
        self.params = {
            name: bind.effective_value for name, bind in compiled.binds.items() if not bind.required
        }
        self.processors: tuple[Callable[[Any], Any] | None, ...] | None = None

    def process(self, rows: list[Row], cursor: psycopg.AsyncCursor[Any]) -> list[Row]:
        """The rows `cursor` fetched, as SQLAlchemy's result processors give them."""
        if self.processors is None:
            # (The column types are the same each time: read once.)
            type_codes = [column.type_code for column in cursor.description or ()]
            self.processors = tuple(
                column.type.dialect_impl(self.dialect).result_processor(self.dialect, type_code)
                for column, type_code in zip(
                    self.statement.selected_columns, type_codes, strict=True
                )
            )
        processors = self.processors
        if not any(processors):
            return rows
        return [
            tuple(
                value if processor is None else processor(value)
                for processor, value in zip(processors, row, strict=True)
            )
            for row in rows
        ]


class ReadDatabase:
    """Runs read-only SELECTs and returns their rows as tuples (see the module's docstring).

    `engine` is the app's engine in autocommit; `pool_size`, the pool's connections at most.
    Statements are compiled once each: build them once (module constants, or cached per
    variant) and pass their bind parameters' values by name.
    """

    def __init__(self, engine: Engine, *, pool_size: int) -> None:
        self.engine = engine
        self.pool_size = pool_size
        self._pool: AsyncConnectionPool | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._compiled: dict[int, _Compiled] = {}

    @property
    def pooled(self) -> bool:
        """Whether reads from the running event loop go to the async pool."""
        if self._pool is None:
            return False
        try:
            return asyncio.get_running_loop() is self._loop
        except RuntimeError:
            return False

    async def open(self) -> bool:
        """Open the async pool for this event loop (PostgreSQL only); False if it was not
        opened here: not PostgreSQL, or another event loop's pool is open (several test
        clients serving one app), whose opener closes it."""
        url = make_url(str(self.engine.url))
        if url.get_backend_name() != "postgresql" or self._pool is not None:
            return False
        conninfo = url.set(drivername="postgresql").render_as_string(hide_password=False)
        pool: AsyncConnectionPool = AsyncConnectionPool(
            conninfo,
            min_size=1,
            max_size=self.pool_size,
            timeout=POOL_TIMEOUT_SECONDS,
            kwargs={"autocommit": True, **postgresql_timeouts(str(self.engine.url))},
            configure=_utc_session,
            open=False,
        )
        # NOTE: no wait for the first connection: a server starts (and answers 503 on reads)
        # while its database is down, as the engine's pool lets it.
        await pool.open(wait=False)
        self._pool, self._loop = pool, asyncio.get_running_loop()
        return True

    async def close(self) -> None:
        pool, self._pool, self._loop = self._pool, None, None
        if pool is not None:
            await pool.close()

    async def rows(self, statement: Query, params: Mapping[str, Any]) -> list[Row]:
        """Every row of `statement`, its bind parameters named in `params`."""
        (found,) = await self.many([(statement, params)])
        return found

    async def many(self, reads: Sequence[tuple[Query, Mapping[str, Any]]]) -> list[list[Row]]:
        """The rows of each of several statements (with their parameters), read together: on
        the pool, on one connection in one round trip (psycopg's pipeline mode)."""
        if self.pooled:
            return await self._pooled_rows(reads)
        return await to_thread.run_sync(self._threaded_rows, reads)

    async def _pooled_rows(
        self, reads: Sequence[tuple[Query, Mapping[str, Any]]]
    ) -> list[list[Row]]:
        assert self._pool is not None
        batch = [
            (compiled, {**compiled.params, **params})
            for compiled, params in ((self._compiled_for(s), p) for s, p in reads)
        ]
        try:
            try:
                return await self._fetch(batch)
            except _StaleConnection:
                # The server went away since the connection was opened (a restart): the
                # pool's other idle connections are as dead. Renew them and read again (a
                # read is safe to repeat) rather than answer 503 once per stale connection.
                await self._pool.check()
                return await self._fetch(batch)
        except (_StaleConnection, psycopg.OperationalError, PoolTimeout) as error:
            # As the engine's errors are: the app answers 503 with Retry-After.
            compiled, values = batch[0]
            raise OperationalError(compiled.sql.decode(), values, error) from error

    async def _fetch(self, batch: list[tuple[_Compiled, dict[str, Any]]]) -> list[list[Row]]:
        assert self._pool is not None
        async with self._pool.connection() as connection:
            try:
                # Binary results: numbers, UUIDs and timestamps without parsing text.
                if len(batch) == 1:
                    ((compiled, values),) = batch
                    cursors = [await connection.execute(compiled.sql, values, binary=True)]
                else:
                    async with connection.pipeline():
                        cursors = [
                            await connection.execute(compiled.sql, values, binary=True)
                            for compiled, values in batch
                        ]
                return [
                    compiled.process(await cursor.fetchall(), cursor)
                    for (compiled, _), cursor in zip(batch, cursors, strict=True)
                ]
            except psycopg.OperationalError as error:
                if connection.broken:
                    raise _StaleConnection(str(error)) from error
                raise

    def _threaded_rows(self, reads: Sequence[tuple[Query, Mapping[str, Any]]]) -> list[list[Row]]:
        with self.engine.connect() as connection:
            return [
                [tuple(row) for row in connection.execute(statement, dict(params))]
                for statement, params in reads
            ]

    def _compiled_for(self, statement: Query) -> _Compiled:
        # NOTE: keyed by identity; the entry holds the statement, so the id is never reused.
        compiled = self._compiled.get(id(statement))
        if compiled is None:
            compiled = self._compiled[id(statement)] = _Compiled(statement, self.engine.dialect)
        return compiled


class _StaleConnection(Exception):
    """A pooled connection found closed by the server."""


async def _utc_session(connection: psycopg.AsyncConnection[Any]) -> None:
    # Timestamps come back in UTC whatever the server's TimeZone, as the API shows them.
    await connection.execute("SET TIME ZONE 'UTC'")


def one_of(
    column: ColumnElement[Any] | InstrumentedAttribute[Any], values: tuple[Any, ...]
) -> ColumnElement[bool]:
    """`column IN values` as a statement compiled once can hold it: SQLAlchemy renders an IN
    list per call (its values are not parameters of the compiled text)."""
    return or_(*(column == value for value in values))
