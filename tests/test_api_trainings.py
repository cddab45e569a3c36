"""`/v1/trainings`: creating a training of finished classes (its job queued), refusing bad
requests without a trace, idempotent replays, owner isolation, and the trained model's weights
download and prediction."""

from __future__ import annotations

import json
import threading
import time
import uuid
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from io import BytesIO
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import redis
from PIL import Image
from sqlalchemy import func, select

from aligndiff.models.segmenters import build_segmenter, load_segmenter, save_segmenter
from aligndiff.training import predict
from service.contexts import jobs, quotas
from service.models import Job, SegClass, Training
from service.queue import CeleryQueue
from service.settings import Settings
from service.storage import LocalStorage, training_key
from tests.api_support import Api, ApiFactory, add_class, box_mask, encode, get_job_row, photo
from tests.worker_support import (
    Service,
    WorkerProcess,
    private_redis,
    unreadable_log_lines,
    wait_for,
    worker_env,
)
from worker.celery_app import JOBS_QUEUE, PREDICT_QUEUE, make_celery

pytest_plugins = ["tests.api_support"]

TRAINING_TASK = "aligndiff.training.start"
RESOLUTION = 32


@dataclass(frozen=True)
class PredictWorker:
    """A real worker process that serves predictions only (`--queues aligndiff.predict`), on
    a Redis of the module's own (broker and result backend), reading blobs from `blobs`."""

    redis_url: str
    blobs: Path
    process: WorkerProcess


@pytest.fixture(scope="module")
def predict_worker(
    tmp_path_factory: pytest.TempPathFactory, model_cache: Path
) -> Iterator[PredictWorker]:
    folder = tmp_path_factory.mktemp("predict-worker")
    with private_redis(folder) as redis_url:
        settings = Settings(
            data_dir=folder,
            database_url=f"sqlite:///{folder / 'worker.db'}",
            broker_url=redis_url,
            storage_url=f"file://{folder / 'blobs'}",
            model_cache_dir=model_cache,
        )
        Service.create(settings)  # the tables its start-up sweep for orphaned jobs reads
        process = WorkerProcess(
            worker_env(settings, model_cache),
            folder / "worker.log",
            pool="solo",
            concurrency=1,
            queues=PREDICT_QUEUE,
        )
        try:
            yield PredictWorker(redis_url, folder / "blobs", process)
        finally:
            process.stop()


def api_with_worker(make_api: ApiFactory, worker: PredictWorker, **settings: Any) -> Api:
    """An app whose tasks go to `worker`'s Redis and whose blobs are the worker's."""
    api = make_api(
        storage=LocalStorage(worker.blobs),
        broker_url=worker.redis_url,
        **{"predict_timeout_seconds": 60.0, **settings},
    )
    api.app.state.queue = CeleryQueue(make_celery(api.settings))
    return api


@pytest.fixture
def worker_api(make_api: ApiFactory, predict_worker: PredictWorker) -> Api:
    return api_with_worker(make_api, predict_worker)


def finished_class(
    api: Api, name: str = "dog", *, owner: str = "alice", shots: int = 1
) -> uuid.UUID:
    owner_id = api.alice_id if owner == "alice" else api.bob_id
    class_id, _ = add_class(api, owner_id=owner_id, name=name, status="succeeded")
    if shots != 1:
        with api.session() as session:
            segclass = session.get(SegClass, class_id)
            assert segclass is not None
            segclass.num_shots = shots
            session.commit()
    return class_id


def body(*class_ids: uuid.UUID, **fields: Any) -> dict[str, Any]:
    return {"class_ids": [str(c) for c in class_ids], "architecture": "deeplabv3", **fields}


def training_count(api: Api) -> int:
    with api.session() as session:
        return session.execute(select(func.count()).select_from(Training)).scalar_one()


