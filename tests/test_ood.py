"""OOD filter: each synthetic sample, alone as support, segments the real shots; text-conditioned
samples that do it badly are not accepted.

The segmenter is a stub: features carry image ids, and `predict` returns the probability map
programmed for (support sample id, query shot id), so a test decides how well each sample does.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pytest
import torch

from aligndiff.fss import Features, ProbabilityMap
from aligndiff.masks import BoolMask
from aligndiff.ood import OodConfig, is_accepted, ood_ious

HEIGHT, WIDTH = 4, 5
SHOT_IDS = (100, 101)


def features(ids: Sequence[int]) -> Features:
    """Features whose maps hold each image's id."""
    maps = torch.tensor(list(ids), dtype=torch.float32).reshape(-1, 1, 1, 1)
    return Features(maps, [(HEIGHT, WIDTH)] * len(ids))


def ids_of(features: Features) -> list[int]:
    return [int(value) for value in features.maps[:, 0, 0, 0].tolist()]


def first_pixels(count: int) -> BoolMask:
    """A mask whose first `count` pixels, in row-major order, are foreground."""
    mask = np.zeros(HEIGHT * WIDTH, dtype=bool)
    mask[:count] = True
    return mask.reshape(HEIGHT, WIDTH)


def probabilities(region: BoolMask, value: float) -> ProbabilityMap:
    return np.where(region, value, 0.0).astype(np.float32)


class StubSegmenter:
    """A `FewShotSegmenter` whose prediction for a shot is `answers[(support id, shot id)]`.
    Records each calibration's support ids and masks, and each predict call's query ids."""

    def __init__(self, answers: Mapping[tuple[int, int], ProbabilityMap]) -> None:
        self.answers = answers
        self.calibrations: list[tuple[list[int], list[BoolMask]]] = []
        self.queries: list[list[int]] = []

    def embed(self, images: Sequence[np.ndarray]) -> Features:
        raise AssertionError("the OOD filter works on features embedded beforehand")

    def calibrate(self, support: Features, masks: Sequence[BoolMask]) -> list[int]:
        self.calibrations.append((ids_of(support), list(masks)))
        return ids_of(support)

    def predict(self, prototypes: list[int], query: Features) -> list[ProbabilityMap]:
        [support_id] = prototypes
        self.queries.append(ids_of(query))
        return [self.answers[(support_id, shot_id)] for shot_id in ids_of(query)]


def shot_masks() -> list[BoolMask]:
    return [first_pixels(10), first_pixels(4)]


def scores_for(
    answers: Mapping[tuple[int, int], ProbabilityMap],
    sample_masks: Sequence[BoolMask],
    threshold: float = 0.5,
) -> tuple[StubSegmenter, list[float]]:
    segmenter = StubSegmenter(answers)
    scores = ood_ious(
        segmenter,
        samples=features(range(len(sample_masks))),
        sample_masks=sample_masks,
        shots=features(SHOT_IDS),
        shot_masks=shot_masks(),
        threshold=threshold,
    )
    return segmenter, scores


def test_ood_iou_is_the_mean_iou_over_the_real_shots():
    # given: sample 0 finds shot 100 exactly (IoU 1) and half of shot 101 (IoU 0.5);
    # sample 1 finds nothing in either shot
    answers = {
        (0, 100): probabilities(first_pixels(10), 0.9),
        (0, 101): probabilities(first_pixels(2), 0.9),
        (1, 100): probabilities(first_pixels(10), 0.0),
        (1, 101): probabilities(first_pixels(4), 0.0),
    }

    # when
    _, scores = scores_for(answers, [first_pixels(6), first_pixels(3)])

    # then
    assert scores == pytest.approx([0.75, 0.0])


def test_each_sample_alone_is_the_support_and_all_shots_are_predicted_in_one_call():
    # given
    sample_masks = [first_pixels(6), first_pixels(3), first_pixels(9)]
    answers = {
        (sample, shot): probabilities(first_pixels(4), 0.9)
        for sample in range(len(sample_masks))
        for shot in SHOT_IDS
    }

    # when
    segmenter, _ = scores_for(answers, sample_masks)

    # then: one 1-shot calibration per sample, with that sample's own mask
    assert [ids for ids, _ in segmenter.calibrations] == [[0], [1], [2]]
    for (_, [mask]), expected in zip(segmenter.calibrations, sample_masks, strict=True):
        np.testing.assert_array_equal(mask, expected)
    assert segmenter.queries == [list(SHOT_IDS)] * len(sample_masks)


def test_the_prediction_is_cut_strictly_above_the_threshold():
    # given: the prediction covers shot 100 at exactly 0.5 and shot 101 just above it
    answers = {
        (0, 100): probabilities(first_pixels(10), 0.5),
        (0, 101): probabilities(first_pixels(4), 0.51),
    }

    # when
    _, default_cut = scores_for(answers, [first_pixels(6)])
    _, lower_cut = scores_for(answers, [first_pixels(6)], threshold=0.4)

    # then: at 0.5 only shot 101 is found; at 0.4 both are
    assert default_cut == pytest.approx([0.5])
    assert lower_cut == pytest.approx([1.0])


def test_a_missing_sample_mask_is_rejected():
    with pytest.raises(ValueError, match="sample masks"):
        ood_ious(
            StubSegmenter({}),
            samples=features([0, 1]),
            sample_masks=[first_pixels(3)],
            shots=features(SHOT_IDS),
            shot_masks=shot_masks(),
            threshold=0.5,
        )


@pytest.mark.parametrize("ood_iou", [0.0, 0.49])
def test_a_text_sample_below_beta_is_not_accepted(ood_iou: float):
    assert not is_accepted(prompt_kind="text", ood_iou=ood_iou, config=OodConfig())


@pytest.mark.parametrize("ood_iou", [0.5, 0.9])
def test_a_text_sample_at_or_above_beta_is_accepted(ood_iou: float):
    assert is_accepted(prompt_kind="text", ood_iou=ood_iou, config=OodConfig())


def test_an_inversion_sample_is_accepted_whatever_its_ood_iou_by_default():
    assert is_accepted(prompt_kind="inversion", ood_iou=0.0, config=OodConfig())


def test_inversion_samples_are_filtered_too_when_the_setting_asks():
    # given
    config = OodConfig(filter_inversion_samples=True)

    # then
    assert not is_accepted(prompt_kind="inversion", ood_iou=0.49, config=config)
    assert is_accepted(prompt_kind="inversion", ood_iou=0.5, config=config)


def test_a_custom_beta_moves_the_cut():
    # given
    config = OodConfig(beta=0.3)

    # then
    assert is_accepted(prompt_kind="text", ood_iou=0.35, config=config)
    assert not is_accepted(prompt_kind="text", ood_iou=0.25, config=config)


@pytest.mark.parametrize("setting", ["beta", "prediction_threshold"])
@pytest.mark.parametrize("value", [-0.1, 1.1, float("nan")])
def test_settings_outside_0_to_1_are_rejected(setting: str, value: float):
    settings: dict[str, Any] = {setting: value}

    with pytest.raises(ValueError, match=setting):
        OodConfig(**settings)
