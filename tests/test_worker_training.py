"""The training job through the worker, in process: trainings created through the API on
classes whose synthesis finished, trained on their real shots and samples, evaluated (on a
validation set, on held-out shots by leave-one-shot-out folds, or on the training shots),
their weights served; the baseline comparison, resuming from a checkpoint (or at the next
fold) after the worker died, cancelling and failing."""

from __future__ import annotations

import json
import logging
import shutil
import statistics
import uuid
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import timedelta
from io import BytesIO
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest
import torch
from fastapi.testclient import TestClient
from PIL import Image
from sqlalchemy import select

import aligndiff.training
from aligndiff.models.segmenters import load_segmenter
from aligndiff.shots import decode_image
from aligndiff.training import evaluate, predict
from service.app import create_app
from service.auth import create_key
from service.contexts.jobs import request_cancel
from service.models import Job, Sample, SegClass, Training, utcnow
from service.models import Shot as ShotRow
from service.settings import Settings
from service.storage import LocalStorage, sample_key
from tests.conftest import SHOTS_DIR
from tests.worker_support import CreatedClass, InProcessQueue, Service, create_class
from worker import training
from worker.celery_app import AlignDiffCelery, make_celery

RESOLUTION = 32


@pytest.fixture(autouse=True)
def one_torch_thread() -> Iterator[None]:
    """Tiny models run an order of magnitude faster on one thread than on a contended two."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@dataclass
class Setup:
    """The API and the worker's Celery app on one SQLite database and blob folder; the API's
    task queue holds the tasks until `run` drains them in this process, and runs the ones the
    API waits on (predict) at once, through the worker's task."""

    settings: Settings
    service: Service
    queue: InProcessQueue
    celery: AlignDiffCelery
    client: TestClient

    def worker(self, settings: Settings | None = None, **context: Any) -> AlignDiffCelery:
        """Another worker app on the same database (`storage=` replaces its blob store;
        `settings`, the worker's settings)."""
        app = make_celery(settings or self.settings, queue=self.queue, **context)
        app.loader.import_default_modules()
        return app

    def create(self, class_ids: list[uuid.UUID], **fields: Any) -> dict[str, Any]:
        response = self.client.post(
            "/v1/trainings",
            json={
                "class_ids": [str(c) for c in class_ids],
                "architecture": "deeplabv3",
                "steps": 4,
                "batch_size": 2,
                **fields,
            },
        )
        assert response.status_code == 202, response.text
        return response.json()  # type: ignore[no-any-return]

    def run(self) -> None:
        self.queue.drain(self.celery)

    def training(self, training_id: str) -> dict[str, Any]:
        return self.client.get(f"/v1/trainings/{training_id}").json()  # type: ignore[no-any-return]

    def row(self, training_id: str) -> Training:
        with self.service.session() as session:
            row = session.get(Training, uuid.UUID(training_id))
            assert row is not None
            return row


@pytest.fixture
def setup(tmp_path: Path, model_cache: Path) -> Setup:
    settings = Settings(
        data_dir=tmp_path,
        database_url=f"sqlite:///{tmp_path / 'aligndiff.db'}",
        broker_url="memory://",
        storage_url=f"file://{tmp_path / 'blobs'}",
        model_cache_dir=model_cache,
        training_resolution=RESOLUTION,
        training_checkpoint_every=2,
        # Every step reports (and sees a cancel at once).
        training_report_seconds=0.0,
    )
    service = Service.create(settings)
    queue = InProcessQueue()
    celery = make_celery(settings, queue=queue)
    celery.loader.import_default_modules()
    queue.worker = celery
    app = create_app(settings, queue=queue, storage=service.storage)
    with service.session() as session:
        key = create_key(session, name="admin", admin=True)
    client = TestClient(app, headers={"Authorization": f"Bearer {key}"})
    return Setup(settings, service, queue, celery, client)


