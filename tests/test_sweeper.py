"""The sweeper removes what faults leave behind (orphaned blobs, unfinished samples of jobs
long ended, old idempotency records) and recovers lost jobs, once however many sweep, and
never touches anything referenced or in flight. On SQLite and PostgreSQL."""

from __future__ import annotations

import os
import socket
import threading
import uuid
from collections.abc import Iterator, Sequence
from contextlib import AbstractContextManager
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import delete, select, update
from sqlalchemy.orm import Session
from typer.testing import CliRunner

from service.cli import app as cli
from service.contexts import sweeper
from service.db import session_scope
from service.models import (
    IdempotencyRecord,
    Job,
    Sample,
    SegClass,
    Training,
    WorkerHeartbeat,
    utcnow,
)
from service.queue import RecordingQueue
from service.settings import Settings
from service.storage import (
    BlobInfo,
    Storage,
    class_key,
    class_prefix,
    sample_key,
    shot_key,
    training_key,
)
from tests.api_support import Api, add_class, add_embedding, add_sample, get_job_row, set_job

pytest_plugins = ["tests.api_support"]

HOUR = timedelta(hours=1)
MINUTE = timedelta(minutes=1)


def sessions_of(api: Api) -> sweeper.Sessions:
    def open_session() -> AbstractContextManager[Session]:
        return session_scope(api.app.state.session_factory)

    return open_session


def put(api: Api, *keys: str) -> None:
    for key in keys:
        api.storage.put(key, b"blob", content_type="application/octet-stream")


def add_training(api: Api, owner_id: uuid.UUID) -> uuid.UUID:
    with api.session() as session:
        training = Training(
            owner_id=owner_id, class_ids=[], architecture="deeplabv3", steps=1, batch_size=1,
            use_synthetic=True, copy_paste=False, compare_baseline=False,
        )  # fmt: skip
        session.add(training)
        session.commit()
        return training.id


def sample_indices(api: Api, class_id: uuid.UUID) -> list[int]:
    with api.session() as session:
        query = select(Sample.index).where(Sample.class_id == class_id).order_by(Sample.index)
        return list(session.scalars(query))


def test_orphaned_blobs_go_once_old_and_nothing_referenced_or_in_flight_does(api: Api) -> None:
    # given: a finished class with its blobs (sample rows, embedding, a remembered export
    # length), a training with its weights, a class still running, and other keys
    done, _ = add_class(api, owner_id=api.alice_id, status="succeeded")
    first = add_sample(api, done, 0)
    add_sample(api, done, 1)
    add_embedding(api, done, b"embedding")
    put(api, class_key(done, "exports/abc.length"))
    training = add_training(api, api.alice_id)
    put(api, training_key(training, "weights.zip"))
    running, _ = add_class(api, owner_id=api.bob_id, status="running")
    put(api, sample_key(running, 3, "image.png"))  # drawn, its row not written yet
    put(api, "notes/readme.txt", "classes/not-an-id/x.png")
    # ... and what faults left: the blobs of an upload whose rows never committed, of a
    # training deleted while its store was down, and a sample drawn by a job that then failed
    gone_class, gone_training = uuid.uuid4(), uuid.uuid4()
    orphans = [
        shot_key(gone_class, 0, "image.png"),
        shot_key(gone_class, 0, "mask.png"),
        training_key(gone_training, "checkpoint.bin"),
        sample_key(done, 9, "image.png"),
        sample_key(done, 9, "coarse_mask.npy"),
    ]
    put(api, *orphans)
    everything = set(api.blobs())
    sweep = {
        "sessions": sessions_of(api),
        "storage": api.storage,
        "grace_seconds": 3600,
    }

    # when: the sweeper runs while every blob is younger than the grace period
    young = sweeper.remove_orphaned_blobs(**sweep)  # type: ignore[arg-type]
    # then: nothing goes (each could be an upload in flight)
    assert young == []
    assert set(api.blobs()) == everything

    # when: it looks again two hours on, first dry
    later = utcnow() + 2 * HOUR
    listed = sweeper.remove_orphaned_blobs(**sweep, now=later, dry_run=True)  # type: ignore[arg-type]
    assert sorted(listed) == sorted(orphans)
    assert set(api.blobs()) == everything
    removed = sweeper.remove_orphaned_blobs(**sweep, now=later)  # type: ignore[arg-type]

    # then: exactly the orphans are deleted; every referenced blob, the running class's
    # sample in flight, and keys outside the known layouts are kept
    assert sorted(removed) == sorted(orphans)
    assert set(api.blobs()) == everything - set(orphans)
    assert api.alice.get(f"/v1/samples/{first}/image").status_code == 200
    # and: a second sweep finds nothing more
    assert sweeper.remove_orphaned_blobs(**sweep, now=later) == []  # type: ignore[arg-type]


