"""One holder per job: a worker's writes carry the claim it works under and are refused once
the job was claimed again (`Fenced`), and a fenced worker abandons its task having changed
nothing stored. The state machine on SQLite and PostgreSQL; then two worker contexts on
PostgreSQL, the first resuming after the second took its job over and finished it."""

from __future__ import annotations

import hashlib
import logging
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select, update
from sqlalchemy.orm import Session

from aligndiff.synth import Models
from service.contexts import jobs, sweeper
from service.db import db_now, session_scope
from service.models import Job, SegClass
from service.settings import Settings
from service.storage import LocalStorage, StorageUnavailable, class_prefix
from tests.api_support import Api, add_class
from tests.conftest import SHOTS_DIR
from tests.worker_support import (
    CreatedClass,
    InProcessQueue,
    Service,
    create_class,
    give_embedding,
    token_embedding,
)
from worker import synthesis
from worker.celery_app import AlignDiffCelery, make_celery

pytest_plugins = ["tests.api_support"]

DOG = SHOTS_DIR / "dog"
FENCED = "fenced: job {} was claimed again"


@contextmanager
def transaction(api: Api) -> Iterator[Session]:
    with session_scope(api.app.state.session_factory) as session:
        yield session


def job_state(session: Session, job_id: uuid.UUID) -> tuple[Any, ...]:
    """Every column of the job's row a worker's write could change."""
    return session.execute(
        select(
            Job.status, Job.stage, Job.progress, Job.attempts, Job.claim, Job.worker,
            Job.lease_expires_at, Job.finished_at, Job.error, Job.updated_at,
        ).where(Job.id == job_id)
    ).one()  # fmt: skip


def expire_lease(session: Session, job_id: uuid.UUID) -> None:
    """The holder's lease ran out (by the database's clock): it is cut off, or paused."""
    session.execute(update(Job).where(Job.id == job_id).values(lease_expires_at=db_now(-1)))


def test_a_stale_holder_s_writes_are_refused_once_its_job_is_claimed_again(api: Api) -> None:
    # given: a job claimed by worker A, whose lease then ran out, and claimed by worker B
    _, job_id = add_class(api, owner_id=api.alice_id, status="queued")
    claim = {"lease_seconds": 60, "max_attempts": 3}
    with transaction(api) as session:
        first = jobs.claim(session, job_id, worker="a:1", **claim)
    with transaction(api) as session:
        expire_lease(session, job_id)
    with transaction(api) as session:
        second = jobs.claim(session, job_id, worker="b:1", **claim)
    assert (first, second) == (1, 2)
    assert first is not None and second is not None
    with transaction(api) as session:
        before = job_state(session, job_id)

    # when: A, resumed, writes under claim 1 (each write in a transaction of its own)
    writes: dict[str, Callable[[Session], object]] = {
        "progress": lambda session: jobs.report_progress(
            session, job_id, stage="sampling", progress=0.5, lease_seconds=600, claim=first
        ),
        "stage": lambda session: jobs.advance_stage(
            session, job_id, stage="annotation", claim=first
        ),
        "complete": lambda session: jobs.complete(session, job_id, claim=first),
        "fail": lambda session: jobs.fail(session, job_id, "boom", claim=first),
        "cancelled": lambda session: jobs.finish_cancelled(session, job_id, claim=first),
        "hold": lambda session: jobs.hold(session, job_id, claim=first),
    }
    for name, write in writes.items():
        # then: each is refused, naming the job and both claims
        refusal = pytest.raises(jobs.Fenced, match=r"is at claim 2; this worker held 1")
        with refusal as refused, transaction(api) as session:
            write(session)
        assert refused.value.job_id == job_id, name

    # and: nothing of the job's row changed, not even its lease
    with transaction(api) as session:
        assert job_state(session, job_id) == before
    # and: B's writes under claim 2 go through
    with transaction(api) as session:
        assert jobs.report_progress(
            session, job_id, stage="sampling", progress=0.5, lease_seconds=600, claim=second
        )
    with transaction(api) as session:
        assert jobs.complete(session, job_id, claim=second)
    with transaction(api) as session:
        done = session.get(Job, job_id)
        assert done is not None and (done.status, done.claim, done.attempts) == ("succeeded", 2, 2)


