"""Redis, the broker, stops for 20 s while jobs are submitted and running: the API keeps
accepting jobs (committed, queued, answered 202), nothing fails, and once Redis is back every
job completes exactly once, with no restart of anything. The Redis is the test's own and keeps
nothing on disk, so the outage loses every message it held."""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import func, select

from aligndiff.synth import Models
from service.app import create_app
from service.auth import create_key
from service.contexts.jobs import TERMINAL
from service.models import Job, Sample
from service.settings import Settings
from service.storage import LocalStorage
from tests.api_support import class_form, shot_files
from tests.conftest import SHOTS_DIR
from tests.fault_support import PrivateRedis
from tests.worker_support import (
    Service,
    WorkerProcess,
    create_class,
    give_embedding,
    token_embedding,
    wait_for,
    worker_env,
)
from worker import synthesis

OUTAGE_SECONDS = 20


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[PrivateRedis]:
    with PrivateRedis.running(tmp_path) as redis:
        yield redis


def test_jobs_submitted_and_running_through_a_broker_outage_complete_once(
    tmp_path: Path,
    postgres_url: str,
    model_cache: Path,
    tiny_models: Models,
    broker: PrivateRedis,
) -> None:
    # given: the API and a worker on the private Redis; a short lease, so a job whose
    # messages were lost is resumed soon after the broker is back
    settings = Settings(
        data_dir=tmp_path,
        database_url=postgres_url,
        broker_url=broker.url,
        storage_url=f"file://{tmp_path / 'blobs'}",
        sample_chunk_size=1,
        annotation_chunk_size=2,
        job_lease_seconds=5,
    )
    service = Service.create(settings)
    embedding = token_embedding(tiny_models, "<dog>")
    app = create_app(settings, storage=LocalStorage(tmp_path / "blobs"))
    with app.state.session_factory() as session:
        key = create_key(session, name="outage", admin=False)
        session.commit()
    api = TestClient(app, headers={"Authorization": f"Bearer {key}"})
    log = tmp_path / "worker.log"
    worker = WorkerProcess(
        worker_env(settings, model_cache, ALIGNDIFF_SWEEP_INTERVAL_SECONDS="0.5"),
        log,
        pool="solo",
        concurrency=1,
    )
    try:
        # ... and a job running (its token learned, so it starts sampling at once)
        running = create_class(service, SHOTS_DIR / "dog", name="dog", num_samples=4)
        give_embedding(service, running.class_id, embedding, "<dog>")
        app.state.queue.enqueue(synthesis.START, str(running.job_id))
        wait_for(
            lambda: service.samples(running.class_id),
            timeout=90,
            what="the running job's first sample",
            log=log,
        )

        # when: Redis stops (every queued and unacknowledged message is lost)
        broker.stop()
        stopped = time.monotonic()
        # ... and jobs are submitted meanwhile
        submitted: list[uuid.UUID] = []
        for name in ("cat", "owl"):
            began = time.monotonic()
            answer = api.post(
                "/v1/classes", data=class_form(name, num_samples=2), files=shot_files("dog")
            )
            # then: each is accepted at once, committed and queued
            assert answer.status_code == 202, answer.text
            assert time.monotonic() - began < 10
            created = answer.json()
            assert created["status"] == "queued"
            give_embedding(service, uuid.UUID(created["id"]), embedding, "<dog>")
            submitted.append(uuid.UUID(created["job_id"]))
        assert api.get("/readyz").status_code == 503
        for job_id in submitted:
            assert api.get(f"/v1/jobs/{job_id}").json()["status"] == "queued"
        time.sleep(max(0.0, OUTAGE_SECONDS - (time.monotonic() - stopped)))
        assert service.job(running.job_id).status == "running"

        # when: Redis is back, empty
        broker.start()

        # then: every job completes, none failed, with no restart of the API or the worker
        jobs = [running.job_id, *submitted]

        def all_ended() -> list[Job] | None:
            rows = [service.job(job_id) for job_id in jobs]
            return rows if all(row.status in TERMINAL for row in rows) else None

        ended = wait_for(all_ended, timeout=180, what="every job to end", log=log)
    finally:
        worker.kill()
    assert [(job.status, job.error) for job in ended] == [("succeeded", None)] * 3
    # and: each exactly once: its requested samples, one per index, all finalized
    with service.session() as session:
        for job in ended:
            counts = session.execute(
                select(func.count(), func.count(func.distinct(Sample.index)))
                .select_from(Sample)
                .where(Sample.class_id == job.target_id, Sample.finalized_at.is_not(None))
            ).one()
            wanted = 4 if job.id == running.job_id else 2
            assert tuple(counts) == (wanted, wanted)
    # and: the queued ones started once the broker was back, on their first attempt
    assert [job.attempts for job in ended[1:]] == [1, 1]
    assert api.get("/readyz").status_code == 200