def test_thumbnails_of_samples_that_no_longer_exist_go_once_old(api: Api) -> None:
    # given: a finished class whose samples 0 and 1 the dashboard drew at both sizes, and a
    # shot thumbnail; then sample 1's row and blobs go (as removed by hand, or by a fault)
    done, _ = add_class(api, owner_id=api.alice_id, status="succeeded")
    kept_sample = add_sample(api, done, 0)
    removed_sample = add_sample(api, done, 1)
    for sample_id in (kept_sample, removed_sample):
        for size in (128, 512):
            url = f"/admin/samples/{sample_id}/thumbnail?size={size}"
            assert api.admin.get(url).status_code == 200
    shot_thumbnail = class_key(done, "thumbnails/shot-00-128.jpg")
    put(api, shot_thumbnail)
    with api.session() as session:
        session.execute(delete(Sample).where(Sample.id == removed_sample))
        session.commit()
    api.storage.delete_prefix(f"{class_prefix(done)}samples/00001/")
    # ... and a running class with a thumbnail at an index its job is drawing again
    running, _ = add_class(api, owner_id=api.bob_id, status="running")
    in_flight = class_key(running, "thumbnails/sample-00003-128.jpg")
    put(api, in_flight)
    everything = set(api.blobs())
    stale = [
        class_key(done, "thumbnails/sample-00001-128.jpg"),
        class_key(done, "thumbnails/sample-00001-512.jpg"),
    ]
    assert set(stale) <= everything
    sweep = {"sessions": sessions_of(api), "storage": api.storage, "grace_seconds": 3600}

    # when: the sweeper runs while the thumbnails are younger than the grace period
    # then: none goes
    assert sweeper.remove_orphaned_blobs(**sweep) == []  # type: ignore[arg-type]
    assert set(api.blobs()) == everything

    # when: it runs two hours on
    removed = sweeper.remove_orphaned_blobs(**sweep, now=utcnow() + 2 * HOUR)  # type: ignore[arg-type]

    # then: exactly the removed sample's thumbnails are gone; the existing sample's, the
    # shot's and the running class's stay
    assert sorted(removed) == sorted(stale)
    assert set(api.blobs()) == everything - set(stale)
    assert api.admin.get(f"/admin/samples/{kept_sample}/thumbnail?size=128").status_code == 200
    assert set(api.blobs(f"{class_prefix(done)}thumbnails/")) == {
        class_key(done, "thumbnails/sample-00000-128.jpg"),
        class_key(done, "thumbnails/sample-00000-512.jpg"),
        shot_thumbnail,
    }