def trained(
    api: Api,
    model_cache: Path,
    class_ids: list[uuid.UUID],
    *,
    eval_set: str = "training_shots",
) -> uuid.UUID:
    """A succeeded training of alice's, its weights stored, as a finished job leaves it
    (its metrics measured on `eval_set`)."""
    names = [f"class{i}" for i in range(len(class_ids))]
    model = build_segmenter(
        "deeplabv3", num_classes=len(names) + 1, spec="tiny", cache_dir=model_cache
    )
    training_id = uuid.uuid4()
    key = training_key(training_id, "weights.zip")
    weights = save_segmenter(model, class_names=names, resolution=RESOLUTION)
    api.storage.put(key, weights, content_type="application/zip")
    metrics = {"per_class_iou": dict.fromkeys(names, 0.5), "miou": 0.5, "eval_set": eval_set}
    with api.session() as session:
        job = Job(
            kind="training",
            owner_id=api.alice_id,
            target_id=training_id,
            status="succeeded",
            progress=1.0,
        )
        session.add(job)
        session.flush()
        session.add(
            Training(
                id=training_id,
                owner_id=api.alice_id,
                class_ids=[str(c) for c in class_ids],
                architecture="deeplabv3",
                steps=10,
                batch_size=2,
                use_synthetic=True,
                copy_paste=True,
                compare_baseline=False,
                metrics=metrics,
                weights_key=key,
                job_id=job.id,
            )
        )
        session.commit()
    return training_id


# --- creating a training -------------------------------------------------------------------


def test_create_training_of_finished_classes_queues_its_job(api: Api) -> None:
    # given: two of alice's classes whose synthesis succeeded
    dog, cat = finished_class(api, "dog"), finished_class(api, "cat")

    # when
    response = api.alice.post("/v1/trainings", json=body(dog, cat, steps=50))

    # then: 202 with the training, its defaults, and where to find it
    assert response.status_code == 202, response.text
    training = response.json()
    assert response.headers["location"].endswith(f"/v1/trainings/{training['id']}")
    assert training["class_ids"] == [str(dog), str(cat)]
    assert (training["status"], training["progress"], training["metrics"]) == ("queued", 0.0, None)
    assert (training["architecture"], training["steps"], training["batch_size"]) == (
        "deeplabv3", 50, 8,
    )  # fmt: skip
    assert (training["use_synthetic"], training["copy_paste"], training["compare_baseline"]) == (
        True, True, False,
    )  # fmt: skip
    # and: a training job, started once the transaction committed
    job = get_job_row(api, uuid.UUID(training["job_id"]))
    assert (job.kind, job.status, job.target_id) == (
        "training",
        "queued",
        uuid.UUID(training["id"]),
    )
    assert api.queue.sent == [(TRAINING_TASK, (training["job_id"],))]
    # and: it reads back as created
    assert api.alice.get(response.headers["location"]).json() == training


def test_the_same_idempotency_key_and_body_replays_the_first_answer(api: Api) -> None:
    dog = finished_class(api)
    headers = {"Idempotency-Key": "train-1"}

    first = api.alice.post("/v1/trainings", json=body(dog), headers=headers)
    second = api.alice.post("/v1/trainings", json=body(dog), headers=headers)

    assert (first.status_code, second.status_code) == (202, 202)
    assert second.json() == first.json()
    assert second.headers["Idempotent-Replayed"] == "true"
    assert training_count(api) == 1 and len(api.queue.sent) == 1


@pytest.mark.parametrize(
    ("fields", "field"),
    [
        ({"architecture": "unet"}, "architecture"),
        ({"steps": 0}, "steps"),
        ({"steps": 20_001}, "steps"),
        ({"batch_size": 65}, "batch_size"),
        ({"owner_id": str(uuid.uuid4())}, "owner_id"),
        ({"status": "succeeded"}, "status"),
    ],
)
def test_invalid_fields_are_refused_with_422(api: Api, fields: dict[str, Any], field: str) -> None:
    dog = finished_class(api)

    response = api.alice.post("/v1/trainings", json=body(dog, **fields))

    assert response.status_code == 422, response.text
    assert response.headers["content-type"] == "application/problem+json"
    assert any(error["field"].endswith(field) for error in response.json()["errors"])
    assert training_count(api) == 0 and api.queue.sent == []


def test_no_classes_or_a_repeated_class_is_refused_with_422(api: Api) -> None:
    dog = finished_class(api)

    assert api.alice.post("/v1/trainings", json=body()).status_code == 422
    assert api.alice.post("/v1/trainings", json=body(dog, dog)).status_code == 422
    assert training_count(api) == 0


def test_unknown_and_other_owners_classes_answer_404(api: Api) -> None:
    dog, bobs = finished_class(api), finished_class(api, "cat", owner="bob")

    unknown = api.alice.post("/v1/trainings", json=body(dog, uuid.uuid4()))
    foreign = api.alice.post("/v1/trainings", json=body(bobs, dog))

    assert unknown.status_code == 404 and unknown.json()["errors"][0]["field"] == "class_ids[1]"
    assert foreign.status_code == 404 and foreign.json()["errors"][0]["field"] == "class_ids[0]"
    assert training_count(api) == 0 and api.queue.sent == []


