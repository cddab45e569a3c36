"""Faults between the API and its servers: the real API (uvicorn on `service.app:create_app`)
runs on a host of its own (a network namespace, `tests.netns_support`) and answers on a Unix
socket, which the test reaches whatever becomes of the host's link; PostgreSQL and a private
Redis stay here. Cutting the link drops every packet between the API and the servers behind
it, as a network partition does: nothing is refused, nothing answers.

- Cut from PostgreSQL, the API answers reads and writes 503 problem+json (in seconds, not the
  minutes the kernel would wait) and stores nothing; healed, it answers 200 again by itself,
  with everything stored before the cut still there.
- Cut from Redis (PostgreSQL still reached, over a Unix socket) in the middle of sending a
  job's start, on the connection its earlier send used, the API still answers 202 with the job
  stored `queued`; the sweeper sends the start once (one message reaches Redis), and the job
  ends `succeeded`, exactly once.

Needs root (skipped otherwise, saying so); every namespace, link, process and socket is
removed afterwards.
"""

from __future__ import annotations

import shutil
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import pytest
import redis
from sqlalchemy import func, select

from aligndiff.synth import Models
from service.auth import create_key
from service.contexts import jobs
from service.contexts.jobs import TERMINAL
from service.models import Job, Sample, SegClass
from service.settings import Settings
from tests.api_support import class_form, shot_files
from tests.fault_support import CuttableProxy, PrivateRedis, wait_until
from tests.netns_support import Host, HostedApi, hosts, require_namespaces
from tests.worker_support import (
    Service,
    WorkerProcess,
    give_embedding,
    token_embedding,
    wait_for,
    worker_env,
)
from worker import synthesis

pytestmark = pytest.mark.slow

# How long a client waits for any answer of the API cut off. The API gives up on a server
# that does not answer within seconds (`service.db`, `broker_socket_timeout_seconds`); without
# those bounds it would wait for the kernel: minutes.
ANSWER_WITHIN = 30.0
PROBLEM = "application/problem+json"
# A queued job's start is sent again this long after its last send (`job_lease_seconds`):
# longer than the API takes to answer a job submitted cut off from Redis (about two
# `broker_socket_timeout_seconds`), so that the sweeper's send comes after the heal.
LEASE = 20


@dataclass
class Partitioned:
    """The API on a host of its own, and the database and blob store as the test sees them."""

    service: Service
    settings: Settings
    api: HostedApi
    host: Host
    key: str
    # Jobs the test submits: those left unfinished are ended afterwards, so that no later
    # test's sweeper takes them up (the database is the session's).
    created: list[uuid.UUID] = field(default_factory=list)

    def client(self) -> httpx.Client:
        return self.api.client(self.key, timeout=ANSWER_WITHIN)

    def classes(self) -> int:
        with self.service.session() as session:
            return int(session.scalar(select(func.count()).select_from(SegClass)) or 0)

    def submit(self, client: httpx.Client, name: str) -> httpx.Response:
        answer = client.post(
            "/v1/classes", data=class_form(name, num_samples=1), files=shot_files("dog")
        )
        if answer.status_code == 202:
            self.created.append(uuid.UUID(answer.json()["job_id"]))
        return answer


@pytest.fixture
def sockets() -> Iterator[Path]:
    """A folder with a short path for Unix sockets (whose paths hold 107 bytes at most)."""
    folder = Path(tempfile.mkdtemp(prefix="ad-api-"))
    yield folder
    shutil.rmtree(folder, ignore_errors=True)


@contextmanager
def through_unix_socket(url: str, folder: Path) -> Iterator[str]:
    """`url` (PostgreSQL on this machine's loopback) reached through a Unix socket in `folder`
    instead: a process on another host reaches it whatever becomes of that host's link."""
    parts = urlsplit(url)
    port = parts.port or 5432
    proxy = CuttableProxy(port, unix=folder / f".s.PGSQL.{port}")
    try:
        yield f"{parts.scheme}://{parts.username}@/{parts.path.lstrip('/')}?host={folder}&port={port}"
    finally:
        proxy.close()