def finished_class(setup: Setup, name: str, *, samples: int = 2, shots: int = 1) -> uuid.UUID:
    """A class from the real shot of `name` (with `shots` > 1, more: see `shots_folder`), its
    synthesis succeeded with `samples` accepted samples (the first shot, shrunk) and one
    rejected one."""
    folder = SHOTS_DIR / name if shots == 1 else shots_folder(setup, name, shots)
    created: CreatedClass = create_class(setup.service, folder, name=name, num_samples=4)
    service = setup.service
    with service.session() as session:
        shot = session.scalars(
            select(ShotRow)
            .where(ShotRow.class_id == created.class_id)
            .order_by(ShotRow.position)
            .limit(1)
        ).one()
        image = Image.open(BytesIO(service.storage.get(shot.image_key))).convert("RGB")
        mask = Image.open(BytesIO(service.storage.get(shot.mask_key))).convert("L")
    for index in range(samples + 1):
        size = (40 + 8 * index, 32 + 8 * index)
        _add_sample(
            service,
            created.class_id,
            index,
            image.resize(size, Image.Resampling.BILINEAR),
            mask.resize(size, Image.Resampling.NEAREST),
            accepted=index < samples,
        )
    with service.session() as session:
        job = session.get(Job, created.job_id)
        assert job is not None
        job.status, job.progress, job.finished_at = "succeeded", 1.0, utcnow()
    return created.class_id


# The further shots of a class: its real shot mirrored, flipped, turned (each other pixels).
SHOT_VARIANTS = (
    Image.Transpose.FLIP_LEFT_RIGHT,
    Image.Transpose.FLIP_TOP_BOTTOM,
    Image.Transpose.ROTATE_180,
)


def shots_folder(setup: Setup, name: str, count: int) -> Path:
    """A shots folder of `count` shots: the real shot of `name`, then its variants."""
    source = SHOTS_DIR / name
    folder = setup.settings.data_dir / "shots" / f"{name}-{count}"
    folder.mkdir(parents=True)
    shutil.copy(source / "1.jpg", folder / "1.jpg")
    shutil.copy(source / "1.png", folder / "1.png")
    image, mask = Image.open(source / "1.jpg").convert("RGB"), Image.open(source / "1.png")
    for number, variant in enumerate(SHOT_VARIANTS[: count - 1], start=2):
        image.transpose(variant).save(folder / f"{number}.jpg", "JPEG", quality=95)
        mask.transpose(variant).save(folder / f"{number}.png", "PNG")
    return folder


def shot_images(setup: Setup, class_id: uuid.UUID) -> list[npt.NDArray[np.uint8]]:
    """A class's shots as the worker reads them, by position."""
    with setup.service.session() as session:
        keys = session.scalars(
            select(ShotRow.image_key).where(ShotRow.class_id == class_id).order_by(ShotRow.position)
        ).all()
    return [
        np.asarray(decode_image(setup.service.storage.get(key), source=key), dtype=np.uint8)
        for key in keys
    ]


def contains(images: list[npt.NDArray[np.uint8]], image: npt.NDArray[np.uint8]) -> bool:
    return any(np.array_equal(candidate, image) for candidate in images)


@pytest.fixture
def trained_on(monkeypatch: pytest.MonkeyPatch) -> list[list[npt.NDArray[np.uint8]]]:
    """Every image (training images and paste objects) of each `train_segmenter` call the
    worker makes, call by call."""
    calls: list[list[npt.NDArray[np.uint8]]] = []
    train_segmenter = aligndiff.training.train_segmenter

    def recording(
        model: Any, data: aligndiff.training.TrainingSet, config: Any, **kwargs: Any
    ) -> aligndiff.training.TrainingOutcome:
        calls.append([image.image for image in data.images] + [o.image for o in data.objects])
        return train_segmenter(model, data, config, **kwargs)

    monkeypatch.setattr(aligndiff.training, "train_segmenter", recording)
    return calls


def _add_sample(
    service: Service,
    class_id: uuid.UUID,
    index: int,
    image: Image.Image,
    mask: Image.Image,
    *,
    accepted: bool,
) -> None:
    keys = {}
    for name, picture in (("image.png", image), ("mask.png", mask)):
        buffer = BytesIO()
        picture.save(buffer, "PNG")
        keys[name] = sample_key(class_id, index, name)
        service.storage.put(keys[name], buffer.getvalue(), content_type="image/png")
    with service.session() as session:
        session.add(
            Sample(
                class_id=class_id,
                index=index,
                prompt="a photo",
                prompt_kind="text" if index % 2 else "inversion",
                seed=index,
                width=image.width,
                height=image.height,
                image_key=keys["image.png"],
                coarse_mask_key=sample_key(class_id, index, "coarse_mask.npy"),
                mask_key=keys["mask.png"],
                mask_source="consensus",
                accepted=accepted,
                finalized_at=utcnow(),
            )
        )


