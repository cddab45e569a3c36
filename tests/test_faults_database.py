"""PostgreSQL goes away and comes back: the API answers 503 (never 500) meanwhile, and serves
again by itself, stale pooled connections included. A private cluster is stopped and
restarted; the machine's shared server is never touched."""

from __future__ import annotations

import asyncio
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import func, literal_column, select

from service.app import create_app
from service.auth import create_key
from service.db import make_engine
from service.models import Base
from service.queue import RecordingQueue
from service.reads import ReadDatabase
from service.settings import Settings
from tests.fault_support import PrivatePostgres, ServedApi, wait_until

READERS = 6


@pytest.fixture
def served(tmp_path: Path) -> Iterator[tuple[PrivatePostgres, ServedApi, str]]:
    """The API on a private PostgreSQL over real HTTP, and an API key."""
    with PrivatePostgres.running() as postgres:
        engine = make_engine(postgres.url)
        Base.metadata.create_all(engine)
        engine.dispose()
        settings = Settings(
            data_dir=tmp_path,
            database_url=postgres.url,
            storage_url=f"file://{tmp_path / 'blobs'}",
            # Keys are checked against the database on every request, so each one needs it.
            auth_cache_seconds=0,
            rate_limit_per_second=0,
            rate_limit_url="memory://",
        )
        app = create_app(settings, queue=RecordingQueue())
        with app.state.session_factory() as session:
            key = create_key(session, name="reader", admin=False)
            session.commit()
        with ServedApi.serving(app) as api:
            yield postgres, api, key
        app.state.engine.dispose()


class Readers:
    """Threads listing classes without pause, recording each answer's status and time."""

    def __init__(self, api: ServedApi, key: str) -> None:
        self.answers: list[tuple[float, int]] = []
        self.errors: list[str] = []
        self._stop = threading.Event()
        self._threads = [
            threading.Thread(target=self._read, args=(api.client(key, timeout=20),), daemon=True)
            for _ in range(READERS)
        ]
        for thread in self._threads:
            thread.start()

    def _read(self, client: httpx.Client) -> None:
        with client:
            while not self._stop.is_set():
                try:
                    status = client.get("/v1/classes").status_code
                except httpx.TransportError as error:
                    # NOTE: no HTTP answer at all (a connection reset, say): recorded as 0
                    self.errors.append(f"{time.monotonic():.2f} {error!r}")
                    status = 0
                self.answers.append((time.monotonic(), status))
                time.sleep(0.01)

    def since(self, moment: float) -> Counter[int]:
        return Counter(status for at, status in list(self.answers) if at >= moment)

    def stop(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=30)


def test_the_api_answers_503_while_postgres_is_down_and_recovers_by_itself(
    served: tuple[PrivatePostgres, ServedApi, str],
) -> None:
    # given: readers busy on the API (the pool full of open connections)
    postgres, api, key = served
    readers = Readers(api, key)
    try:
        wait_until(lambda: readers.since(0)[200] >= 50, timeout=30, what="answers")

        # when: PostgreSQL stops
        postgres.stop()
        down = time.monotonic()
        wait_until(lambda: readers.since(down)[503] >= 20, timeout=30, what="503 answers")
        time.sleep(1)
        during = readers.since(down + 0.5)

        # ... and starts again (every pooled connection is now stale)
        postgres.start()
        up = time.monotonic()
        wait_until(lambda: readers.since(up)[200] >= 20, timeout=30, what="recovery")
        recovered_at = min(at for at, status in readers.answers if at >= up and status == 200)
        time.sleep(1)
        settled = readers.since(recovered_at + 0.5)
    finally:
        readers.stop()

    # then: while it was down, every answer was a 503 (with Retry-After, see below)
    assert set(during) == {503}, during
    # and: it served again within seconds, with no restart, and kept serving
    assert recovered_at - up < 10
    assert set(settled) == {200}, settled
    # and: never a 500, before, during or after, and never a connection dropped unanswered
    # (a request whose connection died as it closed, say)
    assert 500 not in readers.since(0), readers.since(0)
    assert readers.errors == []
    with api.client(key) as client:
        postgres.stop()
        answer = client.get("/v1/classes")
        postgres.start()
    assert answer.status_code == 503
    assert answer.headers["content-type"].startswith("application/problem+json")
    assert answer.headers["retry-after"]
    assert "database" in answer.json()["detail"]


def test_a_restart_between_requests_costs_at_most_a_503_per_stale_connection(
    served: tuple[PrivatePostgres, ServedApi, str],
) -> None:
    # given: the pool holds open connections from a burst of concurrent requests
    postgres, api, key = served
    readers = Readers(api, key)
    wait_until(lambda: readers.since(0)[200] >= 50, timeout=30, what="answers")
    readers.stop()

    # when: PostgreSQL restarts while nobody asks, then the readers come back
    postgres.stop()
    postgres.start()
    back = time.monotonic()
    readers = Readers(api, key)
    try:
        wait_until(lambda: readers.since(back)[200] >= 50, timeout=30, what="answers")
    finally:
        readers.stop()

    # then: no 500; the few requests that met a dead pooled connection answered 503, and
    # the pool was renewed at once (not one dead connection per request for minutes)
    answers = readers.since(back)
    assert set(answers) <= {200, 503}, answers
    assert readers.errors == []
    assert answers[503] <= READERS, answers


def test_a_read_after_a_restart_renews_the_read_pool_instead_of_failing() -> None:
    # given: the hot reads' async pool holding four open connections
    statement = select(literal_column("1"), func.pg_sleep(0.2))
    with PrivatePostgres.running() as postgres:
        reads = ReadDatabase(make_engine(postgres.url), pool_size=4)

        async def scenario() -> tuple[list[Any], dict[str, int], list[list[Any]]]:
            assert await reads.open()
            try:
                await asyncio.gather(*(reads.rows(statement, {}) for _ in range(4)))
                assert reads._pool is not None
                before = reads._pool.get_stats()

                # when: PostgreSQL restarts (each of them is now stale), then reads come
                postgres.stop()
                postgres.start()
                first = await reads.rows(select(literal_column("1")), {})
                more = await asyncio.gather(*(reads.rows(statement, {}) for _ in range(4)))
                return first, before, more
            finally:
                await reads.close()

        first, before, more = asyncio.run(scenario())
        reads.engine.dispose()

    # then: the first read after the restart found a stale connection, renewed the pool's
    # connections and answered; so did every read after it
    assert before["pool_size"] == 4, before
    assert first == [(1,)]
    assert [[row[0] for row in rows] for rows in more] == [[1]] * 4
