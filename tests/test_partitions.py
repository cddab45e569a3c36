"""Faults across hosts: real worker processes (`aligndiff worker`), each on a host of its own (a
network namespace and hostname, `tests.netns_support`), reach PostgreSQL, Redis and the S3
endpoint (moto), which stay here, over a veth pair.

- A worker cut off from all three (its link down: packets dropped) or frozen (SIGSTOP) mid-
  inversion or mid-sampling for longer than the takeover time has its job taken over by the
  other; healed (SIGCONT), it is fenced and abandons its task. The job ends `succeeded` with
  exactly the requested samples, each sample's blobs those its row and the class's single
  embedding make, the stage history monotone.
- A worker on a host whose clock runs 2 minutes or 2 hours ahead or behind (Debian's
  faketime) takes over no live worker's job and deletes no young blob, and still takes a dead
  worker's job over in time.

Needs root (skipped otherwise, saying so); every namespace and link is removed afterwards.
"""

from __future__ import annotations

import io
import re
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import boto3
import numpy as np
import pytest
import torch
from PIL import Image
from sqlalchemy import func, select

from aligndiff.inversion import load_embedding
from aligndiff.prompts import prompt_bank
from aligndiff.sampling import Sampler
from aligndiff.synth import Models, SynthConfig
from service.contexts import jobs
from service.contexts.jobs import STAGES, TERMINAL
from service.db import make_engine, make_session_factory
from service.models import Base, Job, Sample
from service.settings import Settings
from service.storage import make_storage
from tests.conftest import SHOTS_DIR
from tests.fault_support import AWS_TEST_ENVIRONMENT, PrivateRedis, moto_server, require_tool
from tests.netns_support import Host, HostedWorker, hosts, require_namespaces
from tests.worker_support import (
    CreatedClass,
    Service,
    create_class,
    give_embedding,
    token_embedding,
    wait_for,
    worker_env,
)
from worker import synthesis
from worker.celery_app import make_celery

pytestmark = pytest.mark.slow

DOG = SHOTS_DIR / "dog"
HEARTBEAT, LOST_AFTER, SWEEP = 0.5, 3.0, 0.5
# From a worker's last beat to the sweep that takes its job over, at the most.
TAKEOVER = LOST_AFTER + 1.25 * SWEEP


@dataclass
class Stack:
    """PostgreSQL (the session's database), a private Redis and a moto S3 endpoint on this
    machine's loopback, and the service's view of them."""

    service: Service
    settings: Settings
    model_cache: Path
    folder: Path
    s3: Any
    # Jobs a test leaves running: ended afterwards, so that no later test's sweep takes
    # them up (the database is the session's).
    created: list[uuid.UUID] = field(default_factory=list)

    def worker_env(self, host: Host, **extra: str) -> dict[str, str]:
        """The environment of a worker on `host`: every server through its link."""
        hosted = self.settings.model_copy(
            update={
                "database_url": host.reach(self.settings.resolved_database_url),
                "broker_url": host.reach(self.settings.resolved_broker_url),
            }
        )
        assert self.settings.s3_endpoint_url is not None
        return worker_env(
            hosted,
            self.model_cache,
            ALIGNDIFF_S3_ENDPOINT_URL=host.reach(self.settings.s3_endpoint_url),
            ALIGNDIFF_WORKER_HEARTBEAT_SECONDS=str(HEARTBEAT),
            ALIGNDIFF_WORKER_LOST_AFTER_SECONDS=str(LOST_AFTER),
            ALIGNDIFF_SWEEP_INTERVAL_SECONDS=str(SWEEP),
            **AWS_TEST_ENVIRONMENT,
            **extra,
        )

    def start(self, job_id: uuid.UUID) -> None:
        make_celery(self.settings).send_task(synthesis.START, args=[str(job_id)])


@pytest.fixture
def stack(
    tmp_path: Path,
    postgres_url: str,
    model_cache: Path,
    tiny_models: Models,
    monkeypatch: pytest.MonkeyPatch,
) -> Iterator[Stack]:
    require_namespaces()
    for name, value in AWS_TEST_ENVIRONMENT.items():
        monkeypatch.setenv(name, value)
    threads = torch.get_num_threads()
    # NOTE: one thread, as the workers run: a sample drawn again here has their bits.
    torch.set_num_threads(1)
    with PrivateRedis.running(tmp_path) as redis, moto_server() as endpoint:
        s3 = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1")
        s3.create_bucket(Bucket="blobs")
        settings = Settings(
            data_dir=tmp_path,
            database_url=postgres_url,
            broker_url=redis.url,
            storage_url="s3://blobs/aligndiff",
            s3_endpoint_url=endpoint,
            sample_chunk_size=1,
            annotation_chunk_size=4,
            worker_heartbeat_seconds=HEARTBEAT,
            worker_lost_after_seconds=LOST_AFTER,
        )
        engine = make_engine(postgres_url)
        Base.metadata.create_all(engine)
        service = Service(
            settings,
            make_session_factory(engine),
            make_storage(settings.resolved_storage_url, endpoint_url=endpoint),
        )
        built = Stack(service, settings, model_cache, tmp_path, s3)
        try:
            yield built
        finally:
            with service.session() as session:
                for job_id in built.created:
                    jobs.fail(session, job_id, "the test is over")
            engine.dispose()
            torch.set_num_threads(threads)


