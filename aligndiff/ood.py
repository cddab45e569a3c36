"""OOD filter: how well each synthetic sample, used alone as support, segments the real shots.

A sample whose image and mask teach the few-shot segmenter (FSS) to find the object in the real
shots is in distribution; one that does not is out of distribution. Text-conditioned samples below
`beta` are not accepted (they are kept and marked, and exports leave them out by default).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

from aligndiff.fss import Features, FewShotSegmenter, calibrate_each
from aligndiff.masks import BoolMask, iou

PromptKind = Literal["inversion", "text"]


@dataclass(frozen=True)
class OodConfig:
    """`beta`: the lowest accepted ood_iou. `prediction_threshold`: the FSS prediction is
    foreground where its probability is greater than this. `filter_inversion_samples`: apply the
    `beta` rule to inversion-conditioned samples too (by default only text ones are filtered)."""

    beta: float = 0.5
    prediction_threshold: float = 0.5
    filter_inversion_samples: bool = False

    def __post_init__(self) -> None:
        for name in ("beta", "prediction_threshold"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {value}")


def ood_ious(
    segmenter: FewShotSegmenter,
    *,
    samples: Features,
    sample_masks: Sequence[BoolMask],
    shots: Features,
    shot_masks: Sequence[BoolMask],
    threshold: float,
    sample_prototypes: Sequence[Any] | None = None,
) -> list[float]:
    """Each sample's ood_iou, in sample order: the FSS is calibrated on that sample alone (its
    features and final mask) and predicts every real shot at once; ood_iou is the mean over the
    shots of the IoU between the prediction > `threshold` and the shot's real mask.
    `sample_prototypes`: those calibrations, when the caller has them (`calibrate_each`)."""
    if len(sample_masks) != len(samples):
        raise ValueError(f"{len(samples)} samples but {len(sample_masks)} sample masks")
    if len(shot_masks) != len(shots):
        raise ValueError(f"{len(shots)} shots but {len(shot_masks)} shot masks")
    if not len(shots):
        raise ValueError("at least one shot is needed")
    if not 0.0 <= threshold <= 1.0:
        raise ValueError(f"threshold must be in [0, 1], got {threshold}")
    if sample_prototypes is None:
        sample_prototypes = calibrate_each(segmenter, samples, sample_masks)
    elif len(sample_prototypes) != len(samples):
        raise ValueError(f"{len(samples)} samples but {len(sample_prototypes)} prototypes")
    scores = []
    for prototypes in sample_prototypes:
        predictions = segmenter.predict(prototypes, shots)
        per_shot = [
            iou(probability > threshold, shot_mask)
            for probability, shot_mask in zip(predictions, shot_masks, strict=True)
        ]
        scores.append(float(np.mean(per_shot)))
    return scores


def is_accepted(*, prompt_kind: PromptKind, ood_iou: float, config: OodConfig) -> bool:
    """Whether a sample passes the OOD filter: text-conditioned samples need ood_iou >= beta;
    inversion-conditioned ones pass unless `config.filter_inversion_samples` is set, in which
    case the same rule applies to them."""
    if prompt_kind not in ("inversion", "text"):
        raise ValueError(f"prompt_kind must be 'inversion' or 'text', got {prompt_kind!r}")
    if prompt_kind == "inversion" and not config.filter_inversion_samples:
        return True
    return ood_iou >= config.beta