@pytest.mark.parametrize("status", ["queued", "running", "failed", "cancelled"])
def test_a_class_whose_synthesis_has_not_succeeded_answers_409(api: Api, status: str) -> None:
    dog = finished_class(api)
    unfinished, _ = add_class(api, owner_id=api.alice_id, name="cat", status=status)

    response = api.alice.post("/v1/trainings", json=body(dog, unfinished))

    assert response.status_code == 409, response.text
    assert status in response.json()["errors"][0]["message"]
    assert training_count(api) == 0 and api.queue.sent == []


# --- creating a training with a validation set ---------------------------------------------


def label_map(values: list[int], size: tuple[int, int] = (24, 16), mode: str = "L") -> bytes:
    """A label map of `size`: each value in turn fills a band of rows."""
    width, height = size
    rows = np.array_split(np.arange(height), len(values))
    labels = np.zeros((height, width), np.uint8)
    for band, value in zip(rows, values, strict=True):
        labels[band] = value
    if mode == "RGB":
        return encode(Image.fromarray(labels, mode="L").convert("RGB"))
    image = Image.fromarray(labels, mode="P" if mode == "P" else "L")
    if mode == "P":
        image.putpalette([v for i in range(256) for v in (i, i, i)])
    return encode(image)


def validation_post(
    api: Api,
    request: dict[str, Any],
    images: list[bytes],
    masks: list[bytes],
    **kwargs: Any,
) -> Any:
    files = [("val_images", (f"v{i}.png", data, "image/png")) for i, data in enumerate(images)]
    files += [("val_masks", (f"m{i}.png", data, "image/png")) for i, data in enumerate(masks)]
    return api.alice.post(
        "/v1/trainings", data={"request": json.dumps(request)}, files=files, **kwargs
    )


def assert_no_training_left(api: Api) -> None:
    assert training_count(api) == 0
    assert api.blobs("trainings/") == []
    assert api.queue.sent == []


def test_a_training_with_a_validation_set_stores_it_before_its_row(api: Api) -> None:
    # given: two finished classes, and two validation pairs (L and P label maps) using both
    # classes, background and ignored pixels
    dog, cat = finished_class(api, "dog"), finished_class(api, "cat")
    masks = [label_map([0, 1, 2, 255]), label_map([2, 0], mode="P")]

    # when
    response = validation_post(
        api,
        body(dog, cat, steps=50),
        [encode(photo(), "JPEG"), encode(photo())],
        masks,
    )

    # then: 202, the training as the JSON variant answers it, its job queued
    assert response.status_code == 202, response.text
    training = response.json()
    assert (training["class_ids"], training["steps"]) == ([str(dog), str(cat)], 50)
    assert api.queue.sent == [(TRAINING_TASK, (training["job_id"],))]
    # and: the pairs stored under the training's prefix, named by its row, to be evaluated on
    training_id = uuid.UUID(training["id"])
    with api.session() as session:
        row = session.get(Training, training_id)
        assert row is not None
        keys, eval_set = row.validation_keys, row.eval_set
    assert eval_set == "validation"
    assert keys is not None and len(keys) == 2
    assert sorted(api.blobs("trainings/")) == sorted(key for pair in keys for key in pair)
    assert all(key.startswith(f"trainings/{training_id}/") for pair in keys for key in pair)
    for (image_key, labels_key), mask in zip(keys, masks, strict=True):
        stored = Image.open(BytesIO(api.storage.get(labels_key)))
        assert stored.mode == "L"
        assert np.array_equal(np.asarray(stored), np.asarray(Image.open(BytesIO(mask))))
        assert Image.open(BytesIO(api.storage.get(image_key))).size == (24, 16)


def test_a_json_training_has_no_validation_set(api: Api) -> None:
    response = api.alice.post("/v1/trainings", json=body(finished_class(api)))

    assert response.status_code == 202, response.text
    with api.session() as session:
        row = session.get(Training, uuid.UUID(response.json()["id"]))
        assert row is not None
        assert (row.validation_keys, row.eval_set) == (None, "training_shots")
    assert api.blobs("trainings/") == []


