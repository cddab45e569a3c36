"""Jobs survive faults: a worker killed mid-sampling is replaced by another without a restart,
a job whose worker dies every time fails after its attempts, and a failed job retried keeps its
samples; none loses, redoes nor duplicates a sample."""

from __future__ import annotations

import os
import re
import signal
import socket
import uuid
from collections import Counter
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import boto3
import pytest
from kombu.exceptions import OperationalError as BrokerError
from sqlalchemy import func, select, update

from aligndiff.synth import Models
from service.contexts.jobs import TERMINAL, retry
from service.db import make_engine, make_session_factory
from service.models import Base, Job, Owner, Sample, Shot, WorkerHeartbeat
from service.settings import Settings
from service.storage import LocalStorage, StorageUnavailable, make_storage
from tests.conftest import SHOTS_DIR
from tests.fault_support import AWS_TEST_ENVIRONMENT, PrivateRedis, moto_server
from tests.worker_support import (
    CreatedClass,
    InProcessQueue,
    Service,
    WorkerProcess,
    create_class,
    give_embedding,
    local_settings,
    token_embedding,
    wait_for,
    worker_env,
)
from worker import synthesis
from worker.celery_app import make_celery

DOG = SHOTS_DIR / "dog"


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[PrivateRedis]:
    """A Redis of the test's own (requested before `workers`, so it outlives them)."""
    with PrivateRedis.running(tmp_path) as redis:
        yield redis


@pytest.fixture
def workers() -> Iterator[list[WorkerProcess]]:
    """Worker processes started by a test; whatever is left of them is killed afterwards (a
    warm shutdown takes seconds each, and the test has checked all it needs by then)."""
    started: list[WorkerProcess] = []
    yield started
    for worker in started:
        worker.kill()
        worker.stop()


def wait_for_end(service: Service, job_id: uuid.UUID, *, timeout: float, log: Path) -> Job:
    def ended() -> Job | None:
        job = service.job(job_id)
        return job if job.status in TERMINAL else None

    return wait_for(ended, timeout=timeout, what="the job to end", log=log)


def two_workers_sampling_8(
    tmp_path: Path,
    postgres_url: str,
    model_cache: Path,
    tiny_models: Models,
    broker: PrivateRedis,
    workers: list[WorkerProcess],
    **settings: Any,
) -> tuple[Service, CreatedClass]:
    """A class of 8 samples whose token is learned, one sample per chunk, its synthesis sent
    to two solo workers (logging to worker-0.log and worker-1.log) sweeping every 0.5 s;
    `settings` are the service's and the workers' too."""
    configured = Settings(
        data_dir=tmp_path,
        database_url=postgres_url,
        broker_url=broker.url,
        storage_url=f"file://{tmp_path / 'blobs'}",
        sample_chunk_size=1,
        annotation_chunk_size=4,
        **settings,
    )
    service = Service.create(configured)
    created = create_class(service, DOG, name="dog", num_samples=8)
    give_embedding(service, created.class_id, token_embedding(tiny_models, "<dog>"), "<dog>")
    variables = {f"ALIGNDIFF_{name.upper()}": str(value) for name, value in settings.items()}
    env = worker_env(configured, model_cache, ALIGNDIFF_SWEEP_INTERVAL_SECONDS="0.5", **variables)
    logs = [tmp_path / f"worker-{n}.log" for n in range(2)]
    workers += [WorkerProcess(env, log, pool="solo", concurrency=1) for log in logs]
    make_celery(configured).send_task(synthesis.START, args=[str(created.job_id)])
    return service, created


