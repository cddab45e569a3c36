"""The few-shot segmenter on real trained DINOv2-small features, fetched at test set-up.

The weights come from a published ONNX model (see tests/real_models.py); the first session
downloads and converts them (about ten seconds), later ones reuse the cached folder.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from aligndiff.fss import PrototypeSegmenter, RGBImage
from aligndiff.masks import BoolMask, iou
from aligndiff.models.backbone import IMAGENET_MEAN, IMAGENET_STD, load_backbone
from aligndiff.shots import load_shots
from tests.real_models import FEATURE_TOLERANCE, focus_onnx_bytes, max_feature_difference

SELF_IOU = 0.8


@pytest.fixture(scope="module")
def real_segmenter(real_dinov2: Path, model_cache: Path) -> PrototypeSegmenter:
    backbone = load_backbone(
        str(real_dinov2), device="cpu", dtype=torch.float32, cache_dir=model_cache
    )
    return PrototypeSegmenter(backbone)


def self_prediction_iou(segmenter: PrototypeSegmenter, image: RGBImage, mask: BoolMask) -> float:
    """IoU with its mask of an image's prediction from prototypes calibrated on itself."""
    features = segmenter.embed([image])
    (probability,) = segmenter.predict(segmenter.calibrate(features, [mask]), features)
    return iou(probability > 0.5, mask)


def only_shot(folder: Path) -> tuple[RGBImage, BoolMask]:
    (shot,) = load_shots(folder)
    return shot.image_array, shot.mask


def test_the_converted_backbone_computes_the_onnx_models_features(
    real_dinov2: Path, real_models_cache: Path
) -> None:
    # given normalized pixels of a random image at the ONNX model's input size
    pixels = np.random.default_rng(1).standard_normal((1, 3, 224, 224)).astype(np.float32)

    # when the converted model and onnxruntime both embed them
    difference = max_feature_difference(real_dinov2, focus_onnx_bytes(real_models_cache), pixels)

    # then their features agree
    assert difference < FEATURE_TOLERANCE


def test_load_backbone_feeds_the_converted_model_at_its_own_size_and_normalization(
    real_segmenter: PrototypeSegmenter,
) -> None:
    backbone = real_segmenter.backbone

    assert (backbone.image_size, backbone.patch_size, backbone.grid_size) == (224, 14, 16)
    assert (backbone.mean, backbone.std) == (IMAGENET_MEAN, IMAGENET_STD)


def test_real_features_segment_the_albatross_shot_s_own_image(
    real_segmenter: PrototypeSegmenter, albatross_shots_dir: Path
) -> None:
    assert self_prediction_iou(real_segmenter, *only_shot(albatross_shots_dir)) > SELF_IOU


def test_real_features_segment_the_quokka_photo_s_own_image(
    real_segmenter: PrototypeSegmenter, quokka_shot: tuple[RGBImage, BoolMask]
) -> None:
    assert self_prediction_iou(real_segmenter, *quokka_shot) > SELF_IOU