def shot_image(setup: Setup, class_id: uuid.UUID) -> bytes:
    with setup.service.session() as session:
        shot = session.scalars(select(ShotRow).where(ShotRow.class_id == class_id)).one()
        return setup.service.storage.get(shot.image_key)


def test_a_training_of_two_classes_succeeds_with_metrics_and_a_working_model(
    setup: Setup,
) -> None:
    # given: two classes whose synthesis succeeded
    dog, albatross = finished_class(setup, "dog"), finished_class(setup, "albatross")

    # when: a training of both runs
    created = setup.create([dog, albatross])
    setup.run()

    # then: it succeeded, with IoUs of both classes measured on their shots (one each: there
    # is none to hold out)
    training = setup.training(created["id"])
    assert (training["status"], training["progress"], training["error"]) == (
        "succeeded", 1.0, None,
    )  # fmt: skip
    metrics = training["metrics"]
    assert set(metrics["per_class_iou"]) == {"dog", "albatross"}
    assert all(0.0 <= iou <= 1.0 for iou in metrics["per_class_iou"].values())
    assert 0.0 <= metrics["miou"] <= 1.0
    assert (metrics["eval_set"], metrics["baseline"]) == ("training_shots", None)
    assert setup.queue.sent[training_task("start")] == 1
    # and: the downloaded weights load, and predict as the API does
    weights = setup.client.get(f"/v1/trainings/{created['id']}/weights")
    assert weights.status_code == 200
    model, config = load_segmenter(weights.content)
    assert (config["class_names"], config["resolution"]) == (["dog", "albatross"], RESOLUTION)
    image = shot_image(setup, albatross)
    predicted = setup.client.post(
        f"/v1/trainings/{created['id']}/predict", files={"image": ("a.jpg", image, "image/png")}
    )
    assert predicted.status_code == 200, predicted.text
    decoded = np.asarray(Image.open(BytesIO(image)).convert("RGB"))
    (expected,) = predict(model, [decoded], resolution=RESOLUTION)
    assert np.array_equal(np.asarray(Image.open(BytesIO(predicted.content))), expected)


class CountingStorage(LocalStorage):
    """A local store that counts the reads of each key."""

    def __init__(self, root: Path) -> None:
        super().__init__(root)
        self.reads: Counter[str] = Counter()

    def get(self, key: str) -> bytes:
        self.reads[key] += 1
        return super().get(key)


def test_a_worker_loads_a_trained_segmenter_once_for_many_predictions(
    setup: Setup, tmp_path: Path
) -> None:
    # given: a succeeded training, and a worker whose blob reads are counted
    dog = finished_class(setup, "dog")
    created = setup.create([dog])
    setup.run()
    storage = CountingStorage(tmp_path / "blobs")
    setup.queue.worker = setup.worker(storage=storage)
    image = shot_image(setup, dog)

    # when: the same image is sent to predict three times
    masks = [
        setup.client.post(
            f"/v1/trainings/{created['id']}/predict",
            files={"image": ("a.jpg", image, "image/jpeg")},
        )
        for _ in range(3)
    ]

    # then: every answer is the same mask, and the weights were read from storage once
    assert [mask.status_code for mask in masks] == [200] * 3
    assert masks[0].content == masks[1].content == masks[2].content
    weights_key = setup.row(created["id"]).weights_key
    assert weights_key is not None and storage.reads[weights_key] == 1


# --- held-out evaluation --------------------------------------------------------------------


