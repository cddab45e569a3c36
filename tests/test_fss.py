"""The default few-shot segmenter: prototype matching over a DINOv2-style backbone."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from transformers.modeling_outputs import BaseModelOutput

from aligndiff.fss import PrototypeSegmenter, RGBImage
from aligndiff.masks import BoolMask, iou
from aligndiff.models.backbone import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    BackboneBundle,
    load_backbone,
    save_tiny_backbone,
)


def striped_scene(
    height: int, width: int, *, center: tuple[int, int], radius: int, seed: int = 0
) -> tuple[RGBImage, BoolMask]:
    """A disk of vertical stripes (the object) on horizontal stripes, with mild noise."""
    rng = np.random.default_rng(seed)
    rows, cols = np.mgrid[0:height, 0:width]
    mask = (rows - center[0]) ** 2 + (cols - center[1]) ** 2 <= radius**2
    pattern = np.where(mask, (cols // 2) % 2, (rows // 3) % 2)
    gray = 0.3 + 0.4 * pattern + rng.normal(0.0, 0.03, (height, width))
    image = np.clip(gray * 255, 0, 255).astype(np.uint8)
    return np.repeat(image[..., None], 3, axis=2), mask


def noise_image(height: int, width: int, *, seed: int) -> RGBImage:
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


class OrientedEnergyBackbone(torch.nn.Module):
    """A fixed, hand-made texture backbone: per-patch energy of horizontal and vertical gradients.

    NOTE: the random-weight tiny DINOv2 exercises every code path but has learned no texture
    features (IoU 0.17-0.42 on the striped scenes, where predicting everything scores 0.13-0.21),
    so the segmentation-quality test needs features known to separate the two textures.
    It speaks the DINOv2 output contract, CLS token included, so the segmenter runs unchanged.
    """

    def __init__(self, patch_size: int) -> None:
        super().__init__()
        sobel = torch.tensor([[-1.0, 0.0, 1.0], [-2.0, 0.0, 2.0], [-1.0, 0.0, 1.0]])
        self.filters: torch.Tensor
        self.register_buffer("filters", torch.stack([sobel, sobel.T])[:, None])
        self.patch_size = patch_size

    def forward(self, pixel_values: torch.Tensor) -> BaseModelOutput:
        gray = F.pad(pixel_values.mean(dim=1, keepdim=True), (1, 1, 1, 1), mode="replicate")
        energy = F.conv2d(gray, self.filters).square()
        patches = F.avg_pool2d(energy, self.patch_size).sqrt().flatten(2).transpose(1, 2)
        cls = patches.mean(dim=1, keepdim=True)
        return BaseModelOutput(last_hidden_state=torch.cat([cls, patches], dim=1))


@pytest.fixture(scope="module")
def tiny_backbone(tmp_path_factory: pytest.TempPathFactory) -> BackboneBundle:
    cache_dir = tmp_path_factory.mktemp("model-cache")
    return load_backbone("tiny", device="cpu", dtype=torch.float32, cache_dir=cache_dir)


@pytest.fixture
def texture_backbone() -> BackboneBundle:
    return BackboneBundle(
        model=OrientedEnergyBackbone(patch_size=8),
        image_size=128,
        mean=IMAGENET_MEAN,
        std=IMAGENET_STD,
        patch_size=8,
        model_id="test-oriented-energy",
    )


@pytest.mark.parametrize("refine", [False, True])
def test_segmenter_finds_the_object_at_a_new_position_and_size(
    texture_backbone: BackboneBundle, refine: bool
) -> None:
    # Given one square support and non-square queries with the object elsewhere, larger or smaller
    segmenter = PrototypeSegmenter(texture_backbone, refine=refine)
    support, support_mask = striped_scene(128, 128, center=(50, 60), radius=30, seed=0)
    queries = [
        striped_scene(96, 160, center=(55, 100), radius=25, seed=1),
        striped_scene(200, 150, center=(120, 60), radius=45, seed=2),
    ]

    # When the segmenter is calibrated on the support and predicts the queries
    prototypes = segmenter.calibrate(segmenter.embed([support]), [support_mask])
    predictions = segmenter.predict(prototypes, segmenter.embed([image for image, _ in queries]))

    # Then the thresholded prediction covers the object, far better than "everything"
    for prediction, (_, truth) in zip(predictions, queries, strict=True):
        trivial = iou(np.ones_like(truth), truth)
        found = iou(prediction > 0.5, truth)
        assert found > 0.8
        assert found > trivial + 0.5


def test_tiny_dinov2_predicts_probabilities_at_each_query_size(
    tiny_backbone: BackboneBundle,
) -> None:
    # Given supports and queries of assorted, non-square sizes, embedded two at a time
    segmenter = PrototypeSegmenter(tiny_backbone, batch_size=2)
    supports = [striped_scene(128, 128, center=(50, 60), radius=30, seed=0)]
    supports.append(striped_scene(90, 140, center=(40, 70), radius=20, seed=1))
    query_sizes = [(96, 160), (128, 128), (200, 72)]
    queries = [noise_image(h, w, seed=i) for i, (h, w) in enumerate(query_sizes)]

    # When the segmenter embeds, calibrates and predicts
    support_features = segmenter.embed([image for image, _ in supports])
    prototypes = segmenter.calibrate(support_features, [mask for _, mask in supports])
    query_features = segmenter.embed(queries)
    predictions = segmenter.predict(prototypes, query_features)

    # Then features are DINOv2 patch tokens on the 16x16 grid, without the CLS token
    assert query_features.maps.shape == (3, 64, 16, 16)
    assert query_features.sizes == query_sizes
    # and batching does not change them
    one_by_one = torch.cat([segmenter.embed([query]).maps for query in queries])
    torch.testing.assert_close(query_features.maps, one_by_one, rtol=1e-4, atol=1e-5)
    # and each query gets a float32 probability map of its own size
    assert [prediction.shape for prediction in predictions] == query_sizes
    for prediction in predictions:
        assert prediction.dtype == np.float32
        assert np.isfinite(prediction).all()
        assert prediction.min() >= 0.0 and prediction.max() <= 1.0


def test_calibrate_leaves_the_segmenter_and_features_unchanged(
    tiny_backbone: BackboneBundle,
) -> None:
    # Given one embedded support image and two different masks for it
    segmenter = PrototypeSegmenter(tiny_backbone)
    image, disk = striped_scene(128, 128, center=(50, 60), radius=30)
    support = segmenter.embed([image])
    support_before = support.maps.clone()
    query = segmenter.embed([noise_image(100, 120, seed=7)])

    # When it is calibrated on the first mask, then the second, then the first again
    first = segmenter.calibrate(support, [disk])
    first_prediction = segmenter.predict(first, query)[0]
    second = segmenter.calibrate(support, [~disk])
    again = segmenter.calibrate(support, [disk])

    # Then the same support gives the same prototypes and prediction, a different one does not
    assert torch.equal(again.foreground, first.foreground)
    assert torch.equal(again.background, first.background)
    np.testing.assert_array_equal(segmenter.predict(again, query)[0], first_prediction)
    assert not torch.allclose(second.foreground, first.foreground)
    assert torch.equal(support.maps, support_before)


def test_a_support_with_a_few_foreground_pixels_gives_finite_probabilities(
    tiny_backbone: BackboneBundle,
) -> None:
    # Given a support whose object is 3 pixels, far smaller than one feature cell
    segmenter = PrototypeSegmenter(tiny_backbone)
    image = noise_image(200, 200, seed=0)
    mask = np.zeros((200, 200), dtype=bool)
    mask[100, 100:103] = True

    # When it calibrates and predicts
    prototypes = segmenter.calibrate(segmenter.embed([image]), [mask])
    prediction = segmenter.predict(prototypes, segmenter.embed([noise_image(64, 80, seed=1)]))[0]

    # Then the foreground still counts, by its area, and the probabilities are numbers
    assert 0.0 < prototypes.foreground_weight < 0.05
    assert torch.isfinite(prototypes.foreground).all()
    assert np.isfinite(prediction).all()
    assert prediction.min() >= 0.0 and prediction.max() <= 1.0


def test_a_class_absent_from_every_support_is_never_predicted(
    tiny_backbone: BackboneBundle,
) -> None:
    # Given supports whose masks are all empty, or all full
    segmenter = PrototypeSegmenter(tiny_backbone)
    image = noise_image(64, 64, seed=0)
    support = segmenter.embed([image])
    query = segmenter.embed([noise_image(48, 40, seed=1)])

    # When it calibrates on each and predicts
    empty = segmenter.calibrate(support, [np.zeros((64, 64), dtype=bool)])
    full = segmenter.calibrate(support, [np.ones((64, 64), dtype=bool)])

    # Then no foreground is predicted without one, and nothing else without a background
    np.testing.assert_allclose(segmenter.predict(empty, query)[0], 0.0, atol=1e-6)
    np.testing.assert_allclose(segmenter.predict(full, query)[0], 1.0, atol=1e-6)


def test_a_mask_of_the_wrong_size_is_refused(tiny_backbone: BackboneBundle) -> None:
    segmenter = PrototypeSegmenter(tiny_backbone)
    support = segmenter.embed([noise_image(64, 64, seed=0)])

    with pytest.raises(ValueError, match="mask 0"):
        segmenter.calibrate(support, [np.ones((64, 65), dtype=bool)])


def test_a_saved_tiny_backbone_loads_back_with_identical_features(tmp_path: Path) -> None:
    # Given the tiny backbone written to a folder, and the one built into a model cache
    saved = tmp_path / "saved"
    save_tiny_backbone(saved)
    from_path = load_backbone(str(saved), device="cpu", dtype=torch.float32, cache_dir=tmp_path)
    from_cache = load_backbone(
        "tiny", device="cpu", dtype=torch.float32, cache_dir=tmp_path / "cache"
    )
    images = [noise_image(96, 160, seed=0), noise_image(128, 128, seed=1)]

    # When both embed the same images
    features_from_path = PrototypeSegmenter(from_path).embed(images).maps
    features_from_cache = PrototypeSegmenter(from_cache).embed(images).maps

    # Then the preprocessing config was read back and the features agree exactly
    assert (from_path.image_size, from_path.patch_size) == (128, 8)
    assert (from_path.mean, from_path.std) == (IMAGENET_MEAN, IMAGENET_STD)
    assert not from_path.model.training
    assert torch.equal(features_from_path, features_from_cache)
