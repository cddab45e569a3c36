"""Downstream segmenters: shapes, the cosine classifier, and the offline save/load round trip."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from aligndiff.models.segmenters import (
    ARCHITECTURES,
    COSINE_SCALE,
    build_segmenter,
    load_segmenter,
    save_segmenter,
)


@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_logits_come_at_input_size_for_every_class(architecture: str, model_cache: Path) -> None:
    # Given a tiny segmenter for background + 2 classes
    model = build_segmenter(architecture, num_classes=3, cache_dir=model_cache)

    # When it sees a batch of non-square images
    logits = model(torch.randn(2, 3, 64, 48))

    # Then there is one logit map per class at the input size
    assert logits.shape == (2, 3, 64, 48)
    assert model.architecture == architecture
    assert model.num_classes == 3
    assert model.backbone_id == "tiny"
    assert len(model.mean) == len(model.std) == 3


def test_deeplab_classifier_is_cosine_and_bounded_by_its_scale(model_cache: Path) -> None:
    # Given a DeepLabV3 segmenter
    torch.manual_seed(0)
    model = build_segmenter("deeplabv3", num_classes=2, cache_dir=model_cache).eval()
    pixels = torch.randn(1, 3, 64, 64) * 50
    before = model(pixels)

    # When the class weights are scaled up
    with torch.no_grad():
        model.network.classifier.weight.mul_(1000.0)
    after = model(pixels)

    # Then the logits are unchanged and never exceed the cosine scale, whatever the input size
    torch.testing.assert_close(after, before)
    assert before.abs().max() <= COSINE_SCALE + 1e-5


@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_saved_segmenter_loads_back_identically_without_hub(
    architecture: str, model_cache: Path
) -> None:
    # Given a segmenter whose head is not at its initial values
    torch.manual_seed(1)
    model = build_segmenter(architecture, num_classes=3, cache_dir=model_cache)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(0.01 * torch.randn_like(parameter))
    model.eval()

    # When it is saved and loaded back (from bytes alone)
    data = save_segmenter(model, class_names=["cat", "dog"], resolution=64)
    loaded, config = load_segmenter(data)

    # Then it predicts exactly as before and remembers its classes and resolution
    pixels = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(loaded(pixels), model(pixels), rtol=0, atol=0)
    assert config["class_names"] == ["cat", "dog"]
    assert config["resolution"] == 64
    assert config["architecture"] == architecture
    assert loaded.num_classes == 3
    assert loaded.backbone_id == "tiny"


def test_save_refuses_class_names_that_do_not_match_the_outputs(model_cache: Path) -> None:
    model = build_segmenter("deeplabv3", num_classes=3, cache_dir=model_cache)

    with pytest.raises(ValueError, match="class names"):
        save_segmenter(model, class_names=["only-one"], resolution=64)


def test_unknown_architecture_is_refused(model_cache: Path) -> None:
    with pytest.raises(ValueError, match="unknown architecture"):
        build_segmenter("unet", num_classes=2, cache_dir=model_cache)