def test_claims_count_on_across_retries_while_attempts_start_again(api: Api) -> None:
    # given: a job claimed, failed and retried
    _, job_id = add_class(api, owner_id=api.alice_id, status="queued")
    claim: dict[str, Any] = {"worker": "a:1", "lease_seconds": 60, "max_attempts": 3}
    with transaction(api) as session:
        first = jobs.claim(session, job_id, **claim)
    with transaction(api) as session:
        assert jobs.fail(session, job_id, "boom", claim=first)
    with transaction(api) as session:
        job = session.get(Job, job_id)
        assert job is not None
        jobs.retry(session, job)

    # when: a worker claims it again
    with transaction(api) as session:
        again = jobs.claim(session, job_id, **claim)

    # then: its attempts start again, its claim does not: the worker of the failed run, were
    # it still writing, is fenced off the retried one
    with transaction(api) as session:
        job = session.get(Job, job_id)
        assert job is not None and (job.attempts, job.claim) == (1, 2)
    assert (first, again) == (1, 2)
    with pytest.raises(jobs.Fenced), transaction(api) as session:
        jobs.report_progress(
            session, job_id, stage="sampling", progress=0.1, lease_seconds=60, claim=first
        )


# --- two worker contexts on PostgreSQL --------------------------------------------------------


class TakenOverOnce(LocalStorage):
    """Worker A's blob store: as A first writes a blob whose key ends with `suffix`, it has
    been paused (or cut off) long enough for worker B to take its job over and finish it
    (`takeover`); then A's write goes on, and A with it."""

    def __init__(self, root: Path, suffix: str) -> None:
        super().__init__(root)
        self.suffix = suffix
        self.takeover: Callable[[], None] | None = None

    def put(self, key: str, data: bytes, *, content_type: str) -> None:
        if self.takeover is not None and key.endswith(self.suffix):
            takeover, self.takeover = self.takeover, None
            takeover()
        super().put(key, data, content_type=content_type)


def worker(settings: Settings, models: Models, **context: Any) -> tuple[AlignDiffCelery, Any]:
    queue = InProcessQueue()
    app = make_celery(settings, queue=queue, models=models, **context)
    app.loader.import_default_modules()
    return app, queue


def stored(service: Service, class_id: uuid.UUID) -> dict[str, str]:
    """Every blob of the class with its content's hash."""
    return {
        key: hashlib.sha256(service.storage.get(key)).hexdigest()
        for key in service.storage.list_keys(class_prefix(class_id))
    }


def samples_state(service: Service, class_id: uuid.UUID) -> list[tuple[Any, ...]]:
    return [
        (s.index, s.id, s.image_key, s.mask_key, s.finalized_at, s.accepted)
        for s in service.samples(class_id)
    ]