def test_a_training_of_classes_with_2_shots_each_is_evaluated_on_held_out_shots(
    api: Api,
) -> None:
    dog, cat = finished_class(api, "dog", shots=2), finished_class(api, "cat", shots=3)

    response = api.alice.post("/v1/trainings", json=body(dog, cat))

    assert response.status_code == 202, response.text
    with api.session() as session:
        row = session.get(Training, uuid.UUID(response.json()["id"]))
        assert row is not None and row.eval_set == "held_out_shots"


# --- comparing with the baseline -----------------------------------------------------------


def test_compare_baseline_with_nothing_held_out_is_refused_naming_the_classes_of_1_shot(
    api: Api,
) -> None:
    # given: a class of 2 shots and two of 1, and no validation set
    dog = finished_class(api, "dog", shots=2)
    cat, bird = finished_class(api, "cat"), finished_class(api, "bird")

    # when
    response = api.alice.post("/v1/trainings", json=body(dog, cat, bird, compare_baseline=True))

    # then: 422 saying what to add, on the compare_baseline field; nothing recorded
    assert response.status_code == 422, response.text
    assert response.headers["content-type"] == "application/problem+json"
    problem = response.json()
    for words in ("upload a validation set", "at least 2 shots", "classes 'cat' and 'bird'"):
        assert words in problem["detail"]
    assert [error["field"] for error in problem["errors"]] == ["compare_baseline"]
    assert training_count(api) == 0 and api.queue.sent == []


def test_compare_baseline_on_a_class_of_1_shot_is_accepted_with_a_validation_set(
    api: Api,
) -> None:
    dog = finished_class(api)

    response = validation_post(
        api, body(dog, compare_baseline=True), [encode(photo())], [label_map([0, 1])]
    )

    assert response.status_code == 202, response.text
    assert response.json()["compare_baseline"] is True
    with api.session() as session:
        row = session.get(Training, uuid.UUID(response.json()["id"]))
        assert row is not None and row.eval_set == "validation"


def test_compare_baseline_on_classes_of_2_shots_is_accepted(api: Api) -> None:
    dog = finished_class(api, shots=2)

    response = api.alice.post("/v1/trainings", json=body(dog, compare_baseline=True))

    assert response.status_code == 202, response.text


@pytest.mark.parametrize(
    ("mask", "field"),
    [
        (label_map([0, 1, 2]), "val_masks[0]"),  # 2: beyond the one class
        (label_map([0, 7], mode="P"), "val_masks[0]"),
        (label_map([0, 1], mode="RGB"), "val_masks[0]"),  # not single-channel
        (label_map([0, 1], size=(12, 8)), "val_masks[0]"),  # not the image's size
        (b"not an image at all", "val_masks[0]"),
        (encode(box_mask(), "JPEG"), "val_masks[0]"),
    ],
    ids=["beyond-classes", "palette-beyond-classes", "rgb", "wrong-size", "garbage", "jpeg"],
)
def test_an_invalid_label_map_is_refused_without_a_trace(api: Api, mask: bytes, field: str) -> None:
    dog = finished_class(api)

    response = validation_post(api, body(dog), [encode(photo())], [mask])

    assert response.status_code in (415, 422), response.text
    assert response.headers["content-type"] == "application/problem+json"
    assert [error["field"] for error in response.json()["errors"]] == [field]
    assert_no_training_left(api)


def test_masks_in_the_shots_format_are_refused_as_a_validation_set(api: Api) -> None:
    # given: validation masks as the shots are drawn, 0 and 255 (a label map's "ignored")
    dog = finished_class(api)

    # when
    response = validation_post(
        api, body(dog), [encode(photo()), encode(photo())], [label_map([0, 255])] * 2
    )

    # then: 422 saying what a label map holds, rather than a training measured on no object
    assert response.status_code == 422, response.text
    (error,) = response.json()["errors"]
    assert error["field"] == "val_masks"
    assert "no pixel of any class" in error["message"] and "0 and 1" in error["message"]
    assert_no_training_left(api)
    # and: one map with the class beside one of background and ignored pixels is accepted
    accepted = validation_post(
        api, body(dog), [encode(photo()), encode(photo())], [label_map([0, 255]), label_map([0, 1])]
    )
    assert accepted.status_code == 202, accepted.text


def test_an_out_of_range_label_answers_422_naming_the_mask(api: Api) -> None:
    dog = finished_class(api)

    response = validation_post(
        api, body(dog), [encode(photo()), encode(photo())], [label_map([0, 1]), label_map([3])]
    )

    assert response.status_code == 422, response.text
    (error,) = response.json()["errors"]
    assert error["field"] == "val_masks[1]" and "[3]" in error["message"]
    assert_no_training_left(api)


