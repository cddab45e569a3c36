"""Algorithm 1 (semi-supervised mask generation): which samples reach consensus, what the
re-calibration sees, and where each final mask comes from.

The segmenter is a stub with programmed answers: every image carries an id in its pixels, and
`predict` returns the probability map programmed for (calibration round, image id), so a test
decides which samples agree with their coarse masks and what the re-calibrated segmenter says.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import pytest
import torch

from aligndiff.annotation import (
    Annotation,
    AnnotationConfig,
    CoarseMask,
    FirstPass,
    Progress,
    annotate,
    consensus_pass,
    pseudo_label_pass,
    recalibrate,
)
from aligndiff.fss import Features, ProbabilityMap, RGBImage
from aligndiff.masks import BoolMask

HEIGHT, WIDTH = 4, 5
SHOT_IDS = (100, 101)
PREDICTED_PIXELS = 10  # the first-round FSS foreground of a sample built by `sample`
BETWEEN_THRESHOLDS = 0.45  # above the 0.4 consensus cuts, below the 0.5 pseudo-label cut
CONFIDENT = 0.55


def image(image_id: int) -> RGBImage:
    """An image whose pixels all hold its id, so the stub segmenter can tell images apart."""
    return np.full((HEIGHT, WIDTH, 3), image_id, dtype=np.uint8)


def first_pixels(count: int) -> BoolMask:
    """A mask whose first `count` pixels, in row-major order, are foreground."""
    mask = np.zeros(HEIGHT * WIDTH, dtype=bool)
    mask[:count] = True
    return mask.reshape(HEIGHT, WIDTH)


def last_pixels(count: int) -> BoolMask:
    return first_pixels(HEIGHT * WIDTH - count) ^ True


def probabilities(*regions: tuple[BoolMask, float]) -> ProbabilityMap:
    """A probability map: 0 everywhere, then each (region, value) painted in order."""
    result = np.zeros((HEIGHT, WIDTH), dtype=np.float32)
    for region, value in regions:
        result[region] = value
    return result


def coarse_mask(region: BoolMask, value: float = BETWEEN_THRESHOLDS) -> CoarseMask:
    return probabilities((region, value)).astype(np.float64)


@dataclass(frozen=True, eq=False)
class Calibration:
    """What the stub was calibrated on; it doubles as the prototypes it hands back."""

    round: int
    support_ids: list[int]
    masks: list[BoolMask]


def ids_of(features: Features) -> list[int]:
    return [int(value) for value in features.maps[:, 0, 0, 0].tolist()]


class StubSegmenter:
    """A `FewShotSegmenter` whose predictions are `answers[round][image id]`, where round counts
    calibrations (0: the first one, 1: the re-calibration). Records what it was asked."""

    def __init__(self, answers: Sequence[Mapping[int, ProbabilityMap]]) -> None:
        self.answers = answers
        self.embedded: list[list[int]] = []
        self.calibrations: list[Calibration] = []

    def embed(self, images: Sequence[RGBImage]) -> Features:
        ids = [int(im[0, 0, 0]) for im in images]
        self.embedded.append(ids)
        maps = torch.tensor(ids, dtype=torch.float32).reshape(-1, 1, 1, 1)
        return Features(maps, [(im.shape[0], im.shape[1]) for im in images])

    def calibrate(self, support: Features, masks: Sequence[BoolMask]) -> Calibration:
        calibration = Calibration(len(self.calibrations), ids_of(support), list(masks))
        self.calibrations.append(calibration)
        return calibration

    def predict(self, prototypes: Calibration, query: Features) -> list[ProbabilityMap]:
        return [self.answers[prototypes.round][i] for i in ids_of(query)]


@dataclass(frozen=True, eq=False)
class Sample:
    """A synthetic sample as the stub sees it: its first-round prediction, its coarse mask and
    what the re-calibrated segmenter predicts for it."""

    first_round: ProbabilityMap
    coarse: CoarseMask
    second_round: ProbabilityMap = field(
        default_factory=lambda: probabilities((last_pixels(3), CONFIDENT))
    )


def sample(
    coarse_pixels: int,
    second_round: ProbabilityMap | None = None,
    predicted_pixels: int = PREDICTED_PIXELS,
) -> Sample:
    """A sample whose FSS prediction (the first `predicted_pixels` pixels, at 0.45) overlaps its
    coarse mask (the first `coarse_pixels` pixels, at 0.45) with IoU coarse / predicted pixels
    (when the coarse mask is the smaller one)."""
    first_round = probabilities((first_pixels(predicted_pixels), BETWEEN_THRESHOLDS))
    coarse = coarse_mask(first_pixels(coarse_pixels))
    if second_round is None:
        return Sample(first_round, coarse)
    return Sample(first_round, coarse, second_round)


def shot_masks() -> list[BoolMask]:
    return [first_pixels(12), last_pixels(6)]


def segmenter_for(samples: Sequence[Sample]) -> StubSegmenter:
    return StubSegmenter(
        [
            {i: s.first_round for i, s in enumerate(samples)},
            {i: s.second_round for i, s in enumerate(samples)},
        ]
    )


def annotate_samples(
    samples: Sequence[Sample],
    config: AnnotationConfig | None = None,
    *,
    batch_size: int = 32,
    progress: Progress | None = None,
) -> tuple[StubSegmenter, list[Annotation]]:
    segmenter = segmenter_for(samples)
    annotations = annotate(
        segmenter,
        shots=segmenter.embed([image(i) for i in SHOT_IDS]),
        shot_masks=shot_masks(),
        samples=segmenter.embed([image(i) for i in range(len(samples))]),
        coarse_masks=[s.coarse for s in samples],
        config=config or AnnotationConfig(),
        batch_size=batch_size,
        progress=progress,
    )
    return segmenter, annotations


def test_a_sample_whose_prediction_agrees_with_its_coarse_mask_gets_the_prediction():
    # given: FSS and coarse mask both at 0.45 (above the 0.4 cuts), overlapping with IoU 0.9
    agreeing = sample(coarse_pixels=9)

    # when
    _, [annotation] = annotate_samples([agreeing])

    # then: the FSS prediction, cut at 0.4, is the mask
    assert annotation.mask_source == "consensus"
    np.testing.assert_array_equal(annotation.mask, first_pixels(PREDICTED_PIXELS))


def test_a_sample_below_or_exactly_at_the_consensus_iou_is_pseudo_labelled():
    # given: IoU 0.7 (below 0.8) and IoU 0.8 (exactly at it: the cut is strict)
    below, at_threshold = sample(coarse_pixels=7), sample(coarse_pixels=8)

    # when
    _, annotations = annotate_samples([below, at_threshold])

    # then
    assert [a.mask_source for a in annotations] == ["pseudo_label", "pseudo_label"]


def test_an_empty_prediction_agreeing_with_an_empty_coarse_mask_is_not_consensus():
    # given: the FSS finds nothing and the coarse mask is empty too (IoU of two empties is 1)
    nothing = sample(coarse_pixels=0, predicted_pixels=0)

    # when
    segmenter, [annotation] = annotate_samples([nothing])

    # then: it is pseudo-labelled and never joins the support set as an object's example
    assert annotation.consensus_iou == 1.0
    assert annotation.mask_source == "pseudo_label"
    assert segmenter.calibrations[1].support_ids == list(SHOT_IDS)


def test_every_sample_records_its_consensus_iou_whatever_its_mask_source():
    # given
    samples = [sample(coarse_pixels=9), sample(coarse_pixels=7), sample(coarse_pixels=8)]

    # when
    _, annotations = annotate_samples(samples)

    # then
    assert [a.consensus_iou for a in annotations] == pytest.approx([0.9, 0.7, 0.8])


def test_recalibration_happens_once_on_the_shots_plus_exactly_the_consensus_samples():
    # given: samples 0 and 2 reach consensus (with different masks), 1 and 3 do not
    samples = [sample(9), sample(7), sample(5, predicted_pixels=5), sample(5)]

    # when
    segmenter, _ = annotate_samples(samples)

    # then: one calibration on the shots, then one on shots + consensus samples and their masks
    first, second = segmenter.calibrations
    assert first.support_ids == list(SHOT_IDS)
    assert second.support_ids == [*SHOT_IDS, 0, 2]
    expected_masks = [*shot_masks(), first_pixels(PREDICTED_PIXELS), first_pixels(5)]
    assert len(second.masks) == len(expected_masks)
    for mask, expected in zip(second.masks, expected_masks, strict=True):
        np.testing.assert_array_equal(mask, expected)


def test_pseudo_labels_come_from_the_recalibrated_segmenter_cut_at_0_5():
    # given: after re-calibration the FSS is unsure (0.45) of the top rows, sure (0.55) of the
    # last 4 pixels; before it, it predicted the first 10 pixels
    unsure_and_sure = probabilities(
        (first_pixels(8), BETWEEN_THRESHOLDS), (last_pixels(4), CONFIDENT)
    )
    disagreeing = sample(coarse_pixels=2, second_round=unsure_and_sure)

    # when
    _, [annotation] = annotate_samples([disagreeing])

    # then: only the pixels above 0.5 of the second prediction are foreground
    assert annotation.mask_source == "pseudo_label"
    np.testing.assert_array_equal(annotation.mask, last_pixels(4))


def test_annotations_come_back_in_input_order_across_batches():
    # given: consensus and pseudo-labelled samples interleaved, more samples than a batch
    samples = [sample(9), sample(3), sample(10), sample(6), sample(9)]

    # when
    segmenter, annotations = annotate_samples(samples, batch_size=2)

    # then
    assert [a.mask_source for a in annotations] == [
        "consensus",
        "pseudo_label",
        "consensus",
        "pseudo_label",
        "consensus",
    ]
    np.testing.assert_array_equal(annotations[3].mask, last_pixels(3))
    assert segmenter.embedded == [list(SHOT_IDS), [0, 1, 2, 3, 4]]


def test_custom_thresholds_are_respected():
    # given: stricter FSS cut (0.6), looser coarse cut (0.2), consensus IoU 0.6, pseudo cut 0.3
    config = AnnotationConfig(
        fss_threshold=0.6, coarse_threshold=0.2, consensus_iou=0.6, pseudo_label_threshold=0.3
    )
    prediction = probabilities((first_pixels(15), 0.55), (first_pixels(10), 0.65))
    agreeing = Sample(prediction, coarse_mask(first_pixels(7), value=0.25))  # IoU 0.7
    disagreeing = Sample(
        prediction,
        coarse_mask(first_pixels(5), value=0.25),  # IoU 0.5
        second_round=probabilities((last_pixels(6), 0.35)),
    )

    # when
    _, [consensus, pseudo_labelled] = annotate_samples([agreeing, disagreeing], config)

    # then
    assert consensus.mask_source == "consensus"
    np.testing.assert_array_equal(consensus.mask, first_pixels(10))
    assert pseudo_labelled.mask_source == "pseudo_label"
    np.testing.assert_array_equal(pseudo_labelled.mask, last_pixels(6))


def test_when_every_sample_reaches_consensus_the_segmenter_is_not_recalibrated():
    # given
    samples = [sample(9), sample(10)]

    # when
    segmenter, annotations = annotate_samples(samples)

    # then
    assert {a.mask_source for a in annotations} == {"consensus"}
    assert len(segmenter.calibrations) == 1


def test_progress_counts_both_passes_up_to_twice_the_sample_count():
    # given
    samples = [sample(9), sample(3), sample(6)]
    reports: list[tuple[int, int]] = []

    # when
    annotate_samples(
        samples, batch_size=2, progress=lambda done, total: reports.append((done, total))
    )

    # then: monotonic, fixed total, finished
    done = [d for d, _ in reports]
    assert done == sorted(done)
    assert {total for _, total in reports} == {6}
    assert reports[-1] == (6, 6)


def test_passes_run_chunk_by_chunk_give_the_same_annotations_as_annotate():
    # given: a worker-style run, pass 1 and pass 2 each over two chunks, one barrier between
    samples = [sample(9), sample(3), sample(10), sample(6)]
    config = AnnotationConfig()
    segmenter = segmenter_for(samples)
    shots = segmenter.embed([image(i) for i in SHOT_IDS])
    features = segmenter.embed([image(i) for i in range(len(samples))])
    prototypes = segmenter.calibrate(shots, shot_masks())

    # when
    first: list[FirstPass] = []
    for chunk in ([0, 1], [2, 3]):
        coarse = [samples[i].coarse for i in chunk]
        first += consensus_pass(segmenter, prototypes, features.select(chunk), coarse, config)
    consensus = {
        i: result.consensus_mask
        for i, result in enumerate(first)
        if result.consensus_mask is not None
    }
    enlarged = recalibrate(
        segmenter, shots, shot_masks(), features.select(list(consensus)), list(consensus.values())
    )
    pseudo_labels = pseudo_label_pass(segmenter, enlarged, features.select([1, 3]), config)

    # then
    _, expected = annotate_samples(samples)
    assert [r.consensus_iou for r in first] == [a.consensus_iou for a in expected]
    assert list(consensus) == [i for i, a in enumerate(expected) if a.mask_source == "consensus"]
    for mask, index in zip(pseudo_labels, [1, 3], strict=True):
        np.testing.assert_array_equal(mask, expected[index].mask)


@pytest.mark.parametrize(
    "setting", ["fss_threshold", "coarse_threshold", "consensus_iou", "pseudo_label_threshold"]
)
@pytest.mark.parametrize("value", [-0.1, 1.1, float("nan")])
def test_thresholds_outside_0_to_1_are_rejected(setting: str, value: float):
    with pytest.raises(ValueError, match=setting):
        AnnotationConfig(**{setting: value})


def test_a_coarse_mask_missing_for_a_sample_is_rejected():
    samples = [sample(9), sample(7)]
    segmenter = segmenter_for(samples)

    with pytest.raises(ValueError, match="coarse masks"):
        annotate(
            segmenter,
            shots=segmenter.embed([image(i) for i in SHOT_IDS]),
            shot_masks=shot_masks(),
            samples=segmenter.embed([image(i) for i in range(len(samples))]),
            coarse_masks=[samples[0].coarse],
            config=AnnotationConfig(),
        )


def test_a_coarse_mask_outside_0_to_1_is_rejected():
    segmenter = segmenter_for([sample(9)])
    features = segmenter.embed([image(0)])

    with pytest.raises(ValueError, match="coarse mask 0"):
        consensus_pass(
            segmenter, None, features, [coarse_mask(first_pixels(3), 255.0)], AnnotationConfig()
        )