@pytest.fixture
def workers() -> Iterator[list[HostedWorker]]:
    """The workers a test starts, killed afterwards (before their hosts are removed)."""
    started: list[HostedWorker] = []
    yield started
    for worker in started:
        worker.resume()  # a frozen process group is not killed until it runs again
        worker.kill()
        worker.stop()


@dataclass
class JobWatch:
    """Every state a job's row went through, polled from here every 0.1 s."""

    service: Service
    job_id: uuid.UUID
    history: list[tuple[str, str | None, float, int, str | None]] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)

    def __post_init__(self) -> None:
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            job = self.service.job(self.job_id)
            state = (job.status, job.stage, job.progress, job.claim, job.worker)
            if not self.history or self.history[-1] != state:
                self.history.append(state)
            self._stop.wait(0.1)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)


def holder(workers: list[HostedWorker], job: Job) -> HostedWorker | None:
    """The worker the job's row names (`host:pid`, host its own hostname)."""
    name = (job.worker or "").split(":")[0]
    return next((worker for worker in workers if worker.hostname == name), None)


def drawing(worker: HostedWorker, job_id: uuid.UUID) -> int | None:
    """The sample the worker's log last said it was drawing for the job."""
    found = re.findall(rf"job {job_id}: drawing samples (\d+)$", worker.text(), re.MULTILINE)
    return int(found[-1]) if found else None


def mid_inversion(stack: Stack, created: CreatedClass, workers: list[HostedWorker]) -> Any:
    def check() -> HostedWorker | None:
        job = stack.service.job(created.job_id)
        return holder(workers, job) if job.stage == "inversion" else None

    return check


def mid_sampling(stack: Stack, created: CreatedClass, workers: list[HostedWorker]) -> Any:
    def check() -> HostedWorker | None:
        stored = {s.index for s in stack.service.samples(created.class_id)}
        for worker in workers:
            index = drawing(worker, created.job_id)
            if index is not None and index not in stored and len(stored) >= 1:
                return worker
        return None

    return check


MOMENTS = {"inversion": mid_inversion, "sampling": mid_sampling}


class Fault:
    """How a worker goes away and comes back: its host cut off and healed, or its process
    group frozen and thawed."""

    def __init__(self, kind: str) -> None:
        self.kind = kind

    def away(self, worker: HostedWorker) -> None:
        worker.host.cut() if self.kind == "partition" else worker.pause()

    def back(self, worker: HostedWorker) -> None:
        worker.host.heal() if self.kind == "partition" else worker.resume()

    @property
    def at_least(self) -> float:
        """How long it stays away: longer than the takeover time (a partition), or twice it
        (a pause)."""
        return TAKEOVER + 1 if self.kind == "partition" else 2 * TAKEOVER


def assert_samples_are_what_rows_and_embedding_make(
    stack: Stack, created: CreatedClass, models: Models, num_samples: int
) -> None:
    """Exactly `num_samples` samples, one per index, and each one's image and coarse mask
    bit for bit what its row (prompt, seed) and the class's single embedding draw."""
    service = stack.service
    samples = service.samples(created.class_id)
    assert [s.index for s in samples] == list(range(num_samples))
    with service.session() as session:
        rows = session.scalar(
            select(func.count()).select_from(Sample).where(Sample.class_id == created.class_id)
        )
    assert rows == num_samples
    segclass = service.segclass(created.class_id)
    assert segclass.embedding_key is not None
    path = stack.folder / "embedding.safetensors"
    path.write_bytes(service.storage.get(segclass.embedding_key))
    token, vector = load_embedding(path)
    assert token == segclass.token
    specs = prompt_bank(
        segclass.name,
        num_samples=num_samples,
        class_seed=segclass.seed,
        prompts=list(segclass.prompts or []),
        prompt_style=segclass.prompt_style,  # type: ignore[arg-type]
    )
    config = SynthConfig.from_settings(stack.settings).sampling
    sampler = Sampler(
        models.diffusion, class_name=segclass.name, token_embedding=vector, config=config
    )
    for sample in samples:
        spec = specs[sample.index]
        assert (sample.prompt, sample.seed) == (spec.prompt, spec.seed)
        (drawn,) = sampler.generate([spec])
        image = np.asarray(Image.open(io.BytesIO(service.storage.get(sample.image_key))))
        coarse = np.load(io.BytesIO(service.storage.get(sample.coarse_mask_key)))
        assert np.array_equal(image, drawn.image), sample.index
        assert np.array_equal(coarse, drawn.coarse_mask), sample.index