def test_held_out_folds_never_train_on_the_shots_they_hold_out(
    setup: Setup, trained_on: list[list[npt.NDArray[np.uint8]]]
) -> None:
    # given: a class of 3 shots and one of 2, both with accepted samples
    dog, albatross = (
        finished_class(setup, "dog", shots=3),
        finished_class(setup, "albatross", shots=2),
    )
    shots = {"dog": shot_images(setup, dog), "albatross": shot_images(setup, albatross)}

    # when: a training of both runs, with no validation set
    created = setup.create([dog, albatross], use_synthetic=True)
    setup.run()

    # then: 2 folds (the fewest shots of a class), fold k holding out the k-th shot of each
    # class, then the final model
    training = setup.training(created["id"])
    assert training["status"] == "succeeded", training["error"]
    folds = training["metrics"]["folds"]
    assert [fold["held_out"] for fold in folds] == [
        {"dog": 0, "albatross": 0},
        {"dog": 1, "albatross": 1},
    ]
    assert len(trained_on) == 3
    # and: each fold trained on every shot but those it holds out, which it never saw
    for fold, images in zip(folds, trained_on, strict=False):
        for name, class_shots in shots.items():
            for position, shot in enumerate(class_shots):
                assert contains(images, shot) is (position != fold["held_out"][name]), (
                    f"fold {fold['fold']}, {name} shot {position}"
                )
    # and: the final model (the weights served) trained on all the shots
    assert all(contains(trained_on[-1], shot) for each in shots.values() for shot in each)
    row = setup.row(created["id"])
    assert row.weights_key is not None and row.eval_set == "held_out_shots"


def test_two_shots_per_class_are_measured_by_held_out_folds(setup: Setup) -> None:
    # given: two classes of 2 shots each
    dog, albatross = (
        finished_class(setup, "dog", shots=2),
        finished_class(setup, "albatross", shots=2),
    )

    # when: a training of both runs
    created = setup.create([dog, albatross])
    setup.run()

    # then: measured on held-out shots by 2 folds; the IoUs are the folds' means, with their
    # standard deviations
    metrics = setup.training(created["id"])["metrics"]
    assert metrics["eval_set"] == "held_out_shots"
    folds = metrics["folds"]
    assert [fold["fold"] for fold in folds] == [0, 1]
    for name in ("dog", "albatross"):
        ious = [fold["per_class_iou"][name] for fold in folds]
        assert metrics["per_class_iou"][name] == pytest.approx(statistics.fmean(ious))
        assert metrics["per_class_iou_std"][name] == pytest.approx(statistics.pstdev(ious))
    assert metrics["miou"] == pytest.approx(statistics.fmean(fold["miou"] for fold in folds))
    assert (metrics["baseline"], metrics["comparison"]) == (None, None)
    assert all(fold["baseline"] is None for fold in folds)
    # and: each fold's result is kept by its run's name
    fold_results = setup.row(created["id"]).fold_results
    assert fold_results is not None and set(fold_results) == {"fold-0", "fold-1"}
    assert fold_results["fold-1"]["miou"] == folds[1]["miou"]


def test_the_folds_are_at_most_eval_max_folds(setup: Setup) -> None:
    # given: a class of 4 shots, and a worker allowed 3 folds
    dog = finished_class(setup, "dog", shots=4)
    created = setup.create([dog])
    worker = setup.worker(settings=setup.settings.model_copy(update={"eval_max_folds": 3}))

    # when
    setup.queue.drain(worker)

    # then: 3 folds, holding out its first 3 shots
    folds = setup.training(created["id"])["metrics"]["folds"]
    assert [fold["held_out"] for fold in folds] == [{"dog": 0}, {"dog": 1}, {"dog": 2}]


def test_a_class_with_one_shot_is_measured_on_the_training_shots(
    setup: Setup, trained_on: list[list[npt.NDArray[np.uint8]]]
) -> None:
    # given: a class of 2 shots and one of 1
    dog, albatross = finished_class(setup, "dog", shots=2), finished_class(setup, "albatross")

    # when: a training of both runs, with no validation set
    created = setup.create([dog, albatross])
    setup.run()

    # then: one model, measured on the shots it trained on (optimistic), with no folds
    metrics = setup.training(created["id"])["metrics"]
    assert metrics["eval_set"] == "training_shots"
    assert (metrics["folds"], metrics["per_class_iou_std"], metrics["comparison"]) == (
        None, None, None,
    )  # fmt: skip
    assert len(trained_on) == 1
    assert setup.row(created["id"]).fold_results is None


