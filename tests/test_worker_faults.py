"""Jobs survive faults: a worker killed mid-sampling, and a failed job retried; neither loses,
redoes nor duplicates a sample."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from sqlalchemy import func, select, update

from aligndiff.synth import Models
from service.contexts.jobs import TERMINAL, retry
from service.models import Job, Owner, Sample, Shot
from service.settings import Settings
from service.storage import LocalStorage
from tests.conftest import SHOTS_DIR
from tests.worker_support import (
    InProcessQueue,
    Service,
    WorkerProcess,
    create_class,
    give_embedding,
    token_embedding,
    wait_for,
    worker_env,
)
from worker import synthesis
from worker.celery_app import make_celery

DOG = SHOTS_DIR / "dog"


@pytest.fixture
def workers() -> Iterator[list[WorkerProcess]]:
    """Worker processes started by a test; whatever is left of them is stopped afterwards."""
    started: list[WorkerProcess] = []
    yield started
    for worker in started:
        worker.stop()


def wait_for_end(service: Service, job_id: uuid.UUID, *, timeout: float, log: Path) -> Job:
    def ended() -> Job | None:
        job = service.job(job_id)
        return job if job.status in TERMINAL else None

    return wait_for(ended, timeout=timeout, what="the job to end", log=log)


def test_a_killed_worker_s_job_resumes_on_a_new_worker_without_duplicates(
    tmp_path: Path,
    postgres_url: str,
    redis_url: str,
    model_cache: Path,
    tiny_models: Models,
    workers: list[WorkerProcess],
) -> None:
    # given: a class of 8 samples (its token already learned), one sample per chunk, a short
    # lease and visibility timeout, and a worker sampling it
    settings = Settings(
        data_dir=tmp_path,
        database_url=postgres_url,
        broker_url=redis_url,
        storage_url=f"file://{tmp_path / 'blobs'}",
        sample_chunk_size=1,
        annotation_chunk_size=4,
        job_lease_seconds=4,
        task_visibility_timeout=30,
    )
    service = Service.create(settings)
    created = create_class(service, DOG, name="dog", num_samples=8)
    give_embedding(service, created.class_id, token_embedding(tiny_models, "<dog>"), "<dog>")
    env = worker_env(settings, model_cache)
    log = tmp_path / "worker.log"
    workers.append(WorkerProcess(env, log, pool="solo", concurrency=1))
    make_celery(settings).send_task(synthesis.START, args=[str(created.job_id)])
    wait_for(
        lambda: len(service.samples(created.class_id)) >= 2,
        timeout=60,
        what="the first samples",
        log=log,
    )

    # when: the worker's machine dies mid-sampling (the whole process group, SIGKILL)
    workers[0].kill()
    before = {s.index: (s.id, s.created_at) for s in service.samples(created.class_id)}
    assert 2 <= len(before) < 8
    assert service.job(created.job_id).status == "running"
    # ... its lease runs out, and a new worker starts
    wait_for(
        lambda: service.job(created.job_id).lease_expires_at < datetime.now(UTC),  # type: ignore[operator]
        timeout=15,
        what="the lease to expire",
    )
    workers.append(WorkerProcess(env, log, pool="solo", concurrency=1))

    # then: the new worker takes the job over and completes it
    job = wait_for_end(service, created.job_id, timeout=120, log=log)
    assert job.status == "succeeded", job.error
    assert job.attempts >= 2
    # and: exactly 8 samples, one per index, the ones drawn before the kill untouched
    samples = service.samples(created.class_id)
    assert [s.index for s in samples] == list(range(8))
    with service.session() as session:
        rows = session.scalar(
            select(func.count()).select_from(Sample).where(Sample.class_id == created.class_id)
        )
    assert rows == 8
    assert all(s.finalized_at is not None for s in samples)
    assert {i: (s.id, s.created_at) for i, s in enumerate(samples) if i in before} == before


def test_retrying_a_failed_job_keeps_its_stored_samples(
    tmp_path: Path, model_cache: Path, tiny_models: Models, workers: list[WorkerProcess]
) -> None:
    # given: the embedded setup (SQLite, SQLite broker, blob folder, a solo worker) and a class
    # of 4 samples whose shot image blob has gone missing: sampling works, annotation fails
    settings = Settings(
        data_dir=tmp_path,
        database_url=f"sqlite:///{tmp_path / 'aligndiff.db'}",
        broker_url=f"sqla+sqlite:///{tmp_path / 'broker.db'}",
        storage_url=f"file://{tmp_path / 'blobs'}",
        sample_chunk_size=2,
        annotation_chunk_size=2,
    )
    service = Service.create(settings)
    created = create_class(service, DOG, name="dog", num_samples=4)
    give_embedding(service, created.class_id, token_embedding(tiny_models, "<dog>"), "<dog>")
    with service.session() as session:
        shot = session.scalars(select(Shot).where(Shot.class_id == created.class_id)).one()
    assert isinstance(service.storage, LocalStorage)
    shot_path = service.storage.root / shot.image_key
    shot_bytes = shot_path.read_bytes()
    shot_path.unlink()
    log = tmp_path / "worker.log"
    workers.append(
        WorkerProcess(worker_env(settings, model_cache), log, pool="solo", concurrency=1)
    )
    app = make_celery(settings)
    app.send_task(synthesis.START, args=[str(created.job_id)])
    job = wait_for_end(service, created.job_id, timeout=90, log=log)
    assert job.status == "failed"
    assert job.error is not None and "BlobNotFound" in job.error and shot.image_key in job.error
    drawn = service.samples(created.class_id)
    assert [s.index for s in drawn] == [0, 1, 2, 3]
    images = {s.index: (service.storage.root / s.image_key).stat().st_mtime_ns for s in drawn}

    # when: the blob is put back and the job retried (`POST /v1/jobs/{id}/retry`)
    shot_path.write_bytes(shot_bytes)
    with service.session() as session:
        failed = session.get(Job, created.job_id)
        assert failed is not None
        retry(session, failed)
    app.send_task(synthesis.START, args=[str(created.job_id)])

    # then: it succeeds with the samples drawn before: same rows, images not drawn again
    job = wait_for_end(service, created.job_id, timeout=90, log=log)
    assert job.status == "succeeded", job.error
    assert (job.attempts, job.error, job.progress) == (1, None, 1.0)
    samples = service.samples(created.class_id)
    assert [(s.id, s.created_at) for s in samples] == [(s.id, s.created_at) for s in drawn]
    assert {s.index: (service.storage.root / s.image_key).stat().st_mtime_ns for s in samples} == (
        images
    )
    assert all(s.finalized_at is not None and s.mask_key for s in samples)


def test_a_starting_worker_takes_over_orphaned_jobs_only(tmp_path: Path) -> None:
    # given: jobs in every situation a worker can find at start
    settings = Settings(
        data_dir=tmp_path,
        database_url=f"sqlite:///{tmp_path / 'aligndiff.db'}",
        broker_url="memory://",
        job_lease_seconds=60,
    )
    service = Service.create(settings)
    long_ago = datetime.now(UTC) - timedelta(hours=1)
    situations = {
        "lost its worker": {"status": "running", "lease_expires_at": long_ago},
        "lost its worker after a cancel": {
            "status": "running", "lease_expires_at": long_ago, "cancel_requested": True,
        },
        "lost its worker too often": {
            "status": "running", "lease_expires_at": long_ago, "attempts": 3,
        },
        "running fine": {"status": "running", "lease_expires_at": long_ago + timedelta(hours=2)},
        "never claimed": {"status": "queued", "updated_at": long_ago},
        "just queued": {"status": "queued"},
        "finished": {"status": "succeeded", "lease_expires_at": long_ago},
    }  # fmt: skip
    ids = {}
    with service.session() as session:
        owner = Owner(name="orphans")
        session.add(owner)
        session.flush()
        for situation, values in situations.items():
            job = Job(kind="synthesis", owner_id=owner.id, target_id=uuid.uuid4(), attempts=1)
            session.add(job)
            session.flush()
            # NOTE: a Core UPDATE, so that `updated_at` can be set in the past.
            session.execute(update(Job).where(Job.id == job.id).values(**values))
            ids[situation] = job.id
    queue = InProcessQueue()

    # when: a worker starts
    requeued = synthesis.requeue_orphaned_jobs(make_celery(settings, queue=queue).context)

    # then: the job that lost its worker is taken over (an attempt more) and resumed; a queued
    # one never claimed is started again; nothing else is touched or sent
    assert set(requeued) == {ids["lost its worker"], ids["never claimed"]}
    assert list(queue.pending) == [
        (synthesis.RESUME, (str(ids["lost its worker"]),)),
        (synthesis.START, (str(ids["never claimed"]),)),
    ]
    taken = service.job(ids["lost its worker"])
    assert (taken.status, taken.attempts) == ("running", 2)
    assert taken.lease_expires_at is not None and taken.lease_expires_at > datetime.now(UTC)
    assert service.job(ids["lost its worker after a cancel"]).status == "cancelled"
    gave_up = service.job(ids["lost its worker too often"])
    assert gave_up.status == "failed" and "3 attempts" in (gave_up.error or "")
    for situation in ("running fine", "just queued", "finished"):
        job = service.job(ids[situation])
        assert (job.status, job.attempts) == (situations[situation]["status"], 1)