@contextmanager
def partitioned_api(
    folder: Path,
    postgres_url: str,
    model_cache: Path,
    broker: PrivateRedis,
    sockets: Path,
    *,
    database_through_link: bool,
) -> Iterator[Partitioned]:
    """The API on a host named "api": Redis through the host's link, PostgreSQL too or, with
    `database_through_link` false, through a Unix socket (so that a cut leaves it reachable)."""
    require_namespaces()
    settings = Settings(
        data_dir=folder,
        database_url=postgres_url,
        broker_url=broker.url,
        storage_url=f"file://{folder / 'blobs'}",
        sample_chunk_size=1,
        annotation_chunk_size=2,
        job_lease_seconds=LEASE,
    )
    service = Service.create(settings)
    with service.session() as session:
        key = create_key(session, name="partition", admin=False)
    with hosts("api") as (host,), through_unix_socket(postgres_url, sockets) as local_database:
        hosted = settings.model_copy(
            update={
                "database_url": host.reach(postgres_url)
                if database_through_link
                else local_database,
                "broker_url": host.reach(broker.url),
            }
        )
        env = worker_env(hosted, model_cache)
        api = HostedApi(host, env, folder / "api.log", socket_path=sockets / "api.sock")
        built = Partitioned(service, settings, api, host, key)
        try:
            wait_until(api.ready, timeout=60, what="the API on its host", interval=0.2)
            yield built
        finally:
            host.heal()
            api.kill()
            api.stop()
            with service.session() as session:
                for job_id in built.created:
                    jobs.fail(session, job_id, "the test is over")


class PushedMessages:
    """Every LPUSH Redis runs (a message sent to a queue), as its MONITOR reports it."""

    def __init__(self, url: str) -> None:
        self.commands: list[bytes] = []
        # NOTE: no socket timeout (redis-py's default is 5 s): MONITOR waits for commands.
        self._client = redis.Redis.from_url(url, socket_timeout=None)
        self._connection = self._client.connection_pool.get_connection()
        self._connection.send_command("MONITOR")
        assert self._connection.read_response() in (b"OK", "OK")
        threading.Thread(target=self._run, daemon=True).start()

    def _run(self) -> None:
        # Raw lines (`"LPUSH" "<queue>" "<message>"`): only the bytes in them are looked for.
        with suppress(redis.RedisError, OSError, ValueError):
            while True:
                line = self._connection.read_response(disable_decoding=True)
                if isinstance(line, bytes) and b'"LPUSH"' in line.upper():
                    self.commands.append(line)

    def starts(self, job_id: uuid.UUID) -> int:
        """How many start messages of job `job_id` reached Redis."""
        task, job = synthesis.START.encode(), str(job_id).encode()
        return sum(task in pushed and job in pushed for pushed in self.commands)

    def close(self) -> None:
        self._connection.disconnect()
        self._client.close()


def test_api_cut_from_postgresql_answers_503_and_recovers(
    tmp_path: Path, postgres_url: str, model_cache: Path, sockets: Path
) -> None:
    with (
        PrivateRedis.running(tmp_path) as broker,
        partitioned_api(
            tmp_path, postgres_url, model_cache, broker, sockets, database_through_link=True
        ) as cut_off,
        cut_off.client() as client,
    ):
        # given: a class submitted through the API
        created = cut_off.submit(client, "dog")
        assert created.status_code == 202, created.text
        class_id, job_id = created.json()["id"], created.json()["job_id"]
        before = client.get(f"/v1/classes/{class_id}")
        assert before.status_code == 200, before.text
        stored = cut_off.classes()

        # when: the API's host is cut off from PostgreSQL (every packet dropped)
        cut_off.host.cut()

        # then: reads and writes are answered 503 problem+json, each before the client
        # gives up waiting (the client raises otherwise)
        requests: list[tuple[str, str, dict[str, Any]]] = [
            ("GET", f"/v1/classes/{class_id}", {}),
            ("GET", "/v1/classes", {}),
            ("POST", "/v1/classes", {"data": class_form("owl"), "files": shot_files("dog")}),
            ("GET", f"/v1/jobs/{job_id}", {}),
        ]
        for method, path, options in requests:
            began = time.monotonic()
            answer = client.request(method, path, **options)
            print(f"cut: {method} {path}: {answer.status_code} in {time.monotonic() - began:.1f} s")
            assert answer.status_code == 503, answer.text
            assert answer.headers["content-type"].startswith(PROBLEM)
            assert answer.json()["status"] == 503
            assert answer.headers["retry-after"]
        # ... and the write stored nothing
        assert cut_off.classes() == stored

        # when: the link is back
        cut_off.host.heal()
        healed = time.monotonic()

        # then: the API answers again by itself, with the class as it was
        wait_until(
            lambda: client.get(f"/v1/classes/{class_id}").status_code == 200,
            timeout=ANSWER_WITHIN,
            what="the API to answer 200 again",
            interval=0.5,
        )
        print(f"healed: 200 again after {time.monotonic() - healed:.1f} s")
        assert client.get(f"/v1/classes/{class_id}").json() == before.json()
        assert client.get(f"/v1/jobs/{job_id}").json()["status"] == "queued"
        # ... and takes writes again
        again = cut_off.submit(client, "owl")
        assert again.status_code == 202, again.text
        assert cut_off.classes() == stored + 1