def kill_the_claimer_mid_sample(
    service: Service, job_id: uuid.UUID, workers: list[WorkerProcess]
) -> tuple[WorkerProcess, str, int]:
    """SIGKILL the process group of the worker that claimed the job while it draws a sample
    not stored yet, once 2 or more are stored; returns it, its name, and the sample it lost.

    NOTE: the other workers draw chunks too, so a kill between two of the victim's chunks, or
    after it stored its sample, loses no work and needs no takeover. The victim is frozen
    (SIGSTOP) to check, from its log and the stored rows, that it is drawing a sample not
    stored; if not, it goes on and the check is made again."""
    class_id = service.job(job_id).target_id

    def kill() -> tuple[WorkerProcess, str, int] | None:
        claimer = service.job(job_id).worker
        if claimer is None or len(service.samples(class_id)) < 2:
            return None
        victim = next(w for w in workers if claimer == f"{socket.gethostname()}:{w.process.pid}")
        victim.pause()
        drawing = re.findall(r"drawing samples (\d+)$", victim.log.read_text(), re.MULTILINE)
        stored = {s.index for s in service.samples(class_id)}
        if drawing and int(drawing[-1]) not in stored:
            victim.kill()
            return victim, claimer, int(drawing[-1])
        victim.resume()
        return None

    return wait_for(kill, timeout=90, what="the claimer mid-sample", log=workers[0].log)


def test_a_killed_worker_s_job_resumes_on_another_worker_without_duplicates(
    tmp_path: Path,
    postgres_url: str,
    model_cache: Path,
    tiny_models: Models,
    broker: PrivateRedis,
    workers: list[WorkerProcess],
) -> None:
    # given: a class of 8 samples (its token already learned), one sample per chunk, a short
    # lease, and two workers sampling it
    service, created = two_workers_sampling_8(
        tmp_path, postgres_url, model_cache, tiny_models, broker, workers,
        job_lease_seconds=5, task_visibility_timeout=60,
    )  # fmt: skip

    # when: the machine of the worker that claimed the job dies mid-sample (the whole process
    # group, SIGKILL) with 2 or more samples stored
    victim, claimer, lost = kill_the_claimer_mid_sample(service, created.job_id, workers)
    before = {s.index: (s.id, s.created_at) for s in service.samples(created.class_id)}
    assert 2 <= len(before) < 8 and lost not in before
    assert service.job(created.job_id).status == "running"

    # then: the other worker takes it over once its lease runs out (no worker restarts)
    # and completes it
    (survivor,) = [w for w in workers if w is not victim]
    job = wait_for_end(service, created.job_id, timeout=120, log=survivor.log)
    assert job.status == "succeeded", job.error
    assert job.attempts >= 2
    assert job.worker != claimer
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


def test_a_dead_worker_s_job_is_taken_over_once_its_heartbeat_is_silent_not_its_lease(
    tmp_path: Path,
    postgres_url: str,
    model_cache: Path,
    tiny_models: Models,
    broker: PrivateRedis,
    workers: list[WorkerProcess],
) -> None:
    # given: a job lease of 10 minutes (the default), heartbeats every 0.5 s, a worker taken
    # as dead after 3 s of silence, and two workers sampling a class of 8
    service, created = two_workers_sampling_8(
        tmp_path, postgres_url, model_cache, tiny_models, broker, workers,
        job_lease_seconds=600, worker_heartbeat_seconds=0.5, worker_lost_after_seconds=3,
    )  # fmt: skip

    # when: the worker that claimed the job dies mid-sample
    victim, claimer, _ = kill_the_claimer_mid_sample(service, created.job_id, workers)

    # then: the other worker's sweep takes the job over within seconds (the wait fails long
    # before the lease's 10 minutes), and completes it with exactly 8 samples
    (survivor,) = [w for w in workers if w is not victim]
    job = wait_for_end(service, created.job_id, timeout=90, log=survivor.log)
    assert job.status == "succeeded", job.error
    assert job.attempts == 2 and job.worker != claimer
    assert [s.index for s in service.samples(created.class_id)] == list(range(8))
    assert f"worker {claimer} not heard from since" in survivor.log.read_text()
    # and: the dead worker's heartbeat row is gone, the survivor's is there
    with service.session() as session:
        names = set(session.scalars(select(WorkerHeartbeat.name)))
    assert claimer not in names and len(names) == 1