def test_a_count_mismatch_answers_422(api: Api) -> None:
    dog = finished_class(api)

    response = validation_post(
        api, body(dog), [encode(photo()), encode(photo())], [label_map([0, 1])]
    )

    assert response.status_code == 422, response.text
    assert [error["field"] for error in response.json()["errors"]] == ["val_masks"]
    assert_no_training_left(api)


def test_too_many_validation_images_answer_422(make_api: ApiFactory) -> None:
    api = make_api(max_validation_images=1)
    dog = finished_class(api)

    response = validation_post(api, body(dog), [encode(photo())] * 2, [label_map([0, 1])] * 2)

    assert response.status_code == 422, response.text
    assert [error["field"] for error in response.json()["errors"]] == ["val_images"]
    assert_no_training_left(api)


def test_a_gif_validation_image_answers_415(api: Api) -> None:
    dog = finished_class(api)

    response = validation_post(api, body(dog), [encode(photo(), "GIF")], [label_map([0, 1])])

    assert response.status_code == 415, response.text
    assert [error["field"] for error in response.json()["errors"]] == ["val_images[0]"]
    assert_no_training_left(api)


def test_the_multipart_request_field_is_validated_like_the_json_body(api: Api) -> None:
    dog = finished_class(api)
    image, mask = [encode(photo())], [label_map([0, 1])]

    extra = validation_post(api, body(dog, owner_id=str(uuid.uuid4())), image, mask)
    missing = api.alice.post(
        "/v1/trainings", data={"x": "1"}, files=[("val_images", ("v.png", image[0], ""))]
    )
    unknown = validation_post(api, body(dog, uuid.uuid4()), image, mask)

    assert extra.status_code == 422
    assert [error["field"] for error in extra.json()["errors"]] == ["request.owner_id"]
    assert missing.status_code == 422 and missing.json()["errors"][0]["field"] == "request"
    assert unknown.status_code == 404
    assert unknown.json()["errors"][0]["field"] == "class_ids[1]"
    assert_no_training_left(api)


def test_a_body_of_another_type_answers_415(api: Api) -> None:
    response = api.alice.post(
        "/v1/trainings", content=b"class_ids=1", headers={"Content-Type": "text/plain"}
    )

    assert response.status_code == 415
    assert training_count(api) == 0


