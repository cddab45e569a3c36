"""The synthesis job through the workers: in process (every task, no broker), then with real
worker processes on Redis and PostgreSQL; cancelling a job while it samples."""

from __future__ import annotations

import io
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from aligndiff.inversion import load_embedding
from aligndiff.synth import Models
from service.contexts.jobs import TERMINAL, request_cancel
from service.models import Job, SegClass
from service.settings import Settings
from tests.conftest import SHOTS_DIR
from tests.worker_support import (
    Service,
    WorkerProcess,
    create_class,
    give_embedding,
    in_process_app,
    run_job,
    token_embedding,
    wait_for,
    worker_env,
)
from worker import synthesis
from worker.celery_app import AlignDiffCelery, make_celery

DOG = SHOTS_DIR / "dog"
ALBATROSS = SHOTS_DIR / "albatross"


@pytest.fixture
def one_torch_thread() -> Iterator[None]:
    """Tiny models run an order of magnitude faster on one thread than on a contended two."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.usefixtures("one_torch_thread")
def test_a_job_runs_through_every_stage_to_n_finalized_samples(
    tmp_path: Path, tiny_models: Models
) -> None:
    # given: a dog class of 4 samples, sampled 3 per chunk and annotated 2 per chunk
    app, queue, service = in_process_app(tmp_path, tiny_models, sample_chunk_size=3)
    created = create_class(service, DOG, name="dog", num_samples=4)

    # when: the job runs (its state read after every task, as a polling client would)
    seen: list[tuple[str | None, float]] = []

    def observe() -> None:
        job = service.job(created.job_id)
        seen.append((job.stage, job.progress))

    run_job(app, queue, created.job_id, after_each=observe)

    # then: the stages came in order and the progress never went back
    stages = [stage for stage, _ in seen]
    assert [s for i, s in enumerate(stages) if s not in stages[:i]] == [
        "sampling", "annotation", "scoring", None,
    ]  # fmt: skip
    progress = [value for _, value in seen]
    assert progress == sorted(progress) and progress[0] >= 0.15 and progress[-1] == 1.0
    # and: the job succeeded, each stage fanned out once, in chunks
    job = service.job(created.job_id)
    assert (job.status, job.stage, job.progress, job.attempts, job.error) == (
        "succeeded", None, 1.0, 1, None,
    )  # fmt: skip
    assert dict(queue.sent) == {
        synthesis.START: 1,
        synthesis.SAMPLE_CHUNK: 2,
        synthesis.ANNOTATE_CHUNK: 2,
        synthesis.RECALIBRATE: 1,
        synthesis.FINALIZE_CHUNK: 2,
    }
    # and: 4 finalized samples, each with an image, a binary mask of its size and its scores
    samples = service.samples(created.class_id)
    assert [s.index for s in samples] == [0, 1, 2, 3]
    for sample in samples:
        assert sample.finalized_at is not None and sample.mask_key is not None
        image = _image(service, sample.image_key)
        mask = np.asarray(_image(service, sample.mask_key))
        assert image.size == mask.shape[::-1] == (sample.width, sample.height)
        assert set(np.unique(mask)) <= {0, 255}
        assert sample.mask_source in {"consensus", "pseudo_label"}
        assert sample.clip_score is not None and sample.clip_score >= 0
        assert sample.shot_similarity is not None and -1 <= sample.shot_similarity <= 1
        assert sample.ood_iou is not None and 0 <= sample.ood_iou <= 1
        assert sample.consensus_iou is not None and 0 <= sample.consensus_iou <= 1
        assert sample.accepted is not None
    assert [s.prompt_kind for s in samples] == ["inversion", "text", "inversion", "text"]
    # and: the class holds its token, its aggregates and the models that made it
    segclass = service.segclass(created.class_id)
    assert segclass.num_samples_done == 4
    assert segclass.num_accepted == sum(bool(s.accepted) for s in samples)
    assert segclass.clip_score_mean == pytest.approx(np.mean([s.clip_score for s in samples]))
    assert segclass.token == "<dog>" and segclass.embedding_key and segclass.prototypes_key
    assert segclass.model_ids == tiny_models.model_ids
    token, vector = _embedding(service, segclass.embedding_key)
    assert token == "<dog>" and vector.shape == (64,)


def _image(service: Service, key: str) -> Image.Image:
    return Image.open(io.BytesIO(service.storage.get(key)))


def _embedding(service: Service, key: str) -> tuple[str, torch.Tensor]:
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "embedding.safetensors"
        path.write_bytes(service.storage.get(key))
        return load_embedding(path)


@pytest.mark.usefixtures("one_torch_thread")
def test_samples_do_not_depend_on_chunking_or_redelivery(
    tmp_path: Path, tiny_models: Models
) -> None:
    # given: the same class twice, with the same learned token
    embedding = token_embedding(tiny_models, "<dog>")
    by_three = in_process_app(tmp_path / "three", tiny_models, sample_chunk_size=3)
    by_one = in_process_app(tmp_path / "one", tiny_models, sample_chunk_size=1, deliveries=2)
    created = {}
    for name, (_, _, service) in {"three": by_three, "one": by_one}.items():
        created[name] = create_class(service, DOG, name="dog", num_samples=4)
        give_embedding(service, created[name].class_id, embedding, "<dog>")

    # when: one is sampled 3 per chunk; the other 1 per chunk, every task delivered twice
    for name, (app, queue, _) in {"three": by_three, "one": by_one}.items():
        run_job(app, queue, created[name].job_id)

    # then: both succeed with the same images and coarse masks, bit for bit
    three, one = by_three[2], by_one[2]
    samples_three = three.samples(created["three"].class_id)
    samples_one = one.samples(created["one"].class_id)
    assert [s.index for s in samples_one] == [s.index for s in samples_three] == [0, 1, 2, 3]
    for a, b in zip(samples_three, samples_one, strict=True):
        assert three.storage.get(a.image_key) == one.storage.get(b.image_key)
        assert three.storage.get(a.coarse_mask_key) == one.storage.get(b.coarse_mask_key)
    # and: redelivered tasks found their work done: no stage fanned out twice
    assert one.job(created["one"].job_id).status == "succeeded"
    assert dict(by_one[1].sent) == {
        synthesis.START: 1,
        synthesis.SAMPLE_CHUNK: 4,
        synthesis.ANNOTATE_CHUNK: 2,
        synthesis.RECALIBRATE: 1,
        synthesis.FINALIZE_CHUNK: 2,
    }
    assert all(s.finalized_at is not None for s in samples_one)


@pytest.mark.usefixtures("one_torch_thread")
def test_a_class_keeps_the_prompts_it_was_created_with(tmp_path: Path, tiny_models: Models) -> None:
    # given: two albatross classes with the same token: one stored before prompts said "an"
    # (as migration 0007 marks it), one created now
    app, queue, service = in_process_app(tmp_path, tiny_models, sample_chunk_size=2)
    embedding = token_embedding(tiny_models, "<albatross>")
    created = {
        style: create_class(service, ALBATROSS, name="albatross", num_samples=2)
        for style in ("always-a", "a-or-an")
    }
    with service.session() as session:
        old = session.get(SegClass, created["always-a"].class_id)
        assert old is not None
        old.prompt_style = "always-a"
    for each in created.values():
        give_embedding(service, each.class_id, embedding, "<albatross>")

    # when: both jobs run
    for each in created.values():
        run_job(app, queue, each.job_id)

    # then: the old class's samples say "a", as its job would have before; the new one's "an"
    prompts = {
        style: [s.prompt for s in service.samples(each.class_id)] for style, each in created.items()
    }
    assert prompts == {
        "always-a": ["a photo of a <albatross> albatross", "a photo of a albatross"],
        "a-or-an": ["a photo of an <albatross> albatross", "a photo of an albatross"],
    }
    assert all(service.job(each.job_id).status == "succeeded" for each in created.values())


@dataclass
class Live:
    """A service on PostgreSQL, Redis and a blob folder, with one worker process (prefork,
    two children), and the Celery app the API would send tasks with."""

    service: Service
    worker: WorkerProcess
    app: AlignDiffCelery

    def enqueue_start(self, job_id: uuid.UUID) -> None:
        self.app.send_task(synthesis.START, args=[str(job_id)])

    def wait_for_job(self, job_id: uuid.UUID, status: str, *, timeout: float) -> Job:
        def reached() -> Job | None:
            job = self.service.job(job_id)
            return job if job.status in (status, *TERMINAL) else None

        job = wait_for(reached, timeout=timeout, what=f"job {status}", log=self.worker.log)
        assert job.status == status, f"job ended {job.status}: {job.error}"
        return job


@pytest.fixture(scope="module")
def live(
    tmp_path_factory: pytest.TempPathFactory, postgres_url: str, redis_url: str, model_cache: Path
) -> Iterator[Live]:
    data = tmp_path_factory.mktemp("live")
    settings = Settings(
        data_dir=data,
        database_url=postgres_url,
        broker_url=redis_url,
        storage_url=f"file://{data / 'blobs'}",
        sample_chunk_size=2,
        annotation_chunk_size=2,
        job_lease_seconds=60,
        task_visibility_timeout=600,
    )
    service = Service.create(settings)
    env = worker_env(settings, model_cache)
    worker = WorkerProcess(env, data / "worker.log", pool="prefork", concurrency=2)
    try:
        yield Live(service, worker, make_celery(settings))
    finally:
        worker.stop()


def test_a_worker_process_runs_a_job_on_redis_and_postgres(live: Live) -> None:
    # given: a class of 4 samples committed as the API does
    created = create_class(live.service, DOG, name="dog", num_samples=4)

    # when: its start is sent to the broker
    live.enqueue_start(created.job_id)

    # then: the worker takes it through every stage to success
    job = live.wait_for_job(created.job_id, "succeeded", timeout=150)
    assert (job.progress, job.stage, job.attempts) == (1.0, None, 1)
    samples = live.service.samples(created.class_id)
    assert [s.index for s in samples] == [0, 1, 2, 3]
    assert all(s.finalized_at is not None and s.mask_key for s in samples)
    segclass = live.service.segclass(created.class_id)
    assert segclass.num_samples_done == 4 and segclass.token == "<dog>"
    assert segclass.num_accepted == sum(bool(s.accepted) for s in samples)


def test_a_cancelled_job_stops_within_a_batch(live: Live, tiny_models: Models) -> None:
    # given: a class of 24 samples (its token already learned) being sampled
    created = create_class(live.service, DOG, name="dog", num_samples=24)
    give_embedding(live.service, created.class_id, token_embedding(tiny_models, "<dog>"), "<dog>")
    live.enqueue_start(created.job_id)
    wait_for(
        lambda: len(live.service.samples(created.class_id)) >= 2,
        timeout=60,
        what="the first samples",
        log=live.worker.log,
    )

    # when: the user cancels it
    with live.service.session() as session:
        job = session.get(Job, created.job_id)
        assert job is not None
        request_cancel(session, job)
    asked = time.monotonic()

    # then: it ends cancelled within about a batch; the batches in flight then (one per worker
    # child, of one chunk) are kept, and nothing is drawn after them
    job = live.wait_for_job(created.job_id, "cancelled", timeout=30)
    assert time.monotonic() - asked < 15
    drawn = len(live.service.samples(created.class_id))
    time.sleep(3)
    samples = live.service.samples(created.class_id)
    assert len(samples) <= drawn + 2 * live.service.settings.sample_chunk_size
    assert len(samples) < 24
    assert job.finished_at is not None and all(s.finalized_at is None for s in samples)
    time.sleep(1)
    assert len(live.service.samples(created.class_id)) == len(samples)