def test_a_job_whose_worker_dies_every_time_fails_after_its_attempts(
    tmp_path: Path,
    postgres_url: str,
    model_cache: Path,
    tiny_models: Models,
    broker: PrivateRedis,
    workers: list[WorkerProcess],
) -> None:
    # given: jobs get 2 attempts; a prefork worker (the process running a task is a child)
    settings = Settings(
        data_dir=tmp_path,
        database_url=postgres_url,
        broker_url=broker.url,
        storage_url=f"file://{tmp_path / 'blobs'}",
        # NOTE: longer than a worker takes to load its models (no report meanwhile)
        job_lease_seconds=6,
        max_job_attempts=2,
    )
    service = Service.create(settings)
    created = create_class(service, DOG, name="dog", num_samples=4)
    give_embedding(service, created.class_id, token_embedding(tiny_models, "<dog>"), "<dog>")
    log = tmp_path / "worker.log"
    env = worker_env(
        settings,
        model_cache,
        ALIGNDIFF_SWEEP_INTERVAL_SECONDS="0.5",
        ALIGNDIFF_WORKER_HEARTBEAT_SECONDS="0.5",
    )
    workers.append(WorkerProcess(env, log, pool="prefork", concurrency=1))
    make_celery(settings).send_task(synthesis.START, args=[str(created.job_id)])

    # when: every process that takes the job up dies at once (SIGKILL, as an out-of-memory
    # kill would), whether it took it from its start or as a resumed job
    killed: set[int] = set()

    def kill_its_worker_or_see_the_end() -> Job | None:
        job = service.job(created.job_id)
        if job.status in TERMINAL:
            return job
        if job.status == "running" and job.attempts == len(killed) + 1:
            for pid in running_the_job(service, created.job_id) - killed:
                os.kill(pid, signal.SIGKILL)
                killed.add(pid)
        return None

    job = wait_for(kill_its_worker_or_see_the_end, timeout=120, what="the end", log=log)

    # then: it failed after its 2 attempts, saying why
    assert job.status == "failed"
    assert len(killed) == 2 and job.attempts == 2
    assert job.error is not None
    assert "gave up after 2 attempts" in job.error and "worker was lost" in job.error
    # and: the message each dying process held came back, and was not run again (the
    # sweep, counting an attempt, resumed the job instead)
    wait_for(
        lambda: log.read_text(errors="replace").count("was delivered again: not run") >= 2,
        timeout=30,
        what="the redelivered messages",
        log=log,
    )