def test_api_cut_from_redis_mid_enqueue_leaves_the_start_to_the_sweeper(
    tmp_path: Path, postgres_url: str, model_cache: Path, tiny_models: Models, sockets: Path
) -> None:
    embedding = token_embedding(tiny_models, "<dog>")
    with (
        PrivateRedis.running(tmp_path) as broker,
        partitioned_api(
            tmp_path, postgres_url, model_cache, broker, sockets, database_through_link=False
        ) as cut_off,
        cut_off.client() as client,
    ):
        pushed = PushedMessages(broker.url)
        # given: a job whose start the API sent, on the connection to Redis it keeps
        first = cut_off.submit(client, "cat")
        assert first.status_code == 202, first.text
        give_embedding(cut_off.service, uuid.UUID(first.json()["id"]), embedding, "<dog>")
        wait_until(
            lambda: pushed.starts(cut_off.created[0]) == 1, timeout=10, what="the first start"
        )
        # ... and a worker, here, whose sweeper looks for unclaimed jobs every 0.5 s
        log = tmp_path / "worker.log"
        env = worker_env(cut_off.settings, model_cache, ALIGNDIFF_SWEEP_INTERVAL_SECONDS="0.5")
        worker = WorkerProcess(env, log, pool="solo", concurrency=1)
        try:
            # when: the API's host is cut off from Redis (PostgreSQL is still reached) and a
            # job is submitted: its start is sent on a connection that no longer answers
            cut_off.host.cut()
            began = time.monotonic()
            answer = cut_off.submit(client, "owl")
            print(
                f"cut: POST /v1/classes: {answer.status_code} in {time.monotonic() - began:.1f} s"
            )

            # then: the job is accepted and stored queued, and no start of it reached Redis
            assert answer.status_code == 202, answer.text
            assert answer.json()["status"] == "queued"
            class_id, job_id = uuid.UUID(answer.json()["id"]), uuid.UUID(answer.json()["job_id"])
            give_embedding(cut_off.service, class_id, embedding, "<dog>")
            assert client.get(f"/v1/jobs/{job_id}").json()["status"] == "queued"
            assert pushed.starts(job_id) == 0

            # when: the link is back
            cut_off.host.heal()

            # then: both jobs run to the end
            def ended() -> list[Job] | None:
                rows = [cut_off.service.job(each) for each in cut_off.created]
                return rows if all(row.status in TERMINAL for row in rows) else None

            rows = wait_for(ended, timeout=180, what="both jobs to end", log=log)
        finally:
            worker.kill()
            pushed.close()
    assert [(row.status, row.error, row.attempts) for row in rows] == [("succeeded", None, 1)] * 2
    # and: the sweeper sent the cut-off job's start, once: one start message reached Redis
    sent_again = f"job {job_id} was never claimed: sending its start again"
    assert log.read_text(errors="replace").count(sent_again) == 1
    assert pushed.starts(job_id) == 1
    # ... and its sample was drawn once
    with cut_off.service.session() as session:
        counts = session.execute(
            select(func.count(), func.count(func.distinct(Sample.index)))
            .select_from(Sample)
            .where(Sample.class_id == class_id, Sample.finalized_at.is_not(None))
        ).one()
    assert tuple(counts) == (1, 1)
