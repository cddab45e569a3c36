"""Downstream training: it learns, it resumes exactly, and its metrics match torchmetrics."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from torchmetrics.classification import MulticlassJaccardIndex

from aligndiff.models.segmenters import SegmentationModel, build_segmenter
from aligndiff.training import (
    TrainingConfig,
    TrainingState,
    evaluate,
    iou_from_predictions,
    predict,
    train_segmenter,
)
from tests.segmentation_support import disk_training_set, random_uint8_image


def tiny_model(architecture: str, model_cache: Path, seed: int = 0) -> SegmentationModel:
    torch.manual_seed(seed)
    return build_segmenter(architecture, num_classes=2, cache_dir=model_cache)


def test_deeplab_learns_striped_disks(model_cache: Path) -> None:
    # Given an untrained DeepLabV3, training images and held-out images of striped disks
    model = tiny_model("deeplabv3", model_cache)
    data = disk_training_set(8, seed=0)
    held_out = disk_training_set(6, seed=1).images
    images, labels = [s.image for s in held_out], [s.labels for s in held_out]
    before = evaluate(model, images, labels, ["disk"], resolution=64)

    # When it is trained with copy-paste
    config = TrainingConfig(architecture="deeplabv3", steps=60, batch_size=4)
    outcome = train_segmenter(model, data, config)

    # Then the loss falls and held-out IoU rises well above the untrained model's
    after = evaluate(model, images, labels, ["disk"], resolution=64)
    assert outcome.steps_done == 60 and not outcome.stopped
    assert np.mean(outcome.losses[-10:]) < 0.5 * np.mean(outcome.losses[:5])
    assert after.per_class_iou["disk"] > 0.6
    assert after.per_class_iou["disk"] > before.per_class_iou["disk"] + 0.3
    assert after.miou > before.miou


def test_segformer_trains(model_cache: Path) -> None:
    model = tiny_model("segformer", model_cache)
    progress: list[tuple[int, int]] = []

    outcome = train_segmenter(
        model,
        disk_training_set(4, seed=0),
        TrainingConfig.tiny("segformer"),
        progress=lambda done, total: progress.append((done, total)),
    )

    assert outcome.steps_done == 20
    assert all(np.isfinite(outcome.losses))
    assert outcome.losses[-1] < outcome.losses[0]
    assert progress[-1] == (20, 20)


def test_resumed_run_matches_an_uninterrupted_one(model_cache: Path) -> None:
    # Given one initial model and a 6-step run that checkpoints every 3 steps
    initial = tiny_model("deeplabv3", model_cache).state_dict()
    data = disk_training_set(4, seed=0)
    config = TrainingConfig(
        architecture="deeplabv3", steps=6, batch_size=2, checkpoint_every=3, seed=7
    )
    uninterrupted = tiny_model("deeplabv3", model_cache)
    uninterrupted.load_state_dict(initial)
    train_segmenter(uninterrupted, data, config)

    # When a run is killed after step 3 (only its serialized checkpoints survive)
    checkpoints: list[bytes] = []
    done: list[int] = []
    killed = tiny_model("deeplabv3", model_cache)
    killed.load_state_dict(initial)
    first = train_segmenter(
        killed,
        data,
        config,
        progress=lambda step, total: done.append(step),
        should_stop=lambda: bool(done) and done[-1] >= 3,
        checkpoint=lambda state: checkpoints.append(state.to_bytes()),
    )
    # and a fresh process resumes from the last checkpoint
    resumed = tiny_model("deeplabv3", model_cache, seed=123)
    second = train_segmenter(
        resumed, data, config, resume=TrainingState.from_bytes(checkpoints[-1])
    )

    # Then the run stopped at 3, resumed to 6, and ends with the same weights
    assert first.stopped and first.steps_done == 3
    assert second.steps_done == 6 and len(second.losses) == 3
    expected = uninterrupted.state_dict()
    for name, tensor in resumed.state_dict().items():
        torch.testing.assert_close(tensor, expected[name], atol=1e-5, rtol=0, msg=name)


def test_iou_matches_torchmetrics_per_class() -> None:
    # Given random predictions and labels (with ignored pixels) over several images and sizes
    rng = np.random.default_rng(0)
    num_classes = 4
    shapes = [(20, 30), (17, 17), (40, 9)]
    predictions = [rng.integers(0, num_classes, size=s, dtype=np.uint8) for s in shapes]
    labels = [rng.integers(0, num_classes, size=s, dtype=np.uint8) for s in shapes]
    for label in labels:
        label[rng.random(label.shape) < 0.2] = 255

    # When IoU is computed here and by torchmetrics
    ours, present = iou_from_predictions(predictions, labels, num_classes)
    metric = MulticlassJaccardIndex(num_classes, average=None, ignore_index=255)
    for prediction, label in zip(predictions, labels, strict=True):
        metric.update(
            torch.from_numpy(prediction).long().flatten(), torch.from_numpy(label).long().flatten()
        )

    # Then they agree class by class
    np.testing.assert_allclose(ours, metric.compute().numpy(), atol=1e-6)
    assert all(present)


def test_evaluate_reports_every_class_by_name_as_torchmetrics_does(model_cache: Path) -> None:
    torch.manual_seed(0)
    model = build_segmenter("deeplabv3", num_classes=3, cache_dir=model_cache)
    rng = np.random.default_rng(0)
    images = [random_uint8_image(rng, 32, 40) for _ in range(2)]
    labels = [rng.integers(0, 3, size=(32, 40), dtype=np.uint8) for _ in range(2)]

    metrics = evaluate(model, images, labels, ["cat", "dog"], resolution=64)

    per_class = MulticlassJaccardIndex(3, average=None, ignore_index=255)
    macro = MulticlassJaccardIndex(3, average="macro", ignore_index=255)
    for prediction, label in zip(predict(model, images, resolution=64), labels, strict=True):
        per_class.update(torch.from_numpy(prediction).long(), torch.from_numpy(label).long())
        macro.update(torch.from_numpy(prediction).long(), torch.from_numpy(label).long())
    expected = per_class.compute().numpy()
    assert list(metrics.per_class_iou) == ["cat", "dog"]
    np.testing.assert_allclose(
        [metrics.per_class_iou["cat"], metrics.per_class_iou["dog"]], expected[1:], atol=1e-6
    )
    assert metrics.miou == pytest.approx(float(macro.compute()), abs=1e-6)


@pytest.mark.parametrize("architecture", ["deeplabv3", "segformer"])
def test_predict_returns_label_maps_at_each_image_size(
    architecture: str, model_cache: Path
) -> None:
    model = build_segmenter(architecture, num_classes=3, cache_dir=model_cache)
    rng = np.random.default_rng(0)
    shapes = [(50, 70), (64, 64), (33, 20)]
    images = [random_uint8_image(rng, *s) for s in shapes] * 4  # more than one batch

    maps = predict(model, images, resolution=64)

    assert [m.shape for m in maps] == shapes * 4
    assert all(m.dtype == np.uint8 and m.max() < 3 for m in maps)


def test_config_refuses_nonsense() -> None:
    with pytest.raises(ValueError, match="steps"):
        TrainingConfig(architecture="deeplabv3", steps=0, batch_size=1)
    with pytest.raises(ValueError, match="architecture"):
        TrainingConfig(architecture="unet", steps=1, batch_size=1)