def test_a_task_delivered_again_while_it_runs_does_its_work_once(
    tmp_path: Path,
    postgres_url: str,
    model_cache: Path,
    tiny_models: Models,
    broker: PrivateRedis,
    workers: list[WorkerProcess],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # given: blobs in S3 with versioning on (every write of a key leaves a version), a class of
    # 8 samples drawn by one chunk task, and two workers
    for name, value in AWS_TEST_ENVIRONMENT.items():
        monkeypatch.setenv(name, value)
    with moto_server() as endpoint:
        s3 = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1")
        s3.create_bucket(Bucket="blobs")
        s3.put_bucket_versioning(Bucket="blobs", VersioningConfiguration={"Status": "Enabled"})
        settings = Settings(
            data_dir=tmp_path,
            database_url=postgres_url,
            broker_url=broker.url,
            storage_url="s3://blobs/aligndiff",
            s3_endpoint_url=endpoint,
            sample_chunk_size=8,
            annotation_chunk_size=8,
        )
        engine = make_engine(postgres_url)
        Base.metadata.create_all(engine)
        service = Service(
            settings,
            make_session_factory(engine),
            make_storage(settings.resolved_storage_url, endpoint_url=endpoint),
        )
        created = create_class(service, DOG, name="dog", num_samples=8)
        give_embedding(service, created.class_id, token_embedding(tiny_models, "<dog>"), "<dog>")
        env = worker_env(settings, model_cache, ALIGNDIFF_S3_ENDPOINT_URL=endpoint)
        log = tmp_path / "worker.log"
        workers += [WorkerProcess(env, log, pool="solo", concurrency=1) for _ in range(2)]
        app = make_celery(settings)
        app.send_task(synthesis.START, args=[str(created.job_id)])
        chunk = re.compile(r"Task aligndiff\.synthesis\.sample_chunk\[([0-9a-f-]+)\] received")
        task_id = wait_for(
            lambda: (found := chunk.search(log.read_text(errors="replace"))) and found[1],
            timeout=90,
            what="the chunk task to start",
            log=log,
        )

        # when: mid-chunk (its first samples stored), the visibility timeout runs out and Redis
        # hands the message out again: kombu's restore of overdue unacknowledged messages, as
        # a consumer with a visibility timeout of 0 s runs it
        wait_for(
            lambda: service.samples(created.class_id),
            timeout=60,
            what="the first samples",
            log=log,
        )
        overdue = {"visibility_timeout": 0}
        with app.connection_for_read(transport_options=overdue) as connection:
            connection.default_channel.qos.restore_visible(num=100, interval=1)

        # then: the other worker gets the message while the first still draws, and does not
        # run it
        dropped = f"({task_id}) was delivered again: not run"
        done = f"sample_chunk[{task_id}] succeeded"
        wait_for(lambda: dropped in log.read_text(errors="replace"), timeout=30, what="it", log=log)
        # and: the job succeeds once, on its first attempt, with 8 samples
        job = wait_for_end(service, created.job_id, timeout=120, log=log)
        assert (job.status, job.attempts) == ("succeeded", 1), job.error
        assert [s.index for s in service.samples(created.class_id)] == list(range(8))
        text = log.read_text(errors="replace")
        assert text.index(dropped) < text.index(done), "the first delivery had ended: no race"
        # and: no blob was written twice: each sample was drawn, annotated and scored once
        versions = Counter(
            version["Key"]
            for page in s3.get_paginator("list_object_versions").paginate(Bucket="blobs")
            for version in page.get("Versions", [])
        )
        engine.dispose()
    sample_blobs = [key for key in versions if "/samples/" in key]
    assert len(sample_blobs) == 8 * 3  # image, coarse mask, mask
    assert set(versions.values()) == {1}, [key for key, n in versions.items() if n > 1]


def running_the_job(service: Service, job_id: uuid.UUID) -> set[int]:
    """The live processes whose heartbeat says they run a task of the job."""
    with service.session() as session:
        pids = set(
            session.scalars(
                select(WorkerHeartbeat.pid).where(WorkerHeartbeat.current_job_id == job_id)
            )
        )
    return {pid for pid in pids if _alive(pid)}


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


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


class UnreachableBroker:
    """A task queue whose broker does not answer."""

    def enqueue(self, task_name: str, *args: object, queue: str | None = None) -> None:
        raise BrokerError(f"Error 111 connecting to the broker: cannot send {task_name}")


class UnreachableStore(LocalStorage):
    """A blob store that stops answering reads."""

    def get(self, key: str) -> bytes:
        raise StorageUnavailable(f"could not connect to the endpoint to read {key}")


@pytest.mark.parametrize("outage", ["broker", "blob store"])
def test_a_task_that_meets_an_outage_leaves_its_job_running_for_the_sweep(
    tmp_path: Path, tiny_models: Models, outage: str
) -> None:
    # given: a class ready to sample, and a worker whose broker or blob store is down
    settings = local_settings(tmp_path)
    service = Service.create(settings)
    created = create_class(service, DOG, name="dog", num_samples=2)
    give_embedding(service, created.class_id, token_embedding(tiny_models, "<dog>"), "<dog>")
    queue = InProcessQueue()
    started = make_celery(settings, queue=queue, models=tiny_models)
    started.loader.import_default_modules()  # the task modules, as a worker imports them
    started.tasks[synthesis.START].apply(args=[str(created.job_id)], throw=True)
    broken = {"queue": UnreachableBroker()} if outage == "broker" else {"queue": queue}
    if outage == "blob store":
        broken["storage"] = UnreachableStore(tmp_path / "blobs")
    app = make_celery(settings, models=tiny_models, **broken)

    # when: the sampling task runs, and cannot send its next task or read its inputs
    name, args = queue.pending.popleft()
    result = app.tasks[name].apply(args=list(args))

    # then: the task failed, but the job did not: it stays running, its lease running out,
    # for the sweep to resume once the outage is over
    assert isinstance(result.result, BrokerError | StorageUnavailable)
    job = service.job(created.job_id)
    assert (job.status, job.error, job.attempts) == ("running", None, 1)
    assert job.lease_expires_at is not None