@pytest.fixture
def two_workers(
    tmp_path: Path, postgres_url: str, tiny_models: Models
) -> Iterator[Callable[[str], tuple[Service, Any, Any, TakenOverOnce]]]:
    """Worker A (its store takes its job over to B at the first write of a key ending with
    the suffix given) and worker B, in this process, on PostgreSQL and one blob folder."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    engines: list[Any] = []

    def build(suffix: str) -> tuple[Service, Any, Any, TakenOverOnce]:
        settings = Settings(
            data_dir=tmp_path,
            database_url=postgres_url,
            broker_url="memory://",
            storage_url=f"file://{tmp_path / 'blobs'}",
            sample_chunk_size=2,
            annotation_chunk_size=2,
        )
        service = Service.create(settings)
        store = TakenOverOnce(tmp_path / "blobs", suffix)
        a = worker(settings, tiny_models, storage=store)
        b = worker(settings, tiny_models)
        engines.extend(app.context.engine for app, _ in (a, b))
        return service, a, b, store

    yield build
    torch.set_num_threads(threads)
    for engine in engines:
        engine.dispose()


def take_over_and_finish(
    service: Service,
    created: CreatedClass,
    b: tuple[AlignDiffCelery, InProcessQueue],
    ends: dict[str, Any],
) -> Callable[[], None]:
    """What happens while A is away: its lease runs out, B's sweep takes the job over, and B
    runs it to its end; `ends` gets what was stored then (the job's row, the samples' rows,
    the class's blobs and its embedding key)."""

    def takeover() -> None:
        app, queue = b
        with service.session() as session:
            expire_lease(session, created.job_id)
        recovery = sweeper.recover_jobs(
            sessions=app.context.session,
            queue=queue,
            settings=app.context.settings,
            worker="b:1",
        )
        assert recovery.resumed == [created.job_id]
        queue.drain(app)
        assert service.job(created.job_id).status == "succeeded"
        with service.session() as session:
            ends["job"] = job_state(session, created.job_id)
        ends["blobs"] = stored(service, created.class_id)
        ends["samples"] = samples_state(service, created.class_id)
        ends["embedding_key"] = service.segclass(created.class_id).embedding_key

    return takeover


def test_a_holder_resuming_mid_inversion_after_a_takeover_abandons_and_changes_nothing(
    two_workers: Callable[[str], tuple[Service, Any, Any, TakenOverOnce]],
    caplog: pytest.LogCaptureFixture,
) -> None:
    # given: worker A starts a class's synthesis, and as it is about to store the embedding
    # it learned, it is paused; meanwhile worker B takes the job over, learns the class's
    # embedding again, draws its 4 samples with it and completes the job
    service, (a_app, a_queue), b, store = two_workers("embedding.safetensors")
    created = create_class(service, DOG, name="dog", num_samples=4)
    ends: dict[str, Any] = {}
    store.takeover = take_over_and_finish(service, created, b, ends)

    # when: A resumes, stores its embedding and goes on
    with caplog.at_level(logging.WARNING, logger="worker.tasks"):
        a_app.tasks[synthesis.START].apply(args=[str(created.job_id)], throw=True)
        a_queue.drain(a_app)

    # then: A was fenced at its next write, and abandoned its task, saying so
    assert FENCED.format(created.job_id) in caplog.text
    assert "abandoning task aligndiff.synthesis.start" in caplog.text
    assert not a_queue.sent.get(synthesis.SAMPLE_CHUNK)
    # and: the job's row, the samples and the class's embedding are what B left
    with service.session() as session:
        assert job_state(session, created.job_id) == ends["job"]
    job = service.job(created.job_id)
    assert (job.status, job.claim, job.attempts) == ("succeeded", 2, 2)
    assert samples_state(service, created.class_id) == ends["samples"]
    segclass = service.segclass(created.class_id)
    assert segclass.embedding_key == ends["embedding_key"]
    assert (
        segclass.embedding_key == f"{class_prefix(created.class_id)}claims/2/embedding.safetensors"
    )
    # and: A's embedding went under its own claim's key, replacing no blob B's rows name
    blobs = stored(service, created.class_id)
    a_embedding = f"{class_prefix(created.class_id)}claims/1/embedding.safetensors"
    assert set(blobs) == set(ends["blobs"]) | {a_embedding}
    assert {key: blobs[key] for key in ends["blobs"]} == ends["blobs"]

    # when: the sweeper looks for orphans once the job has ended
    removed = sweeper.remove_orphaned_blobs(
        sessions=service.session, storage=service.storage, grace_seconds=0
    )

    # then: A's embedding, which no row names, goes; everything B's rows name stays
    assert removed == [a_embedding]
    assert stored(service, created.class_id) == ends["blobs"]


def test_a_holder_resuming_mid_sample_after_a_takeover_abandons_and_changes_nothing(
    two_workers: Callable[[str], tuple[Service, Any, Any, TakenOverOnce]],
    tiny_models: Models,
    caplog: pytest.LogCaptureFixture,
) -> None:
    # given: worker A draws a class's samples (its token learned already), and as it stores
    # its first one it is paused; meanwhile worker B takes the job over and completes it
    service, (a_app, a_queue), b, store = two_workers("image.png")
    created = create_class(service, DOG, name="dog", num_samples=4)
    give_embedding(service, created.class_id, token_embedding(tiny_models, "<dog>"), "<dog>")
    ends: dict[str, Any] = {}
    store.takeover = take_over_and_finish(service, created, b, ends)
    a_app.tasks[synthesis.START].apply(args=[str(created.job_id)], throw=True)
    assert a_queue.sent[synthesis.SAMPLE_CHUNK] == 2

    # when: A resumes its chunk (and then runs what its queue still holds)
    with caplog.at_level(logging.WARNING, logger="worker.tasks"):
        a_queue.drain(a_app)

    # then: A was fenced before it wrote the sample's row, and abandoned its chunk
    assert FENCED.format(created.job_id) in caplog.text
    assert "abandoning task aligndiff.synthesis.sample_chunk" in caplog.text
    # and: the job, its 4 samples and every blob are as B left them (A's image, drawn from
    # the same embedding and seed, has the same bits)
    with service.session() as session:
        assert job_state(session, created.job_id) == ends["job"]
        rows = session.scalar(
            select(SegClass.num_samples_done).where(SegClass.id == created.class_id)
        )
    assert rows == 4
    assert [s[0] for s in ends["samples"]] == [0, 1, 2, 3]
    assert samples_state(service, created.class_id) == ends["samples"]
    assert stored(service, created.class_id) == ends["blobs"]


class TakenOverThenUnreachable(TakenOverOnce):
    """Worker A's blob store: as A first writes a blob whose key ends with `suffix`, its job is
    taken over (`takeover`), and the write fails: the store was unreachable meanwhile."""

    def put(self, key: str, data: bytes, *, content_type: str) -> None:
        if self.takeover is not None and key.endswith(self.suffix):
            takeover, self.takeover = self.takeover, None
            takeover()
            raise StorageUnavailable(f"could not connect to the endpoint to write {key}")
        super().put(key, data, content_type=content_type)


def test_a_task_that_meets_an_outage_after_its_job_was_taken_over_says_it_was_fenced(
    tmp_path: Path,
    postgres_url: str,
    tiny_models: Models,
    caplog: pytest.LogCaptureFixture,
) -> None:
    # given: worker A draws a class's samples, and as it stores its first one its job is
    # taken over and finished by worker B, and A's blob store is unreachable
    settings = Settings(
        data_dir=tmp_path,
        database_url=postgres_url,
        broker_url="memory://",
        storage_url=f"file://{tmp_path / 'blobs'}",
        sample_chunk_size=4,
    )
    service = Service.create(settings)
    store = TakenOverThenUnreachable(tmp_path / "blobs", "image.png")
    a_app, a_queue = worker(settings, tiny_models, storage=store)
    b = worker(settings, tiny_models)
    created = create_class(service, DOG, name="dog", num_samples=2)
    give_embedding(service, created.class_id, token_embedding(tiny_models, "<dog>"), "<dog>")
    ends: dict[str, Any] = {}
    store.takeover = take_over_and_finish(service, created, b, ends)
    a_app.tasks[synthesis.START].apply(args=[str(created.job_id)], throw=True)

    # when: A's chunk fails on the store
    name, args = a_queue.pending.popleft()
    with caplog.at_level(logging.WARNING, logger="worker.tasks"):
        result = a_app.tasks[name].apply(args=list(args))

    # then: the task failed on the outage, and A says it was fenced off the job (and so
    # leaves it, rather than to the sweep); the job is as B left it
    assert isinstance(result.result, StorageUnavailable)
    assert FENCED.format(created.job_id) in caplog.text
    assert "it met an outage meanwhile" in caplog.text
    with service.session() as session:
        assert job_state(session, created.job_id) == ends["job"]
    for app in (a_app, b[0]):
        app.context.engine.dispose()
