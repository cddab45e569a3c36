"""Acceptance that knows the class: the semantic check against the shots, its per-class
calibration, and its place in annotation (a consensus must pass it) and in the verdict.

The decisive tests use real trained DINOv2-small features (tests/real_models.py): on images with
one salient object the prototype segmenter behaves like a saliency detector, so only the
semantic check can tell a dog from an albatross.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageEnhance

from aligndiff.acceptance import (
    AcceptanceConfig,
    AcceptanceThresholds,
    SemanticCheck,
    calibrate,
    calibration_copies,
    verdict,
)
from aligndiff.annotation import AnnotationConfig, consensus_pass
from aligndiff.fss import PrototypeSegmenter, RGBImage
from aligndiff.masks import BoolMask, iou
from aligndiff.models.backbone import load_backbone
from aligndiff.ood import OodConfig
from aligndiff.shots import load_shots
from aligndiff.synth import Models

Shot = tuple[RGBImage, BoolMask]
# The real features are judged on their own: the tiny random CLIP says nothing about a class,
# so its threshold is fixed open and the prototype threshold is calibrated.
PROTOTYPE_ONLY = AcceptanceConfig(min_shot_similarity=-1.0)


@pytest.fixture(scope="module")
def real_segmenter(real_dinov2: Path, model_cache: Path) -> PrototypeSegmenter:
    backbone = load_backbone(
        str(real_dinov2), device="cpu", dtype=torch.float32, cache_dir=model_cache
    )
    return PrototypeSegmenter(backbone)


def only_shot(folder: Path) -> Shot:
    (shot,) = load_shots(folder)
    return shot.image_array, shot.mask


def crop_around(shot: Shot, margin: float) -> Shot:
    image, mask = shot
    rows, cols = np.nonzero(mask)
    pad_y, pad_x = int((np.ptp(rows)) * margin), int((np.ptp(cols)) * margin)
    box = (
        slice(max(0, rows.min() - pad_y), rows.max() + pad_y),
        slice(max(0, cols.min() - pad_x), cols.max() + pad_x),
    )
    return np.ascontiguousarray(image[box]), np.ascontiguousarray(mask[box])


def flipped(shot: Shot) -> Shot:
    image, mask = shot
    return np.ascontiguousarray(image[:, ::-1]), np.ascontiguousarray(mask[:, ::-1])


def jittered(shot: Shot, brightness: float, saturation: float) -> Shot:
    image, mask = shot
    picture = ImageEnhance.Brightness(Image.fromarray(image)).enhance(brightness)
    return np.asarray(ImageEnhance.Color(picture).enhance(saturation)), mask


def judge(
    segmenter: PrototypeSegmenter,
    models: Models,
    thresholds: AcceptanceThresholds,
    shot: Shot,
    sample: Shot,
) -> tuple[bool, str | None]:
    """The verdict on `sample` offered as an inversion sample of `shot`'s class (the OOD
    filter passes inversion samples), with the sample's own mask as its final mask."""
    check = SemanticCheck.for_shots(segmenter, segmenter.embed([shot[0]]), [shot[1]], thresholds)
    (similarity,) = check.prototype_similarities(
        segmenter, segmenter.embed([sample[0]]), [sample[1]]
    )
    (shot_similarity,) = (
        models.scorer.embed_images([sample[0]]) @ models.scorer.shot_centroid([shot[0]])
    ).tolist()
    return verdict(
        prompt_kind="inversion",
        ood_iou=0.0,
        prototype_similarity=similarity,
        shot_similarity=shot_similarity,
        ood=OodConfig(),
        thresholds=thresholds,
    )


def test_with_real_features_copies_of_the_dog_are_accepted_and_an_albatross_is_rejected(
    real_segmenter: PrototypeSegmenter,
    tiny_models: Models,
    dog_shots_dir: Path,
    albatross_shots_dir: Path,
    quokka_shot: Shot,
) -> None:
    # given the dog as the class's only shot, and thresholds calibrated on it
    dog = only_shot(dog_shots_dir)
    thresholds = calibrate(
        real_segmenter, tiny_models.scorer.embed_images, [dog[0]], [dog[1]], PROTOTYPE_ONLY
    )
    assert thresholds.source["prototype_similarity"] == "calibrated"

    # when copies of the dog unlike the calibration's own are offered as dog samples
    copies = [
        flipped(dog),
        crop_around(dog, 0.2),
        flipped(crop_around(dog, 0.3)),
        jittered(dog, brightness=0.6, saturation=1.4),
        jittered(dog, brightness=1.3, saturation=0.7),
    ]
    # then each is accepted
    for copy in copies:
        assert judge(real_segmenter, tiny_models, thresholds, dog, copy) == (True, None)

    # and other animals offered as dog samples are rejected by the semantic check
    for other in (only_shot(albatross_shots_dir), quokka_shot):
        assert judge(real_segmenter, tiny_models, thresholds, dog, other) == (False, "similarity")


