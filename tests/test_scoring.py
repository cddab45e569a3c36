"""CLIP scoring: torchmetrics-exact CLIP scores, shot similarity, batching, tiny CLIP loading."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image
from torchmetrics.functional.multimodal import clip_score as torchmetrics_clip_score
from transformers import CLIPModel, CLIPProcessor

from aligndiff.models.clip import (
    TINY_CACHE_NAME,
    ClipBundle,
    build_tiny_clip,
    load_clip,
    save_tiny_clip,
)
from aligndiff.prompts import text_prompt
from aligndiff.scoring import ClipScorer, SampleScore, mean_clip_score


@pytest.fixture(scope="session")
def model_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("model-cache")


@pytest.fixture(scope="session")
def bundle(model_cache: Path) -> ClipBundle:
    return load_clip("tiny", device="cpu", dtype=torch.float32, cache_dir=model_cache)


@pytest.fixture(scope="session")
def tiny_clip_dir(model_cache: Path, bundle: ClipBundle) -> Path:
    return model_cache / TINY_CACHE_NAME


def random_images(count: int, *, seed: int) -> list[np.ndarray]:
    """Random uint8 RGB images of varied, non-square sizes (so resize and crop both matter)."""
    rng = np.random.default_rng(seed)
    return [
        rng.integers(0, 256, size=(48 + 16 * i, 96 - 8 * i, 3), dtype=np.uint8)
        for i in range(count)
    ]


class FeaturesAsTensors:
    """A CLIPModel whose `get_*_features` return tensors, as torchmetrics 1.9 expects.

    transformers 5 returns model outputs with the projected embedding as `pooler_output`;
    torchmetrics' own fix does the same unwrapping (Lightning-AI/torchmetrics#3408).
    """

    def __init__(self, model: CLIPModel) -> None:
        self.model = model
        self.config = model.config

    def to(self, device: torch.device) -> FeaturesAsTensors:
        self.model.to(device)
        return self

    def get_image_features(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        return self.model.get_image_features(*args, **kwargs).pooler_output

    def get_text_features(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        return self.model.get_text_features(*args, **kwargs).pooler_output


def counting(monkeypatch: pytest.MonkeyPatch, model: CLIPModel, method: str) -> list[int]:
    """Spy on `model.<method>`: the returned list gets the batch size of every call."""
    calls: list[int] = []
    original: Callable[..., Any] = getattr(model, method)

    def spy(*args: Any, **kwargs: Any) -> Any:
        first = next(iter(kwargs.values())) if kwargs else args[0]
        calls.append(first.shape[0])
        return original(*args, **kwargs)

    monkeypatch.setattr(model, method, spy)
    return calls


def test_clip_score_matches_torchmetrics_per_sample(tiny_clip_dir: Path, bundle: ClipBundle):
    images = random_images(4, seed=0)
    shots = random_images(2, seed=1)
    scorer = ClipScorer(bundle, batch_size=3)

    # torchmetrics loads the checkpoint its own way: from_pretrained on the saved folder.
    reference_model = (
        FeaturesAsTensors(CLIPModel.from_pretrained(str(tiny_clip_dir)).eval()),
        CLIPProcessor.from_pretrained(str(tiny_clip_dir)),
    )

    ours: list[float] = []
    theirs: list[float] = []
    for class_name in ("dog", "mosque"):
        reference = scorer.reference(class_name=class_name, shot_images=shots)
        ours += [s.clip_score for s in scorer.score(images, reference)]
        with torch.inference_mode():
            theirs += [
                float(
                    torchmetrics_clip_score(
                        torch.from_numpy(image).permute(2, 0, 1),
                        text_prompt(class_name),
                        lambda: reference_model,
                    )
                )
                for image in images
            ]

    np.testing.assert_allclose(ours, theirs, atol=1e-4, rtol=0)
    # The tiny model gives both clamped (negative cosine) and positive scores: both are checked.
    assert any(s == 0.0 for s in ours) and any(s > 1.0 for s in ours)


def test_shot_similarity_is_one_for_the_shot_itself_and_lower_for_another_image(
    bundle: ClipBundle,
):
    shot, other = random_images(2, seed=2)
    scorer = ClipScorer(bundle)
    reference = scorer.reference(class_name="phonograph", shot_images=[shot])

    own, different = scorer.score([shot, other], reference)

    assert own.shot_similarity == pytest.approx(1.0, abs=1e-5)
    assert different.shot_similarity < own.shot_similarity - 1e-4


def test_text_is_embedded_once_per_class_and_images_in_batches(
    bundle: ClipBundle, monkeypatch: pytest.MonkeyPatch
):
    images = random_images(5, seed=3)
    shots = random_images(2, seed=4)
    text_calls = counting(monkeypatch, bundle.model, "get_text_features")
    image_calls = counting(monkeypatch, bundle.model, "get_image_features")
    scorer = ClipScorer(bundle, batch_size=2)

    reference = scorer.reference(class_name="dog", shot_images=shots)
    first_chunk = scorer.score(images, reference)
    scorer.score(images[:1], reference)

    assert text_calls == [1]
    assert image_calls == [2, 2, 2, 1, 1]  # the shots, then 5 images in 3 passes, then 1
    unbatched = ClipScorer(bundle, batch_size=32).score(images, reference)
    for batched, single in zip(first_chunk, unbatched, strict=True):
        assert batched.clip_score == pytest.approx(single.clip_score, abs=1e-4)
        assert batched.shot_similarity == pytest.approx(single.shot_similarity, abs=1e-6)


def test_pil_images_score_like_arrays(bundle: ClipBundle):
    images = random_images(2, seed=5)
    scorer = ClipScorer(bundle)
    reference = scorer.reference(class_name="cat", shot_images=images[:1])

    from_arrays = scorer.score(images, reference)
    from_pil = scorer.score([Image.fromarray(image) for image in images], reference)

    assert from_pil == from_arrays


def test_bad_images_are_rejected(bundle: ClipBundle):
    scorer = ClipScorer(bundle)

    with pytest.raises(ValueError, match="uint8"):
        scorer.embed_images([np.zeros((8, 8, 3), dtype=np.float32)])
    with pytest.raises(ValueError, match="shot"):
        scorer.shot_centroid([])


def test_tiny_clip_loads_back_identical_through_the_real_loading_path(tmp_path: Path):
    in_memory = build_tiny_clip().eval()
    save_tiny_clip(tmp_path / "tiny-clip")

    loaded = load_clip(
        str(tmp_path / "tiny-clip"), device="cpu", dtype=torch.float32, cache_dir=tmp_path
    )
    processor = CLIPProcessor.from_pretrained(str(tmp_path / "tiny-clip"))
    inputs = processor(
        text=[text_prompt("albatross")], images=random_images(2, seed=6), return_tensors="pt"
    )

    with torch.inference_mode():
        expected_image = in_memory.get_image_features(inputs["pixel_values"]).pooler_output
        expected_text = in_memory.get_text_features(inputs["input_ids"]).pooler_output
        image = loaded.model.get_image_features(inputs["pixel_values"]).pooler_output
        text = loaded.model.get_text_features(inputs["input_ids"]).pooler_output
    for name, weight in in_memory.state_dict().items():
        assert torch.equal(loaded.model.state_dict()[name], weight), name
    # NOTE: not bit-equal outputs: weights memory-mapped from safetensors are not 64-byte
    # aligned, so CPU kernels may sum in another order (differences ~1e-7).
    torch.testing.assert_close(image, expected_image, atol=1e-6, rtol=0)
    torch.testing.assert_close(text, expected_text, atol=1e-6, rtol=0)
    assert not loaded.model.training
    assert not any(p.requires_grad for p in loaded.model.parameters())


def test_tiny_spec_is_built_deterministically_into_the_cache(tmp_path: Path, bundle: ClipBundle):
    tiny = load_clip("tiny", device="cpu", dtype=torch.float32, cache_dir=tmp_path)

    assert (tmp_path / TINY_CACHE_NAME / "model.safetensors").is_file()
    assert tiny.model_id == "tiny"
    for ours, cached in zip(
        tiny.model.state_dict().values(), bundle.model.state_dict().values(), strict=True
    ):
        assert torch.equal(ours, cached)


def test_mean_clip_score_is_none_without_samples():
    scores = [SampleScore(clip_score=s, shot_similarity=0.5) for s in (10.0, 20.0, 33.0)]

    assert mean_clip_score(s.clip_score for s in scores) == pytest.approx(21.0)
    assert mean_clip_score([]) is None
