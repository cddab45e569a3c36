"""A training follows the reviewers: a sample they rejected is not trained on, one they accepted
is, and a mask they drew is the one trained on. The training is created through the API and
run by the worker's real task, in process."""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest

import aligndiff.training
from aligndiff.masks import binarize_mask
from tests.api_support import ApiFactory, box_mask, encode
from tests.dataset_support import create_finished_class
from tests.worker_support import InProcessQueue
from worker.celery_app import make_celery

pytest_plugins = ["tests.api_support", "tests.dataset_support"]

TRAINING = "aligndiff.training.start"


@dataclass(frozen=True)
class TrainedObject:
    """An object a training was given: where it came from, its image and its mask."""

    kind: str
    image: npt.NDArray[np.uint8]
    mask: npt.NDArray[np.bool_]


@pytest.fixture
def trained_objects(monkeypatch: pytest.MonkeyPatch) -> list[list[TrainedObject]]:
    """The objects (image and mask) of each `train_segmenter` call the worker makes, call by
    call; the training itself runs as it would."""
    calls: list[list[TrainedObject]] = []
    train_segmenter = aligndiff.training.train_segmenter

    def recording(
        model: Any, data: aligndiff.training.TrainingSet, config: Any, **kwargs: Any
    ) -> aligndiff.training.TrainingOutcome:
        calls.append([TrainedObject(o.kind, o.image, o.mask) for o in data.objects])
        return train_segmenter(model, data, config, **kwargs)

    monkeypatch.setattr(aligndiff.training, "train_segmenter", recording)
    return calls


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_a_training_uses_the_reviewers_verdicts_and_masks(
    make_api: ApiFactory, model_cache: Path, trained_objects: list[list[TrainedObject]]
) -> None:
    # given: a finished class of 4 samples (the filters rejected sample 2)
    api = make_api(model_cache_dir=model_cache, training_resolution=32, broker_url="memory://")
    dataset = create_finished_class(api, num_samples=4, rejected_every=3)
    page = api.alice.get(f"/v1/classes/{dataset.id}/samples").json()["items"]
    ids = {sample["index"]: uuid.UUID(sample["id"]) for sample in page}
    # ... which a reviewer went through: sample 0 rejected, sample 2 accepted, sample 1's mask
    # drawn again
    drawn = box_mask((32, 32))
    for index, accepted in ((0, False), (2, True)):
        response = api.alice.patch(f"/v1/samples/{ids[index]}", json={"accepted": accepted})
        assert response.status_code == 200, response.text
    response = api.alice.put(
        f"/v1/samples/{ids[1]}/mask", files={"mask": ("m.png", encode(drawn), "image/png")}
    )
    assert response.status_code == 200, response.text

    # when: a training on the class with its samples runs on a worker
    created = api.alice.post(
        "/v1/trainings",
        json={
            "class_ids": [str(dataset.id)],
            "architecture": "deeplabv3",
            "steps": 2,
            "batch_size": 2,
            "copy_paste": False,
        },
    )
    assert created.status_code == 202, created.text
    worker = make_celery(api.settings, queue=InProcessQueue())
    worker.loader.import_default_modules()
    for name, args in api.queue.sent:
        if name == TRAINING:
            worker.tasks[name].apply(args=list(args), throw=True)

    # then: it succeeded, and every run trained on samples 1, 2 and 3, sample 1 with the
    # reviewer's mask, and never on sample 0
    training = api.alice.get(f"/v1/trainings/{created.json()['id']}").json()
    assert training["status"] == "succeeded", training["error"]
    assert trained_objects
    stored = {index: dataset.samples[index].pixels for index in range(4)}
    for objects in trained_objects:
        synthetic = [o for o in objects if o.kind != "shot"]
        trained = [
            index
            for index, pixels in stored.items()
            if any(np.array_equal(o.image, pixels) for o in synthetic)
        ]
        assert trained == [1, 2, 3]
        (reviewed,) = [o for o in synthetic if np.array_equal(o.image, stored[1])]
        assert np.array_equal(reviewed.mask, binarize_mask(drawn))