def test_unfinished_samples_go_only_after_their_failed_job_s_retention(api: Api) -> None:
    # given: a class whose job failed 8 days ago with 2 finalized and 2 unfinished samples,
    # one that failed yesterday, and one that succeeded long ago
    long_ago = utcnow() - timedelta(days=8)
    old_failure, old_job = add_class(api, owner_id=api.alice_id, status="failed")
    recent_failure, recent_job = add_class(api, owner_id=api.alice_id, status="failed")
    succeeded, done_job = add_class(api, owner_id=api.bob_id, status="succeeded")
    for class_id in (old_failure, recent_failure, succeeded):
        for index in range(4):
            add_sample(api, class_id, index, finalized=index < 2 or class_id == succeeded)
    set_job(api, old_job, finished_at=long_ago)
    set_job(api, recent_job, finished_at=utcnow() - timedelta(days=1))
    set_job(api, done_job, finished_at=long_ago)
    with api.session() as session:
        session.execute(update(SegClass).values(num_samples_done=4))
        session.commit()

    # when: the sweeper runs with a 7-day retention
    removed = sweeper.remove_stale_samples(
        sessions=sessions_of(api), storage=api.storage, retention_seconds=7 * 24 * 3600
    )

    # then: the long-failed class's unfinished samples are gone, rows and blobs
    assert removed == [(old_failure, 2), (old_failure, 3)]
    assert sample_indices(api, old_failure) == [0, 1]
    assert api.blobs(f"classes/{old_failure}/samples/00002") == []
    assert api.blobs(f"classes/{old_failure}/samples/00001") != []
    with api.session() as session:
        assert session.get(SegClass, old_failure).num_samples_done == 2  # type: ignore[union-attr]
    # and: the recent failure keeps its work for a retry; the succeeded class is untouched
    assert sample_indices(api, recent_failure) == [0, 1, 2, 3]
    assert sample_indices(api, succeeded) == [0, 1, 2, 3]


def test_idempotency_records_expire_after_their_ttl(api: Api) -> None:
    # given: a record from two days ago and one from an hour ago
    with api.session() as session:
        for key, age in (("old", timedelta(days=2)), ("new", HOUR)):
            session.add(
                IdempotencyRecord(
                    owner_id=api.alice_id, key=key, request_hash="h", status_code=202,
                    body="{}", created_at=utcnow() - age,
                )
            )  # fmt: skip
        session.commit()

    # when: records older than a day expire
    with session_scope(api.app.state.session_factory) as session:
        expired = sweeper.expire_idempotency_records(session, ttl_seconds=24 * 3600)

    # then: only the old one is gone
    assert expired == 1
    with api.session() as session:
        assert list(session.scalars(select(IdempotencyRecord.key))) == ["new"]


