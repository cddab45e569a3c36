"""Annotation: Algorithm 1 of AlignDiff, semi-supervised mask generation for synthetic samples.

A few-shot segmenter (FSS) calibrated on the real shots predicts every sample; where its
prediction agrees with the sample's coarse cross-attention mask (IoU above `consensus_iou`) the
prediction becomes the sample's mask (`consensus`) and the sample joins the support set. The FSS
is then re-calibrated once on that enlarged set and pseudo-labels the remaining samples
(`pseudo_label`).

With a semantic check (`aligndiff.acceptance.SemanticCheck`), a sample joins the support set
only if its consensus mask also shows the class of the shots: a wrong-class object that the
FSS segments well (it behaves like a saliency detector) must not calibrate pass 2.

The algorithm is split into pure pieces so the service can fan each pass out in chunks across
workers, with re-calibration as the single barrier between them:
`consensus_pass` (any chunk) → `recalibrate` (once, on every chunk's consensus samples) →
`pseudo_label_pass` (any chunk). `annotate` composes them in one process.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import numpy.typing as npt

from aligndiff.acceptance import SemanticCheck
from aligndiff.fss import Features, FewShotSegmenter
from aligndiff.masks import BoolMask, iou

CoarseMask = npt.NDArray[np.floating[Any]]  # (H, W), values in [0, 1]
MaskSource = Literal["consensus", "pseudo_label"]
Progress = Callable[[int, int], None]


def _check_unit_interval(name: str, value: float) -> None:
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"{name} must be in [0, 1], got {value}")


def _check_coarse_masks(coarse_masks: Sequence[CoarseMask], expected: int) -> None:
    if len(coarse_masks) != expected:
        raise ValueError(f"{expected} samples but {len(coarse_masks)} coarse masks")
    for index, coarse in enumerate(coarse_masks):
        if coarse.ndim != 2 or (coarse.size and not 0.0 <= coarse.min() <= coarse.max() <= 1.0):
            raise ValueError(f"coarse mask {index} must be a 2-D array of values in [0, 1]")


@dataclass(frozen=True)
class AnnotationConfig:
    """Thresholds of Algorithm 1. Every cut is strict: a pixel is foreground when its value is
    greater than the threshold, and a sample reaches consensus when its IoU is greater than
    `consensus_iou`."""

    fss_threshold: float = 0.4
    coarse_threshold: float = 0.4
    consensus_iou: float = 0.8
    pseudo_label_threshold: float = 0.5

    def __post_init__(self) -> None:
        _check_unit_interval("fss_threshold", self.fss_threshold)
        _check_unit_interval("coarse_threshold", self.coarse_threshold)
        _check_unit_interval("consensus_iou", self.consensus_iou)
        _check_unit_interval("pseudo_label_threshold", self.pseudo_label_threshold)


# NOTE: eq=False on the records below: they hold numpy arrays, whose `==` is elementwise, so a
# generated __eq__ would raise instead of answering; compare their fields instead.
@dataclass(frozen=True, eq=False)
class Annotation:
    """A sample's final mask, where it came from, and its first-pass agreement score."""

    mask: BoolMask
    mask_source: MaskSource
    consensus_iou: float


@dataclass(frozen=True, eq=False)
class FirstPass:
    """One sample's pass-1 result: the IoU between the FSS prediction and the coarse mask, and
    the FSS prediction itself when that IoU reached consensus (else None). With a semantic
    check, `prototype_similarity` is the agreeing prediction's (None where they disagree), and
    a prediction that fails the check is no consensus."""

    consensus_iou: float
    consensus_mask: BoolMask | None
    prototype_similarity: float | None = None

    @property
    def is_consensus(self) -> bool:
        return self.consensus_mask is not None


def consensus_pass(
    segmenter: FewShotSegmenter,
    prototypes: Any,
    query: Features,
    coarse_masks: Sequence[CoarseMask],
    config: AnnotationConfig,
    *,
    semantic: SemanticCheck | None = None,
    shot_similarities: Sequence[float] | None = None,
) -> list[FirstPass]:
    """Pass 1 over a chunk of samples, with prototypes calibrated on the real shots.

    Every sample gets its consensus IoU (FSS prediction > `fss_threshold` vs coarse mask >
    `coarse_threshold`); samples whose IoU is greater than `consensus_iou` also get that FSS
    prediction as their consensus mask, unless `semantic` is given and the prediction fails it
    (`shot_similarities`: each sample's CLIP shot similarity, in query order).
    """
    _check_coarse_masks(coarse_masks, len(query))
    if (semantic is None) != (shot_similarities is None):
        raise ValueError("a semantic check needs the samples' shot similarities, and only it")
    if shot_similarities is not None and len(shot_similarities) != len(query):
        raise ValueError(f"{len(query)} samples but {len(shot_similarities)} shot similarities")
    predictions = [
        probability > config.fss_threshold for probability in segmenter.predict(prototypes, query)
    ]
    agreements = [
        iou(prediction, coarse > config.coarse_threshold)
        for prediction, coarse in zip(predictions, coarse_masks, strict=True)
    ]
    # NOTE: two empty masks agree perfectly (IoU 1) but show no object: such a sample must not
    # join the support set as a "consensus" on the class.
    agreeing = [
        i
        for i, (prediction, agreement) in enumerate(zip(predictions, agreements, strict=True))
        if agreement > config.consensus_iou and prediction.any()
    ]
    agrees = set(agreeing)
    similarity: dict[int, float] = {}
    if semantic is not None and agreeing:
        values = semantic.prototype_similarities(
            segmenter, query.select(agreeing), [predictions[i] for i in agreeing]
        )
        similarity = dict(zip(agreeing, values, strict=True))
    results = []
    for i, (prediction, agreement) in enumerate(zip(predictions, agreements, strict=True)):
        consensus = prediction if i in agrees else None
        if consensus is not None and semantic is not None and shot_similarities is not None:
            passes = semantic.passes(
                prototype_similarity=similarity[i], shot_similarity=shot_similarities[i]
            )
            consensus = consensus if passes else None
        results.append(
            FirstPass(
                consensus_iou=agreement,
                consensus_mask=consensus,
                prototype_similarity=similarity.get(i),
            )
        )
    return results