def test_the_validation_blobs_go_when_the_rows_cannot_be_committed(
    api: Api, monkeypatch: pytest.MonkeyPatch
) -> None:
    dog = finished_class(api)

    def broken(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("database gone")

    monkeypatch.setattr("service.contexts.trainings.commit_with_answer", broken)
    with pytest.raises(RuntimeError):
        validation_post(api, body(dog), [encode(photo())], [label_map([0, 1])])

    assert_no_training_left(api)


def test_a_multipart_replay_with_the_same_key_stores_nothing_more(api: Api) -> None:
    dog = finished_class(api)
    headers = {"Idempotency-Key": "train-val"}
    args = (body(dog), [encode(photo())], [label_map([0, 1])])

    first = validation_post(api, *args, headers=headers)
    second = validation_post(api, *args, headers=headers)
    other = validation_post(api, body(dog), [encode(photo())], [label_map([1])], headers=headers)

    assert (first.status_code, second.status_code, other.status_code) == (202, 202, 422)
    assert second.json() == first.json()
    assert training_count(api) == 1 and len(api.blobs("trainings/")) == 2


# --- reading -------------------------------------------------------------------------------


def test_another_owners_training_answers_404(api: Api) -> None:
    training = api.alice.post("/v1/trainings", json=body(finished_class(api))).json()

    for path in ("", "/weights"):
        assert api.bob.get(f"/v1/trainings/{training['id']}{path}").status_code == 404
    files = {"image": ("a.png", encode(photo()), "image/png")}
    assert api.bob.post(f"/v1/trainings/{training['id']}/predict", files=files).status_code == 404
    assert api.bob.get("/v1/trainings").json()["items"] == []
    assert api.admin.get(f"/v1/trainings/{training['id']}").status_code == 200


def test_listing_pages_through_the_owners_trainings_newest_first(api: Api) -> None:
    dog = finished_class(api)
    ids = [api.alice.post("/v1/trainings", json=body(dog)).json()["id"] for _ in range(3)]

    first = api.alice.get("/v1/trainings", params={"limit": 2}).json()
    second = api.alice.get(
        "/v1/trainings", params={"limit": 2, "cursor": first["next_cursor"]}
    ).json()

    listed = [t["id"] for t in first["items"] + second["items"]]
    assert listed == ids[::-1] and second["next_cursor"] is None


def test_metrics_stored_before_held_out_evaluation_read_as_measured_on_the_training_shots(
    api: Api, model_cache: Path
) -> None:
    training_id = trained(api, model_cache, [finished_class(api)], eval_set="shots")

    metrics = api.alice.get(f"/v1/trainings/{training_id}").json()["metrics"]

    assert metrics["eval_set"] == "training_shots"


def test_weights_and_predict_are_a_conflict_until_the_training_succeeded(api: Api) -> None:
    training = api.alice.post("/v1/trainings", json=body(finished_class(api))).json()
    files = {"image": ("a.png", encode(photo()), "image/png")}

    weights = api.alice.get(f"/v1/trainings/{training['id']}/weights")
    predicted = api.alice.post(f"/v1/trainings/{training['id']}/predict", files=files)

    assert (weights.status_code, predicted.status_code) == (409, 409)


# --- deleting a class trained on ----------------------------------------------------------


def test_deleting_a_class_cancels_its_owners_unfinished_trainings_on_it_with_the_reason(
    api: Api, model_cache: Path
) -> None:
    # given: alice's trainings on her class dog: one queued, one running (a worker has it),
    # one finished; and a queued one on her other class only
    dog, cat = finished_class(api, "dog"), finished_class(api, "cat")
    queued = api.alice.post("/v1/trainings", json=body(cat, dog)).json()
    running = api.alice.post("/v1/trainings", json=body(dog)).json()
    running_job = uuid.UUID(running["job_id"])
    with api.session() as session:
        assert jobs.claim(session, running_job, worker="w:1", lease_seconds=600, max_attempts=3)
        session.commit()
    other = api.alice.post("/v1/trainings", json=body(cat)).json()
    finished = trained(api, model_cache, [dog])
    finished_before = api.alice.get(f"/v1/trainings/{finished}").json()

    # when: alice deletes dog
    assert api.alice.delete(f"/v1/classes/{dog}").status_code == 204

    # then: the queued training is cancelled at once, its job saying why
    reason = f"cancelled: class {dog}, which it trains on, was deleted"
    shown = api.alice.get(f"/v1/trainings/{queued['id']}").json()
    assert (shown["status"], shown["error"]) == ("cancelled", reason)
    job = api.alice.get(f"/v1/jobs/{queued['job_id']}").json()
    assert (job["status"], job["error"]) == ("cancelled", reason)
    # and: the running one is told to stop at its next batch, and ends cancelled with the
    # reason when its worker sees it
    with api.session() as session:
        assert not jobs.report_progress(
            session, running_job, stage=None, progress=0.5, lease_seconds=600
        )
        assert jobs.should_stop(session, running_job)
        assert jobs.finish_cancelled(session, running_job)
        session.commit()
    shown = api.alice.get(f"/v1/trainings/{running['id']}").json()
    assert (shown["status"], shown["error"]) == ("cancelled", reason)
    # and: the training on cat only goes on; the finished one keeps its weights and metrics
    shown = api.alice.get(f"/v1/trainings/{other['id']}").json()
    assert (shown["status"], shown["error"]) == ("queued", None)
    assert api.alice.get(f"/v1/trainings/{finished}").json() == finished_before
    weights = api.alice.get(f"/v1/trainings/{finished}/weights")
    assert weights.status_code == 200
    assert load_segmenter(weights.content)[1]["class_names"] == ["class0"]
    # and: a cancelled training on the deleted class cannot be retried (it could only fail)
    retried = api.alice.post(f"/v1/jobs/{queued['job_id']}/retry")
    assert retried.status_code == 409
    assert f"class {dog} was deleted" in retried.json()["detail"]


def test_deleting_a_class_cancels_an_admin_s_training_on_it_too(api: Api) -> None:
    # given: an admin training on alice's class dog, and bob's training on his own class
    dog = finished_class(api, "dog")
    admins = api.admin.post("/v1/trainings", json=body(dog))
    assert admins.status_code == 202
    bobs = api.bob.post("/v1/trainings", json=body(finished_class(api, "cat", owner="bob")))
    assert bobs.status_code == 202

    # when: alice deletes dog
    assert api.alice.delete(f"/v1/classes/{dog}").status_code == 204

    # then: the admin's training is cancelled with the reason; bob's is left alone
    shown = api.admin.get(f"/v1/trainings/{admins.json()['id']}").json()
    assert (shown["status"], shown["error"]) == (
        "cancelled",
        f"cancelled: class {dog}, which it trains on, was deleted",
    )
    assert api.bob.get(f"/v1/trainings/{bobs.json()['id']}").json()["status"] == "queued"


def test_a_class_deleted_while_a_training_on_it_is_created_cancels_that_training(
    api: Api, monkeypatch: pytest.MonkeyPatch
) -> None:
    if api.settings.resolved_database_url.startswith("sqlite"):
        pytest.skip("SQLite runs one writer at a time: no interleaving to test")
    # given: a training being created on dog, held just after it checked its classes
    dog = finished_class(api, "dog")
    checked, go = threading.Event(), threading.Event()
    enforce = quotas.enforce

    def held(*args: Any, **kwargs: Any) -> None:
        if kwargs.get("lock", True):
            checked.set()
            go.wait(timeout=20)
        enforce(*args, **kwargs)

    monkeypatch.setattr(quotas, "enforce", held)
    answers: dict[str, Any] = {}

    def create() -> None:
        answers["created"] = api.alice.post("/v1/trainings", json=body(dog))

    def delete() -> None:
        answers["deleted"] = api.alice.delete(f"/v1/classes/{dog}")

    creating = threading.Thread(target=create)
    creating.start()
    assert checked.wait(timeout=20)

    # when: alice deletes dog meanwhile, and then the training's creation goes on
    deleting = threading.Thread(target=delete)
    deleting.start()
    deleting.join(timeout=1)
    waited = deleting.is_alive()
    go.set()
    creating.join(timeout=30)
    deleting.join(timeout=30)

    # then: the delete waited for the training, which it then cancelled
    assert waited
    assert answers["created"].status_code == 202 and answers["deleted"].status_code == 204
    shown = api.alice.get(f"/v1/trainings/{answers['created'].json()['id']}").json()
    assert (shown["status"], shown["error"]) == (
        "cancelled",
        f"cancelled: class {dog}, which it trains on, was deleted",
    )


# --- the trained model ---------------------------------------------------------------------


def test_weights_download_as_a_zip_that_loads_and_predicts_like_the_api(
    worker_api: Api, model_cache: Path
) -> None:
    # given: a succeeded training of two classes, and a worker process serving predictions
    api = worker_api
    training_id = trained(api, model_cache, [finished_class(api), finished_class(api, "cat")])
    image = photo((40, 24))

    # when: its weights are downloaded and an image is sent to predict (run by the worker)
    weights = api.alice.get(f"/v1/trainings/{training_id}/weights")
    predicted = api.alice.post(
        f"/v1/trainings/{training_id}/predict",
        files={"image": ("a.png", encode(image), "image/png")},
    )

    # then: the zip holds the safetensors and the config, and loads
    assert weights.status_code == 200, weights.text
    assert weights.headers["content-type"] == "application/zip"
    with zipfile.ZipFile(BytesIO(weights.content)) as archive:
        assert {"model.safetensors", "config.json"} <= set(archive.namelist())
        config = json.loads(archive.read("config.json"))
    assert config["class_names"] == ["class0", "class1"]
    model, _ = load_segmenter(weights.content)
    # and: the worker's mask is the loaded model's prediction in this process, as a grayscale
    # PNG of the image's size
    assert predicted.status_code == 200, predicted.text
    assert predicted.headers["content-type"] == "image/png"
    mask = Image.open(BytesIO(predicted.content))
    assert (mask.mode, mask.size) == ("L", image.size)
    (expected,) = predict(model, [np.asarray(image)], resolution=RESOLUTION)
    assert np.array_equal(np.asarray(mask), expected)
    assert set(np.unique(expected)) <= {0, 1, 2}
    # and: its metrics show
    assert api.alice.get(f"/v1/trainings/{training_id}").json()["metrics"] == {
        "per_class_iou": {"class0": 0.5, "class1": 0.5},
        "miou": 0.5,
        "eval_set": "training_shots",
        "per_class_iou_std": None,
        "folds": None,
        "baseline": None,
        "comparison": None,
    }


def test_predict_refuses_what_is_not_an_image(api: Api, model_cache: Path) -> None:
    training_id = trained(api, model_cache, [finished_class(api)])
    url = f"/v1/trainings/{training_id}/predict"

    text = api.alice.post(url, files={"image": ("a.png", b"not an image", "image/png")})
    json_body = api.alice.post(url, json={"image": "x"})
    missing = api.alice.post(url, files={"other": ("a.png", encode(photo()), "image/png")})

    assert text.status_code == 415 and text.json()["errors"][0]["field"] == "image"
    assert json_body.status_code == 415
    assert missing.status_code == 422
    # and: none of them reached a worker
    assert api.queue.sent == []


def test_a_prediction_only_worker_answers_while_it_leaves_the_jobs_tasks_queued(
    worker_api: Api, model_cache: Path
) -> None:
    # given: a training queued (its task sent to the jobs' queue on the worker's Redis) and a
    # succeeded one
    api = worker_api
    dog = finished_class(api)
    queued = api.alice.post("/v1/trainings", json=body(dog))
    training_id = trained(api, model_cache, [dog])

    # when: an image is sent to predict with the succeeded one
    predicted = api.alice.post(
        f"/v1/trainings/{training_id}/predict",
        files={"image": ("a.png", encode(photo()), "image/png")},
    )

    # then: the worker answered, and left the job's task to the workers of the jobs' queue
    assert queued.status_code == 202 and predicted.status_code == 200, predicted.text
    broker = redis.Redis.from_url(api.settings.resolved_broker_url)
    assert broker.llen(JOBS_QUEUE) == 1
    broker.delete(JOBS_QUEUE)
    broker.close()


def test_a_worker_logs_a_prediction_without_its_mask(
    worker_api: Api, predict_worker: PredictWorker, model_cache: Path
) -> None:
    # given: a succeeded training
    api = worker_api
    training_id = trained(api, model_cache, [finished_class(api)])

    # when: an image is sent to predict, and the worker logs its task's end
    predicted = api.alice.post(
        f"/v1/trainings/{training_id}/predict",
        files={"image": ("a.png", encode(photo()), "image/png")},
    )
    assert predicted.status_code == 200, predicted.text
    log = predict_worker.process.log
    ended = wait_for(
        lambda: [line for line in log.read_text().splitlines() if "succeeded in" in line],
        timeout=10,
        what="the prediction's end in the worker's log",
        log=log,
    )

    # then: the log says which task ended and how fast, never the PNG it returned
    assert all(line.rstrip().endswith("s") for line in ended), ended
    assert unreadable_log_lines(log.read_text(errors="replace")) == []


def test_a_worker_that_fails_to_predict_answers_a_problem_naming_the_error(
    worker_api: Api, model_cache: Path
) -> None:
    # given: a succeeded training whose stored weights are damaged
    api = worker_api
    training_id = trained(api, model_cache, [finished_class(api)])
    with api.session() as session:
        training = session.get(Training, training_id)
        assert training is not None and training.weights_key is not None
        api.storage.put(training.weights_key, b"not a zip", content_type="application/zip")

    # when: an image is sent to predict
    predicted = api.alice.post(
        f"/v1/trainings/{training_id}/predict",
        files={"image": ("a.png", encode(photo()), "image/png")},
    )

    # then: the worker's error comes back as a problem, and the API carries on
    assert predicted.status_code == 500
    assert predicted.headers["content-type"] == "application/problem+json"
    assert "BadZipFile" in predicted.json()["detail"]
    assert api.alice.get(f"/v1/trainings/{training_id}").status_code == 200


def test_predict_answers_503_with_retry_after_when_no_worker_answers_in_time(
    make_api: ApiFactory, predict_worker: PredictWorker, model_cache: Path
) -> None:
    # given: an app whose broker no worker consumes (another database of the same Redis),
    # waiting at most half a second for a prediction
    idle = PredictWorker(
        predict_worker.redis_url.rsplit("/", 1)[0] + "/1",
        predict_worker.blobs,
        predict_worker.process,
    )
    api = api_with_worker(make_api, idle, predict_timeout_seconds=0.5)
    training_id = trained(api, model_cache, [finished_class(api)])

    # when: an image is sent to predict
    started = time.monotonic()
    predicted = api.alice.post(
        f"/v1/trainings/{training_id}/predict",
        files={"image": ("a.png", encode(photo()), "image/png")},
    )

    # then: 503 soon after the timeout, saying when to retry
    assert predicted.status_code == 503, predicted.text
    assert predicted.headers["retry-after"] == "1"
    assert "no worker answered" in predicted.json()["detail"]
    assert time.monotonic() - started < 10