def assert_monotone(history: list[tuple[str, str | None, float, int, str | None]]) -> None:
    """The stage only went forward and the progress only up, through every takeover."""
    order: dict[str | None, int] = {None: -1, **{stage: n for n, stage in enumerate(STAGES)}}
    running = [
        (order[stage], progress) for status, stage, progress, _, _ in history if status == "running"
    ]
    stages = [stage for stage, _ in running]
    progress = [value for _, value in running]
    assert stages == sorted(stages), history
    assert progress == sorted(progress), history


# Each way of going away and each moment once (the pairs cost ~15 s each): a partition cuts
# the worker's connections mid-inversion; a pause leaves them open, so the worker resumes
# mid-sampling with its writes to fence.
@pytest.mark.parametrize(("kind", "moment"), [("partition", "inversion"), ("pause", "sampling")])
def test_a_worker_away_mid_job_is_fenced_and_its_job_ends_once_on_the_other(
    stack: Stack,
    workers: list[HostedWorker],
    tiny_models: Models,
    kind: str,
    moment: str,
) -> None:
    num_samples = 4 if moment == "inversion" else 8
    fault = Fault(kind)
    with hosts("a", "b") as (a, b):
        # given: two workers, each on a host of its own, and a class to synthesize (its token
        # still to learn, or learned already)
        for host in (a, b):
            log = stack.folder / f"worker-{host.name}.log"
            workers.append(
                HostedWorker(host, stack.worker_env(host), log, hostname=f"worker-{host.name}")
            )
        for worker in workers:
            wait_for(worker.ready, timeout=120, what=f"{worker.hostname} to start", log=worker.log)
        created = create_class(stack.service, DOG, name="dog", num_samples=num_samples)
        stack.created.append(created.job_id)
        if moment == "sampling":
            embedding = token_embedding(tiny_models, "<dog>")
            give_embedding(stack.service, created.class_id, embedding, "<dog>")
        watch = JobWatch(stack.service, created.job_id)
        stack.start(created.job_id)

        # when: mid-inversion (or mid-sample), the worker at it goes away
        victim = wait_for(
            MOMENTS[moment](stack, created, workers),
            timeout=120,
            what=f"mid-{moment}",
            log=workers[0].log,
        )
        fault.away(victim)
        gone = time.monotonic()
        (other,) = [worker for worker in workers if worker is not victim]

        # then: the other worker takes its job over, and the job goes on there
        def taken_over() -> bool:
            job = stack.service.job(created.job_id)
            return job.claim >= 2 and holder(workers, job) is other

        wait_for(taken_over, timeout=60, what="the takeover", log=other.log)
        time.sleep(max(0.0, fault.at_least - (time.monotonic() - gone)))
        # when: the worker comes back
        fault.back(victim)

        # then: it is fenced at its next write and abandons its task, saying so
        fenced = f"fenced: job {created.job_id} was claimed again"
        wait_for(lambda: fenced in victim.text(), timeout=90, what="the fence", log=victim.log)

        # and: the job ends succeeded, on its second claim
        def ended() -> Job | None:
            job = stack.service.job(created.job_id)
            return job if job.status in TERMINAL else None

        job = wait_for(ended, timeout=180, what="the job to end", log=other.log)
        watch.stop()
        assert (job.status, job.attempts, job.claim) == ("succeeded", 2, 2), job.error
        assert "abandoning task" in victim.text()
    # and: exactly the requested samples, each what its row and the class's one embedding
    # make; the stage and progress never went back
    assert_samples_are_what_rows_and_embedding_make(stack, created, tiny_models, num_samples)
    assert_monotone(watch.history)


class YoungBlobs:
    """Orphans written every second (blobs whose rows are not written yet, as an upload's in
    flight), each remembered with when it was written."""

    def __init__(self, stack: Stack) -> None:
        self.stack = stack
        self.written: dict[str, float] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            key = f"classes/{uuid.uuid4()}/shots/00/image.png"
            self.stack.service.storage.put(key, b"in flight", content_type="image/png")
            self.written[key] = time.monotonic()
            self._stop.wait(1.0)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)

    def younger_than(self, seconds: float, *, at: float) -> list[str]:
        return [key for key, written in self.written.items() if at - written < seconds]


ORPHAN_GRACE = 10
# Starts of a worker under faketime: libfaketime now and then crashes a process as it starts
# (its wrapper says "Caught Segmentation fault"), before any of the service's code runs.
FAKETIME_STARTS = 3