def recalibrate(
    segmenter: FewShotSegmenter,
    shots: Features,
    shot_masks: Sequence[BoolMask],
    consensus: Features,
    consensus_masks: Sequence[BoolMask],
) -> Any:
    """The barrier: prototypes calibrated on the enlarged support set, the real shots followed
    by the consensus samples with their consensus masks."""
    if len(shot_masks) != len(shots):
        raise ValueError(f"{len(shots)} shots but {len(shot_masks)} shot masks")
    if len(consensus_masks) != len(consensus):
        raise ValueError(
            f"{len(consensus)} consensus samples but {len(consensus_masks)} consensus masks"
        )
    support = Features.concat([shots, consensus])
    return segmenter.calibrate(support, [*shot_masks, *consensus_masks])


def pseudo_label_pass(
    segmenter: FewShotSegmenter,
    prototypes: Any,
    query: Features,
    config: AnnotationConfig,
) -> list[BoolMask]:
    """Pass 2 over a chunk of non-consensus samples, with the re-calibrated prototypes: each
    sample's mask is the FSS prediction > `pseudo_label_threshold`."""
    return [
        probability > config.pseudo_label_threshold
        for probability in segmenter.predict(prototypes, query)
    ]


def annotate(
    segmenter: FewShotSegmenter,
    *,
    shots: Features,
    shot_masks: Sequence[BoolMask],
    samples: Features,
    coarse_masks: Sequence[CoarseMask],
    config: AnnotationConfig,
    semantic: SemanticCheck | None = None,
    shot_similarities: Sequence[float] | None = None,
    progress: Progress | None = None,
    batch_size: int = 32,
) -> list[Annotation]:
    """Algorithm 1 in one process: one annotation per sample, in input order.

    Shots and samples come embedded (`segmenter.embed`): the caller embeds each image once and
    reuses the features (the OOD filter does). The FSS is calibrated on the shots, runs pass 1
    over every sample (with `semantic`, a consensus must pass it too; see `consensus_pass`),
    is re-calibrated once on the shots plus the consensus samples, and pseudo-labels only the
    samples that did not reach consensus. Predictions run `batch_size`
    samples at a time. `progress(done, total)` counts two units per sample, one per pass (a
    consensus sample's second unit is done at the barrier), so `total` is `2 * len(images)`.
    """
    if not len(shots):
        raise ValueError("at least one shot is needed")
    if len(shot_masks) != len(shots):
        raise ValueError(f"{len(shots)} shots but {len(shot_masks)} shot masks")
    # NOTE: checked here as well as in each pass-1 chunk, so bad input fails before any work.
    _check_coarse_masks(coarse_masks, len(samples))
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    count = len(samples)
    if not count:
        return []

    total, done = 2 * count, 0

    def advance(units: int) -> None:
        nonlocal done
        done += units
        if progress is not None:
            progress(done, total)

    prototypes = segmenter.calibrate(shots, shot_masks)

    first: list[FirstPass] = []
    for start in range(0, count, batch_size):
        chunk = range(start, min(start + batch_size, count))
        first += consensus_pass(
            segmenter,
            prototypes,
            samples.select(chunk),
            [coarse_masks[i] for i in chunk],
            config,
            semantic=semantic,
            shot_similarities=(
                None if shot_similarities is None else [shot_similarities[i] for i in chunk]
            ),
        )
        advance(len(chunk))

    consensus = {
        i: result.consensus_mask
        for i, result in enumerate(first)
        if result.consensus_mask is not None
    }
    rest = [i for i in range(count) if i not in consensus]
    advance(len(consensus))

    annotations = {
        i: Annotation(mask=mask, mask_source="consensus", consensus_iou=first[i].consensus_iou)
        for i, mask in consensus.items()
    }
    if rest:
        enlarged = recalibrate(
            segmenter, shots, shot_masks, samples.select(list(consensus)), list(consensus.values())
        )
        for start in range(0, len(rest), batch_size):
            chunk_ids = rest[start : start + batch_size]
            masks = pseudo_label_pass(segmenter, enlarged, samples.select(chunk_ids), config)
            for i, mask in zip(chunk_ids, masks, strict=True):
                annotations[i] = Annotation(
                    mask=mask, mask_source="pseudo_label", consensus_iou=first[i].consensus_iou
                )
            advance(len(chunk_ids))
    return [annotations[i] for i in range(count)]