def test_compare_baseline_on_held_out_shots_compares_fold_by_fold(
    setup: Setup, trained_on: list[list[npt.NDArray[np.uint8]]]
) -> None:
    # given: a class of 2 shots with accepted samples
    dog = finished_class(setup, "dog", shots=2)
    shots = shot_images(setup, dog)

    # when: a training with samples is compared with the shots alone
    created = setup.create([dog], compare_baseline=True, use_synthetic=True)
    setup.run()

    # then: each fold trained with the samples and, its baseline, on its one shot alone;
    # then the final model, and no final baseline (the comparison comes from the folds)
    training = setup.training(created["id"])
    assert training["status"] == "succeeded", training["error"]
    assert len(trained_on) == 5
    for baseline_run in (trained_on[1], trained_on[3]):
        assert all(contains(shots, image) for image in baseline_run)
    row = setup.row(created["id"])
    assert row.weights_key is not None and row.baseline_weights_key is None
    # and: the baseline's IoUs are its folds' means; the comparison their difference, with
    # the spread of the per-fold differences
    metrics = training["metrics"]
    folds, baseline, comparison = metrics["folds"], metrics["baseline"], metrics["comparison"]
    fold_baselines = [fold["baseline"]["per_class_iou"]["dog"] for fold in folds]
    assert baseline["per_class_iou"]["dog"] == pytest.approx(statistics.fmean(fold_baselines))
    assert baseline["per_class_iou_std"]["dog"] == pytest.approx(statistics.pstdev(fold_baselines))
    assert comparison["miou_difference"] == pytest.approx(metrics["miou"] - baseline["miou"])
    assert comparison["per_class_difference"]["dog"] == pytest.approx(
        metrics["per_class_iou"]["dog"] - baseline["per_class_iou"]["dog"]
    )
    differences = [fold["miou"] - fold["baseline"]["miou"] for fold in folds]
    assert comparison["spread"] == pytest.approx(statistics.pstdev(differences))
    assert comparison["exceeds_spread"] is (
        abs(comparison["miou_difference"]) > comparison["spread"]
    )