def started_or_gone(worker: HostedWorker) -> bool:
    return worker.ready() or worker.process.poll() is not None


def start_skewed(
    stack: Stack, host: Host, offset: str, faketime: str, workers: list[HostedWorker]
) -> HostedWorker:
    """A worker on `host` whose clock runs `offset` off (Debian's faketime), serving
    predictions only (so it draws none of a job's samples: it sweeps), listing the blob store
    at most every `ORPHAN_GRACE` s; started again should libfaketime crash it at start."""
    env = stack.worker_env(
        host,
        ALIGNDIFF_ORPHAN_GRACE_SECONDS=str(ORPHAN_GRACE),
        # NOTE: the wall clock runs off, not the monotonic one (libfaketime would also
        # stretch every timed wait by the offset): as on a machine without NTP.
        FAKETIME_DONT_FAKE_MONOTONIC="1",
    )
    for attempt in range(1, FAKETIME_STARTS + 1):
        skewed = HostedWorker(
            host,
            env,
            stack.folder / f"worker-s-{attempt}.log",
            hostname="worker-s",
            queues="aligndiff.predict",
            # NOTE: -m, the multi-threaded libfaketime (the worker runs threads).
            prefix=[faketime, "-m", "-f", offset],
        )
        workers.append(skewed)

        wait_for(partial(started_or_gone, skewed), timeout=120, what="worker-s to start")
        if skewed.ready():
            return skewed
        assert "Caught Segmentation fault" in skewed.text(), skewed.text()[-4000:]
        workers.remove(skewed)
        skewed.stop()
    raise AssertionError(f"libfaketime crashed worker-s at each of {FAKETIME_STARTS} starts")


# Ahead by more than the blob grace, and far behind. `tests/test_clock.py` runs the sweep's
# judgements at all four of ±2 minutes and ±2 hours; this is the same code across hosts.
@pytest.mark.parametrize("offset", ["+2m", "-2h"])
def test_a_worker_whose_clock_runs_off_takes_over_only_dead_workers_jobs_and_no_young_blob(
    stack: Stack,
    workers: list[HostedWorker],
    tiny_models: Models,
    offset: str,
) -> None:
    faketime = require_tool("faketime", package="faketime")
    with hosts("a", "s") as (a, s):
        # given: a worker on host a, and on host s a worker whose clock runs `offset` off
        # (it serves predictions only, so it draws none of the job's samples: it sweeps),
        # listing the blob store at most every 10 s
        live = HostedWorker(
            a, stack.worker_env(a), stack.folder / "worker-a.log", hostname="worker-a"
        )
        workers.append(live)
        skewed = start_skewed(stack, s, offset, faketime, workers)
        wait_for(live.ready, timeout=120, what="worker-a to start", log=live.log)
        # ... the first drawing a long job's samples, while blobs are written every second
        created = create_class(stack.service, DOG, name="dog", num_samples=96)
        give_embedding(
            stack.service, created.class_id, token_embedding(tiny_models, "<dog>"), "<dog>"
        )
        stack.created.append(created.job_id)
        stack.start(created.job_id)

        def claimed() -> Job | None:
            job = stack.service.job(created.job_id)
            return job if job.claim == 1 else None

        job = wait_for(claimed, timeout=60, what="worker-a to claim the job", log=live.log)
        assert holder(workers, job) is live
        listed = re.compile(r"sweep: .*orphaned blobs: \d+")
        listings = len(listed.findall(skewed.text()))
        young = YoungBlobs(stack)

        # when: the skewed worker has swept the jobs every 0.5 s and listed the blob store
        wait_for(
            lambda: len(listed.findall(skewed.text())) > listings,
            timeout=60,
            what="worker-s to list the blob store",
            log=skewed.log,
        )
        seen = time.monotonic()
        young.stop()

        # then: it took no job over from the live worker, and deleted no blob younger than
        # the grace period (S3's timestamps are to the second)
        job = stack.service.job(created.job_id)
        assert (job.claim, job.status) == (1, "running") and holder(workers, job) is live
        assert f"worker {job.worker} not heard from" not in skewed.text()
        kept = set(stack.service.storage.list_keys("classes/"))
        recent = young.younger_than(ORPHAN_GRACE - 2, at=seen)
        assert recent and set(recent) <= kept

        # when: the live worker dies
        name = job.worker
        live.kill()

        # then: the skewed worker takes its job over in time
        def taken_over() -> Job | None:
            job = stack.service.job(created.job_id)
            return job if job.claim == 2 and holder(workers, job) is skewed else None

        wait_for(taken_over, timeout=TAKEOVER + 20, what="the takeover", log=skewed.log)
        assert f"worker {name} not heard from since" in skewed.text()