def test_with_real_features_an_albatross_reaches_consensus_only_without_the_semantic_check(
    real_segmenter: PrototypeSegmenter,
    tiny_models: Models,
    dog_shots_dir: Path,
    albatross_shots_dir: Path,
) -> None:
    # given the segmenter calibrated on the dog, and an albatross sample whose coarse mask is
    # its true outline
    dog, albatross = only_shot(dog_shots_dir), only_shot(albatross_shots_dir)
    shots = real_segmenter.embed([dog[0]])
    prototypes = real_segmenter.calibrate(shots, [dog[1]])
    query = real_segmenter.embed([albatross[0]])
    coarse = [albatross[1].astype(np.float32)]
    config = AnnotationConfig(consensus_iou=0.6)

    # when pass 1 runs without and with the class's semantic check
    (plain,) = consensus_pass(real_segmenter, prototypes, query, coarse, config)
    thresholds = calibrate(
        real_segmenter, tiny_models.scorer.embed_images, [dog[0]], [dog[1]], PROTOTYPE_ONLY
    )
    check = SemanticCheck.for_shots(real_segmenter, shots, [dog[1]], thresholds)
    (checked,) = consensus_pass(
        real_segmenter,
        prototypes,
        query,
        coarse,
        config,
        semantic=check,
        shot_similarities=[1.0],
    )

    # then the dog's segmenter finds the albatross (a saliency detector), which would join
    # the dog's support set, and the semantic check keeps it out
    assert plain.is_consensus
    assert iou(plain.consensus_mask, albatross[1]) > 0.6  # type: ignore[arg-type]
    assert not checked.is_consensus
    assert checked.consensus_iou == plain.consensus_iou
    assert checked.prototype_similarity is not None
    assert checked.prototype_similarity < thresholds.prototype_similarity


def test_calibration_allows_distance_factor_times_the_farthest_copy(
    tiny_models: Models, dog_shots_dir: Path, albatross_shots_dir: Path
) -> None:
    # given two shots of a class
    shots = [only_shot(dog_shots_dir), only_shot(albatross_shots_dir)]
    images, masks = [s[0] for s in shots], [s[1] for s in shots]

    # when thresholds are calibrated with two distance factors
    narrow = calibrate(
        tiny_models.segmenter, tiny_models.scorer.embed_images, images, masks,
        AcceptanceConfig(distance_factor=1.0),
    )  # fmt: skip
    wide = calibrate(
        tiny_models.segmenter, tiny_models.scorer.embed_images, images, masks,
        AcceptanceConfig(distance_factor=2.0),
    )  # fmt: skip

    # then each copy of each shot was compared with the other shot, and the threshold lets a
    # sample be factor x the farthest copy's distance away
    for name in ("prototype_similarity", "shot_similarity"):
        observed = narrow.calibration[name]
        assert len(observed) == 2 * len(calibration_copies(*shots[0]))
        farthest = max(1.0 - value for value in observed)
        assert getattr(narrow, name) == pytest.approx(max(-1.0, 1.0 - farthest), abs=1e-5)
        assert getattr(wide, name) == pytest.approx(max(-1.0, 1.0 - 2.0 * farthest), abs=1e-5)


def test_settings_fix_a_threshold_and_a_disabled_check_passes_everything(
    tiny_models: Models, dog_shots_dir: Path
) -> None:
    image, mask = only_shot(dog_shots_dir)
    embed = tiny_models.scorer.embed_images

    fixed = calibrate(
        tiny_models.segmenter, embed, [image], [mask],
        AcceptanceConfig(min_prototype_similarity=0.25),
    )  # fmt: skip
    disabled = calibrate(
        tiny_models.segmenter, embed, [image], [mask], AcceptanceConfig(enabled=False)
    )

    assert fixed.prototype_similarity == 0.25
    assert fixed.source == {"prototype_similarity": "settings", "shot_similarity": "calibrated"}
    assert AcceptanceThresholds.from_dict(fixed.to_dict()) == fixed
    assert disabled.passes(prototype_similarity=-1.0, shot_similarity=-1.0)
    assert set(disabled.source.values()) == {"disabled"}


@pytest.mark.parametrize(
    ("prompt_kind", "ood_iou", "similarity", "expected"),
    [
        ("text", 0.2, 0.9, (False, "ood")),
        ("text", 0.2, 0.1, (False, "ood")),
        ("text", 0.7, 0.1, (False, "similarity")),
        ("inversion", 0.0, 0.1, (False, "similarity")),
        ("inversion", 0.0, 0.9, (True, None)),
        ("text", 0.7, 0.9, (True, None)),
    ],
)
def test_the_verdict_names_the_first_check_a_sample_fails(
    prompt_kind: str, ood_iou: float, similarity: float, expected: tuple[bool, str | None]
) -> None:
    thresholds = AcceptanceThresholds(
        prototype_similarity=0.5, shot_similarity=0.5, source={}, calibration={}
    )
    assert (
        verdict(
            prompt_kind=prompt_kind,  # type: ignore[arg-type]
            ood_iou=ood_iou,
            prototype_similarity=similarity,
            shot_similarity=similarity,
            ood=OodConfig(),
            thresholds=thresholds,
        )
        == expected
    )