def test_a_training_with_a_validation_set_is_measured_on_it(setup: Setup) -> None:
    # given: a class, and a validation set unlike its shot: the shot mirrored, its label map
    # class 1 on the object and a band of ignored (255) pixels
    dog = finished_class(setup, "dog")
    with setup.service.session() as session:
        shot = session.scalars(select(ShotRow).where(ShotRow.class_id == dog)).one()
        image = Image.open(BytesIO(setup.service.storage.get(shot.image_key))).convert("RGB")
        mask = Image.open(BytesIO(setup.service.storage.get(shot.mask_key))).convert("L")
    val_image = np.asarray(image)[:, ::-1].copy()
    labels = (np.asarray(mask)[:, ::-1] > 127).astype(np.uint8)
    labels[: labels.shape[0] // 8] = 255
    request = {
        "class_ids": [str(dog)],
        "architecture": "deeplabv3",
        "steps": 4,
        "batch_size": 2,
        "compare_baseline": True,
    }

    # when: it is trained with the validation set uploaded
    response = setup.client.post(
        "/v1/trainings",
        data={"request": json.dumps(request)},
        files=[
            ("val_images", ("v.png", png(Image.fromarray(val_image)), "image/png")),
            ("val_masks", ("v-mask.png", png(Image.fromarray(labels, mode="L")), "image/png")),
        ],
    )
    assert response.status_code == 202, response.text
    created = response.json()
    setup.run()

    # then: its metrics (and the baseline's) are those of its weights on the validation set
    training = setup.training(created["id"])
    assert training["status"] == "succeeded", training["error"]
    metrics = training["metrics"]
    assert (metrics["eval_set"], metrics["folds"]) == ("validation", None)
    row = setup.row(created["id"])
    assert row.baseline_weights_key is not None
    weights = setup.client.get(f"/v1/trainings/{created['id']}/weights").content
    for measured, blob in (
        (metrics, weights),
        (metrics["baseline"], setup.service.storage.get(row.baseline_weights_key)),
    ):
        model, _ = load_segmenter(blob)
        expected = evaluate(model, [val_image], [labels], ["dog"], resolution=RESOLUTION)
        assert measured["per_class_iou"] == pytest.approx(dict(expected.per_class_iou))
        assert measured["miou"] == pytest.approx(expected.miou)
    # and: the comparison is their difference, with no spread to weigh it by
    assert metrics["comparison"] == {
        "miou_difference": pytest.approx(metrics["miou"] - metrics["baseline"]["miou"]),
        "per_class_difference": {
            "dog": pytest.approx(
                metrics["per_class_iou"]["dog"] - metrics["baseline"]["per_class_iou"]["dog"]
            )
        },
        "spread": None,
        "exceeds_spread": None,
    }


def png(image: Image.Image) -> bytes:
    buffer = BytesIO()
    image.save(buffer, "PNG")
    return buffer.getvalue()


class Killed(BaseException):
    """The worker process dying (nothing after it runs, no failure is recorded)."""


class DyingStorage(LocalStorage):
    """A blob store whose worker dies as it writes its `die_at`-th checkpoint."""

    def __init__(self, root: Path, *, die_at: int) -> None:
        super().__init__(root)
        self.die_at, self.checkpoints = die_at, 0

    def put(self, key: str, data: bytes, *, content_type: str) -> None:
        if key.endswith("checkpoint.bin"):
            self.checkpoints += 1
            if self.checkpoints == self.die_at:
                raise Killed
        super().put(key, data, content_type=content_type)


def started_on_a_dying_worker(setup: Setup, created: dict[str, Any], *, die_at: int) -> uuid.UUID:
    """Start the training's job (its id returned) on a worker that dies as it writes its
    `die_at`-th checkpoint."""
    job_id = uuid.UUID(created["job_id"])
    dying = setup.worker(storage=DyingStorage(setup.settings.data_dir / "blobs", die_at=die_at))
    setup.queue.pending.clear()
    with pytest.raises(Killed):
        training.start(dying.context, job_id)
    return job_id


def take_over(setup: Setup, job_id: uuid.UUID) -> None:
    """The dead worker's lease runs out, and a worker starting up queues the job's resume."""
    with setup.service.session() as session:
        job = session.get(Job, job_id)
        assert job is not None
        job.lease_expires_at = utcnow() - timedelta(seconds=1)
    assert training.requeue_orphaned_jobs(setup.celery.context) == [job_id]


def test_a_training_whose_worker_died_resumes_from_its_checkpoint(
    setup: Setup, caplog: pytest.LogCaptureFixture
) -> None:
    # given: a training of 6 steps, checkpointed every 2, whose worker dies at its second
    # checkpoint (after step 4: the one stored is step 2's)
    dog = finished_class(setup, "dog")
    created = setup.create([dog], steps=6)
    job_id = started_on_a_dying_worker(setup, created, die_at=2)
    assert setup.row(created["id"]).checkpoint_key is not None
    assert setup.training(created["id"])["status"] == "running"

    # when: its lease runs out and a worker starting up takes it over
    with caplog.at_level(logging.INFO, logger="worker.training"):
        take_over(setup, job_id)
        setup.run()

    # then: it went on from step 2 and succeeded, on its second attempt
    resumed = [r.getMessage() for r in caplog.records if r.name == "worker.training"]
    assert resumed == [f"training {created['id']}: resuming the model from step 2"]
    assert setup.queue.sent[training_task("resume")] == 1
    job = setup.service.job(job_id)
    assert (job.status, job.attempts) == ("succeeded", 2)
    assert setup.training(created["id"])["metrics"]["per_class_iou"].keys() == {"dog"}


class FailingStorage(DyingStorage):
    """A blob store that fails (an error, not a death) as its `die_at`-th checkpoint is
    written."""

    def put(self, key: str, data: bytes, *, content_type: str) -> None:
        try:
            super().put(key, data, content_type=content_type)
        except Killed:
            raise OSError("the disk is full") from None


def test_a_failed_training_retried_goes_on_from_its_checkpoint(
    setup: Setup, caplog: pytest.LogCaptureFixture
) -> None:
    # given: a training that failed writing its second checkpoint
    dog = finished_class(setup, "dog")
    created = setup.create([dog], steps=6)
    setup.queue.pending.clear()
    failing = setup.worker(storage=FailingStorage(setup.settings.data_dir / "blobs", die_at=2))
    failing.tasks[training.START].apply(args=[created["job_id"]])
    failed = setup.training(created["id"])
    assert failed["status"] == "failed" and "the disk is full" in failed["error"]

    # when: its owner retries its job
    retried = setup.client.post(f"/v1/jobs/{created['job_id']}/retry")
    assert retried.status_code == 202, retried.text
    with caplog.at_level(logging.INFO, logger="worker.training"):
        setup.run()

    # then: it went on from the stored checkpoint and succeeded
    resumed = [r.getMessage() for r in caplog.records if r.name == "worker.training"]
    assert resumed == [f"training {created['id']}: resuming the model from step 2"]
    assert setup.training(created["id"])["status"] == "succeeded"


def test_a_training_whose_worker_died_after_a_fold_resumes_at_the_next_fold(
    setup: Setup, trained_on: list[list[npt.NDArray[np.uint8]]]
) -> None:
    # given: a held-out training of 4 steps, checkpointed every 2, whose worker dies at its
    # third checkpoint: fold 0's result stored, fold 1 just begun
    dog = finished_class(setup, "dog", shots=2)
    shots = shot_images(setup, dog)
    created = setup.create([dog], steps=4)
    job_id = started_on_a_dying_worker(setup, created, die_at=3)
    fold_results = setup.row(created["id"]).fold_results
    assert fold_results is not None and set(fold_results) == {"fold-0"}
    assert len(trained_on) == 2

    # when: its lease runs out and a worker starting up takes it over
    take_over(setup, job_id)
    setup.run()

    # then: fold 0 was not trained again: the resumed job trained fold 1 (without the second
    # shot) and the final model, and reports fold 0's stored result
    resumed = trained_on[2:]
    assert len(resumed) == 2
    assert contains(resumed[0], shots[0]) and not contains(resumed[0], shots[1])
    assert all(contains(resumed[1], shot) for shot in shots)
    trained = setup.training(created["id"])
    assert trained["status"] == "succeeded", trained["error"]
    first = trained["metrics"]["folds"][0]
    assert (first["held_out"], first["miou"]) == (
        fold_results["fold-0"]["held_out"],
        fold_results["fold-0"]["miou"],
    )
    assert setup.service.job(job_id).attempts == 2


class CancellingStorage(LocalStorage):
    """A blob store that asks the job to stop as its first checkpoint is written (a user
    cancelling mid-training)."""

    def __init__(self, root: Path, service: Service, job_id: uuid.UUID) -> None:
        super().__init__(root)
        self.service, self.job_id = service, job_id

    def put(self, key: str, data: bytes, *, content_type: str) -> None:
        super().put(key, data, content_type=content_type)
        if key.endswith("checkpoint.bin"):
            with self.service.session() as session:
                job = session.get(Job, self.job_id)
                assert job is not None
                if job.status == "running" and not job.cancel_requested:
                    request_cancel(session, job)


def test_a_cancelled_training_stops_and_ends_cancelled(setup: Setup) -> None:
    dog = finished_class(setup, "dog")
    created = setup.create([dog], steps=20)
    job_id = uuid.UUID(created["job_id"])
    worker = setup.worker(
        storage=CancellingStorage(setup.settings.data_dir / "blobs", setup.service, job_id)
    )

    setup.queue.drain(worker)

    trained = setup.training(created["id"])
    assert (trained["status"], trained["metrics"]) == ("cancelled", None)
    assert setup.row(created["id"]).weights_key is None


def test_a_training_whose_class_was_deleted_fails_with_the_reason(setup: Setup) -> None:
    dog = finished_class(setup, "dog")
    created = setup.create([dog])
    with setup.service.session() as session:
        session.delete(session.get(SegClass, dog))

    setup.queue.pending.clear()

    # NOTE: not `drain`, which re-raises in the test before the task's failure handler runs.
    result = setup.celery.tasks[training.START].apply(args=[created["job_id"]])

    assert isinstance(result.result, LookupError)

    trained = setup.training(created["id"])
    assert trained["status"] == "failed"
    assert "classes deleted since the training was created" in trained["error"]


def training_task(step: str) -> str:
    return f"aligndiff.training.{step}"