def sweep_at_once(
    api: Api, queue: RecordingQueue, settings: Settings, *, sweepers: int
) -> tuple[list[sweeper.JobRecovery], list[BaseException]]:
    """`recover_jobs` in `sweepers` threads released together (workers `w:0`, `w:1`, …): what
    each did, and what any raised."""
    barrier = threading.Barrier(sweepers)
    reports: list[sweeper.JobRecovery] = []
    errors: list[BaseException] = []

    def sweep_now(number: int) -> None:
        barrier.wait()
        try:
            reports.append(
                sweeper.recover_jobs(
                    sessions=sessions_of(api), queue=queue, settings=settings, worker=f"w:{number}"
                )
            )
        except BaseException as error:
            errors.append(error)

    threads = [threading.Thread(target=sweep_now, args=(n,)) for n in range(sweepers)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    return reports, errors


def test_sweepers_racing_recover_each_lost_job_once(api: Api) -> None:
    # given: a job whose worker died (lease expired) and a job whose start was lost
    _, lost = add_class(
        api, owner_id=api.alice_id, status="running", attempts=1,
        lease_expires_at=utcnow() - HOUR, worker="dead:1",
    )  # fmt: skip
    _, unstarted = add_class(api, owner_id=api.alice_id, status="queued")
    with api.session() as session:
        session.execute(update(Job).where(Job.id == unstarted).values(updated_at=utcnow() - HOUR))
        session.commit()
    queue = RecordingQueue()
    settings = api.settings.model_copy(update={"job_lease_seconds": 60})

    # when: eight workers sweep at the same moment
    _, errors = sweep_at_once(api, queue, settings, sweepers=8)

    # then: the lost job is taken over once (one attempt more) and resumed once; the
    # unstarted one is started once
    assert errors == []
    assert sorted(queue.sent) == sorted(
        [
            ("aligndiff.synthesis.resume", (str(lost),)),
            ("aligndiff.synthesis.start", (str(unstarted),)),
        ]
    )
    with api.session() as session:
        taken = session.get(Job, lost)
        assert taken is not None
        assert (taken.status, taken.attempts) == ("running", 2)
        assert taken.worker is not None and taken.worker.startswith("w:")
    # and: sweeping again at once sends nothing more
    sweeper.recover_jobs(sessions=sessions_of(api), queue=queue, settings=settings, worker="w")
    assert len(queue.sent) == 2


def add_heartbeat(
    api: Api,
    name: str,
    *,
    age: timedelta,
    job_id: uuid.UUID | None,
    hostname: str = "elsewhere",
    pid: int = 1,
) -> None:
    seen = utcnow() - age
    with api.session() as session:
        session.add(
            WorkerHeartbeat(
                name=name, hostname=hostname, pid=pid, started_at=seen - HOUR, last_seen_at=seen,
                current_job_id=job_id,
            )
        )  # fmt: skip
        session.commit()


def test_the_job_of_a_worker_gone_silent_is_taken_over_before_its_lease_runs_out(
    api: Api,
) -> None:
    # given: three running jobs whose leases run for another hour: one whose worker has not
    # beaten for 2 minutes, one whose worker beat just now, and one whose worker, on this host,
    # has not beaten for 2 minutes but whose process is alive (the machine slept); a silent
    # worker whose job has finished since; and a silent worker that was idle
    running = {"status": "running", "attempts": 1, "lease_expires_at": utcnow() + HOUR}
    _, dead_job = add_class(api, owner_id=api.alice_id, worker="dead:1", **running)
    _, live_job = add_class(api, owner_id=api.alice_id, worker="live:1", **running)
    _, slept_job = add_class(api, owner_id=api.alice_id, worker="slept:1", **running)
    here, alive = socket.gethostname(), os.getpid()
    add_heartbeat(api, "slept:1", age=2 * MINUTE, job_id=slept_job, hostname=here, pid=alive)
    _, finished_job = add_class(api, owner_id=api.bob_id, status="succeeded", worker="gone:1")
    add_heartbeat(api, "dead:1", age=2 * MINUTE, job_id=dead_job)
    add_heartbeat(api, "live:1", age=timedelta(seconds=1), job_id=live_job)
    add_heartbeat(api, "gone:1", age=2 * MINUTE, job_id=finished_job)
    add_heartbeat(api, "idle:1", age=10 * MINUTE, job_id=None)
    queue = RecordingQueue()
    settings = api.settings.model_copy(update={"worker_lost_after_seconds": 60})

    # when: eight workers sweep at the same moment
    reports, errors = sweep_at_once(api, queue, settings, sweepers=8)

    # then: the silent worker's job is taken over at once (an attempt counted) and resumed,
    # once; the live worker's job is left alone
    assert errors == []
    assert queue.sent == [("aligndiff.synthesis.resume", (str(dead_job),))]
    taken = get_job_row(api, dead_job)
    assert (taken.status, taken.attempts) == ("running", 2)
    assert taken.worker is not None and taken.worker.startswith("w:")
    assert get_job_row(api, live_job).worker == "live:1"
    assert get_job_row(api, slept_job).worker == "slept:1"
    assert get_job_row(api, finished_job).status == "succeeded"
    # and: each dead worker was forgotten by exactly one sweep, its row gone
    forgotten = sorted(lost.name for report in reports for lost in report.lost_workers)
    assert forgotten == ["dead:1", "gone:1", "idle:1"]
    with api.session() as session:
        assert sorted(session.scalars(select(WorkerHeartbeat.name))) == ["live:1", "slept:1"]


@pytest.fixture
def sweep_env(api: Api, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """`aligndiff sweep` pointed at the test's database and store."""
    monkeypatch.setenv("ALIGNDIFF_DATA_DIR", str(tmp_path))
    monkeypatch.setenv("ALIGNDIFF_DATABASE_URL", api.settings.resolved_database_url)
    monkeypatch.setenv("ALIGNDIFF_STORAGE_URL", f"file://{api.storage.root}")  # type: ignore[attr-defined]
    monkeypatch.setenv("ALIGNDIFF_BROKER_URL", "memory://")
    monkeypatch.setenv("ALIGNDIFF_ORPHAN_GRACE_SECONDS", "0")
    yield


def test_aligndiff_sweep_lists_when_dry_and_removes_otherwise(api: Api, sweep_env: None) -> None:
    # given: an orphaned blob, a job that lost its worker, and a worker silent for an hour
    orphan = shot_key(uuid.uuid4(), 0, "image.png")
    put(api, orphan)
    _, lost = add_class(
        api, owner_id=api.alice_id, status="running", attempts=1, lease_expires_at=utcnow() - HOUR
    )
    add_heartbeat(api, "dead:7", age=HOUR, job_id=lost)
    runner = CliRunner()

    # when: a dry run
    dry = runner.invoke(cli, ["sweep", "--dry-run"])

    # then: it says what it would do and does nothing
    assert dry.exit_code == 0, dry.output
    assert f"would delete orphaned blob {orphan}" in dry.output
    assert f"would resume job {lost}" in dry.output
    assert "would forget dead worker dead:7 (last seen " in dry.output
    assert api.blobs() == [orphan]
    with api.session() as session:
        assert session.get(Job, lost).attempts == 1  # type: ignore[union-attr]

    # when: a real run
    done = runner.invoke(cli, ["sweep"])

    # then: the blob is gone, the job taken over, and the summary says so
    assert done.exit_code == 0, done.output
    assert f"delete orphaned blob {orphan}" in done.output
    assert "forget dead worker dead:7 (last seen " in done.output
    assert f"ending the lease of job {lost}" in done.output
    assert "jobs: 1 resumed" in done.output and "orphaned blobs: 1" in done.output
    assert api.blobs() == []
    with api.session() as session:
        assert session.get(Job, lost).attempts == 2  # type: ignore[union-attr]


class ListingWatch:
    """The store, counting the blobs its listing has handed out, and that count at each
    delete."""

    def __init__(self, storage: Storage) -> None:
        self._storage = storage
        self.listed = 0
        self.listed_at_deletes: list[int] = []

    def __getattr__(self, name: str) -> Any:
        return getattr(self._storage, name)

    def list_blobs(self, prefix: str) -> Iterator[BlobInfo]:
        for blob in self._storage.list_blobs(prefix):
            self.listed += 1
            yield blob

    def delete_keys(self, keys: Sequence[str]) -> int:
        self.listed_at_deletes.append(self.listed)
        return self._storage.delete_keys(keys)


def test_orphaned_blobs_are_judged_owner_by_owner_as_the_listing_streams(api: Api) -> None:
    # given: 3 deleted classes of 4 blobs each, and a live class's blobs listed among theirs
    gone = sorted(uuid.uuid4() for _ in range(3))
    live, _ = add_class(api, owner_id=api.alice_id, status="succeeded")
    add_sample(api, live, 0)
    for class_id in gone:
        put(api, *[shot_key(class_id, n, name) for n in (0, 1) for name in ("a.png", "b.png")])
    listing = api.blobs("classes")
    watch = ListingWatch(api.storage)

    # when: the sweeper removes orphans
    removed = sweeper.remove_orphaned_blobs(
        sessions=sessions_of(api),
        storage=watch,  # type: ignore[arg-type]
        grace_seconds=3600,
        now=utcnow() + 2 * HOUR,
    )

    # then: each class's 4 blobs went in one delete, made as soon as the listing had handed out
    # the blob after its last (the store is never held whole)
    assert len(removed) == 12 and not any(api.blobs(class_prefix(c)) for c in gone)
    last = [
        max(i for i, key in enumerate(listing) if key.startswith(class_prefix(c))) for c in gone
    ]
    assert watch.listed_at_deletes == [min(i + 2, len(listing)) for i in last]
