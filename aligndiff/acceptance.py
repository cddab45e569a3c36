"""Acceptance: whether a synthetic sample shows the class of the real shots.

The few-shot segmenter (FSS) behaves like a saliency detector on images with one salient object:
calibrated on a dog, it segments an albatross well, so neither the consensus IoU nor the OOD
filter can tell a wrong-class sample from a right one. Acceptance therefore adds a *semantic*
check against the real shots, for every sample (inversion and text ones alike), from two signals
that cost next to nothing because their inputs are already computed:

- `prototype_similarity`: the cosine between the sample's foreground prototype (its FSS features
  pooled under its final mask) and the shots' (the direction of the mean of each shot's unit
  foreground prototype);
- `shot_similarity`: the cosine between the sample's CLIP image embedding and the mean of the
  shots' (`aligndiff.scoring`).

A sample passes when both reach their class's thresholds. The thresholds are calibrated per
class from the shots themselves (`calibrate`): each shot is copied with a flip, a crop around its
object and a colour jitter, and each copy is compared with the other shots (with the shot itself
when it is the only one). Those copies show the class, so their distances (1 − similarity) are
distances a sample of the class may have; a sample may be `distance_factor` times as far as the
farthest copy. Settings may fix either threshold instead.

A sample's verdict (`verdict`): rejected by `"ood"` when the OOD filter rejects it, else by
`"similarity"` when the semantic check does, else accepted. In annotation (Algorithm 1) a sample
joins the support set as `consensus` only if it passes the semantic check too.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageEnhance

from aligndiff.fss import Features, FewShotSegmenter, RGBImage, calibrate_each
from aligndiff.masks import BoolMask
from aligndiff.ood import OodConfig, PromptKind, is_accepted, ood_ious

RejectedBy = Literal["ood", "similarity"]
# Unit CLIP image embeddings (N, D) of RGB images, as `ClipScorer.embed_images` gives them.
ClipEmbed = Callable[[Sequence[RGBImage]], torch.Tensor]
SIGNALS = ("prototype_similarity", "shot_similarity")

# The calibration copies of a shot: a crop around the object with this share of its box as
# margin on each side, and a colour jitter of this brightness and saturation.
CROP_MARGIN = 0.1
JITTER_BRIGHTNESS = 0.8
JITTER_SATURATION = 1.25


@dataclass(frozen=True)
class AcceptanceConfig:
    """How the semantic check's thresholds are set.

    `distance_factor`: how many times the farthest calibration copy's distance (1 − similarity)
    a sample may be from the shots. `min_prototype_similarity` / `min_shot_similarity`: fixed
    thresholds that replace the calibrated ones (None: calibrate). `enabled`: False keeps only
    the OOD filter (the paper's rule)."""

    distance_factor: float = 1.5
    min_prototype_similarity: float | None = None
    min_shot_similarity: float | None = None
    enabled: bool = True

    def __post_init__(self) -> None:
        if self.distance_factor < 1.0:
            raise ValueError(f"distance_factor must be >= 1, got {self.distance_factor}")
        for name in ("min_prototype_similarity", "min_shot_similarity"):
            value = getattr(self, name)
            if value is not None and not -1.0 <= value <= 1.0:
                raise ValueError(f"{name} must be in [-1, 1], got {value}")


@dataclass(frozen=True)
class AcceptanceThresholds:
    """The lowest accepted value of each signal for one class, where each came from, and the
    calibration copies' similarities they were derived from (for the report)."""

    prototype_similarity: float
    shot_similarity: float
    source: dict[str, Literal["calibrated", "settings", "disabled"]]
    calibration: dict[str, list[float]]

    def passes(self, *, prototype_similarity: float, shot_similarity: float) -> bool:
        return (
            prototype_similarity >= self.prototype_similarity
            and shot_similarity >= self.shot_similarity
        )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> AcceptanceThresholds:
        return cls(
            prototype_similarity=float(data["prototype_similarity"]),
            shot_similarity=float(data["shot_similarity"]),
            source=dict(data["source"]),
            calibration={k: [float(v) for v in vs] for k, vs in data["calibration"].items()},
        )


@dataclass(frozen=True)
class ClassReference:
    """What samples of a class are compared with: the shots' unit foreground prototype (C,)
    and the unit direction of their mean CLIP image embedding (D,), float32 on the CPU."""

    prototype: torch.Tensor
    clip_centroid: torch.Tensor


def foreground_prototypes(
    segmenter: FewShotSegmenter, features: Features, masks: Sequence[BoolMask]
) -> torch.Tensor:
    """Each image's unit foreground prototype (N, C), float32 on the CPU: its features pooled
    under its own mask by the segmenter's calibration. An empty mask gives a zero row."""
    return unit_foregrounds(
        calibrate_each(segmenter, features, masks), channels=features.maps.shape[1]
    )


def unit_foregrounds(prototypes: Sequence[Any], *, channels: int) -> torch.Tensor:
    """The unit foreground vectors (N, C) of calibrations (`calibrate_each`)."""
    rows = []
    for calibrated in prototypes:
        foreground = getattr(calibrated, "foreground", None)
        if not isinstance(foreground, torch.Tensor):
            raise TypeError(
                f"{type(calibrated).__name__} has no foreground prototype: the semantic check "
                "needs one"
            )
        rows.append(foreground.detach().float().cpu())
    if not rows:
        return torch.zeros(0, channels)
    return F.normalize(torch.stack(rows), dim=-1)


def class_prototype(prototypes: torch.Tensor) -> torch.Tensor:
    """The direction of the mean of unit prototypes (N, C) → (C,): every shot weighs the same."""
    if not len(prototypes):
        raise ValueError("at least one prototype is needed")
    return F.normalize(prototypes.mean(dim=0), dim=-1)


def prototype_similarities(
    segmenter: FewShotSegmenter,
    features: Features,
    masks: Sequence[BoolMask],
    reference: torch.Tensor,
) -> list[float]:
    """Each sample's `prototype_similarity` to a class prototype (`class_prototype`)."""
    return (foreground_prototypes(segmenter, features, masks) @ reference).tolist()


def calibration_copies(image: RGBImage, mask: BoolMask) -> list[tuple[RGBImage, BoolMask]]:
    """A shot's copies that still show its class: flipped, cropped around its object, and
    colour-jittered."""
    flipped = (np.ascontiguousarray(image[:, ::-1]), np.ascontiguousarray(mask[:, ::-1]))
    rows, cols = np.nonzero(mask)
    if not len(rows):
        raise ValueError("a shot mask without foreground cannot be calibrated on")
    top, bottom, left, right = rows.min(), rows.max() + 1, cols.min(), cols.max() + 1
    pad_y = round(int(bottom - top) * CROP_MARGIN)
    pad_x = round(int(right - left) * CROP_MARGIN)
    height, width = mask.shape
    box = (
        slice(max(0, top - pad_y), min(height, bottom + pad_y)),
        slice(max(0, left - pad_x), min(width, right + pad_x)),
    )
    cropped = (np.ascontiguousarray(image[box]), np.ascontiguousarray(mask[box]))
    picture = Image.fromarray(image)
    picture = ImageEnhance.Brightness(picture).enhance(JITTER_BRIGHTNESS)
    picture = ImageEnhance.Color(picture).enhance(JITTER_SATURATION)
    jittered = (np.asarray(picture, dtype=np.uint8), mask)
    return [flipped, cropped, jittered]


def calibrate(
    segmenter: FewShotSegmenter,
    clip_embed: ClipEmbed,
    shot_images: Sequence[RGBImage],
    shot_masks: Sequence[BoolMask],
    config: AcceptanceConfig,
) -> AcceptanceThresholds:
    """The class's thresholds from its shots (see the module docstring); a threshold that the
    config fixes is taken as it is. `clip_embed` gives unit CLIP image embeddings (N, D)."""
    if not shot_images:
        raise ValueError("at least one shot is needed")
    if len(shot_images) != len(shot_masks):
        raise ValueError(f"{len(shot_images)} shots but {len(shot_masks)} masks")
    if not config.enabled:
        return AcceptanceThresholds(
            prototype_similarity=-1.0,
            shot_similarity=-1.0,
            source=dict.fromkeys(SIGNALS, "disabled"),
            calibration={name: [] for name in SIGNALS},
        )
    shot_prototypes = foreground_prototypes(
        segmenter, segmenter.embed(list(shot_images)), shot_masks
    )
    shot_clip = clip_embed(list(shot_images))
    copies = [
        (shot, copy)
        for shot in range(len(shot_images))
        for copy in calibration_copies(shot_images[shot], shot_masks[shot])
    ]
    copy_images = [image for _, (image, _) in copies]
    copy_prototypes = foreground_prototypes(
        segmenter, segmenter.embed(copy_images), [mask for _, (_, mask) in copies]
    )
    copy_clip = clip_embed(copy_images)
    observed: dict[str, list[float]] = {name: [] for name in SIGNALS}
    for row, (shot, _) in enumerate(copies):
        # Compared with the other shots (with itself when it is the only one).
        others = [i for i in range(len(shot_images)) if i != shot] or [shot]
        observed["prototype_similarity"].append(
            float(copy_prototypes[row] @ class_prototype(shot_prototypes[others]))
        )
        observed["shot_similarity"].append(
            float(copy_clip[row] @ F.normalize(shot_clip[others].mean(dim=0), dim=-1))
        )
    fixed = {
        "prototype_similarity": config.min_prototype_similarity,
        "shot_similarity": config.min_shot_similarity,
    }
    thresholds: dict[str, float] = {}
    source: dict[str, Literal["calibrated", "settings", "disabled"]] = {}
    for name in SIGNALS:
        if fixed[name] is not None:
            thresholds[name], source[name] = float(fixed[name]), "settings"  # type: ignore[arg-type]
            continue
        farthest = max(1.0 - value for value in observed[name])
        thresholds[name] = max(-1.0, 1.0 - config.distance_factor * max(farthest, 0.0))
        source[name] = "calibrated"
    return AcceptanceThresholds(
        prototype_similarity=thresholds["prototype_similarity"],
        shot_similarity=thresholds["shot_similarity"],
        source=source,
        calibration={name: [round(v, 6) for v in values] for name, values in observed.items()},
    )


@dataclass(frozen=True)
class SemanticCheck:
    """The semantic check of one class: its shots' prototype and its thresholds."""

    reference: torch.Tensor  # the shots' class prototype (C,), `class_prototype`
    thresholds: AcceptanceThresholds

    @classmethod
    def for_shots(
        cls,
        segmenter: FewShotSegmenter,
        shots: Features,
        shot_masks: Sequence[BoolMask],
        thresholds: AcceptanceThresholds,
    ) -> SemanticCheck:
        return cls(
            reference=class_prototype(foreground_prototypes(segmenter, shots, shot_masks)),
            thresholds=thresholds,
        )

    def prototype_similarities(
        self, segmenter: FewShotSegmenter, features: Features, masks: Sequence[BoolMask]
    ) -> list[float]:
        return prototype_similarities(segmenter, features, masks, self.reference)

    def similarities_of(self, prototypes: Sequence[Any]) -> list[float]:
        """The prototype similarities of samples already calibrated alone (`calibrate_each`)."""
        vectors = unit_foregrounds(prototypes, channels=self.reference.shape[0])
        return (vectors @ self.reference).tolist()

    def passes(self, *, prototype_similarity: float, shot_similarity: float) -> bool:
        return self.thresholds.passes(
            prototype_similarity=prototype_similarity, shot_similarity=shot_similarity
        )


@dataclass(frozen=True)
class FinalSignals:
    """What the verdict reads of each sample besides its CLIP scores, in sample order."""

    ood_iou: list[float]
    prototype_similarity: list[float]


def final_signals(
    segmenter: FewShotSegmenter,
    *,
    samples: Features,
    sample_masks: Sequence[BoolMask],
    shots: Features,
    shot_masks: Sequence[BoolMask],
    semantic: SemanticCheck,
    ood: OodConfig,
) -> FinalSignals:
    """Each sample's ood_iou and prototype similarity, from its final mask: the segmenter is
    calibrated once on each sample alone, which serves both."""
    alone = calibrate_each(segmenter, samples, sample_masks)
    return FinalSignals(
        ood_iou=ood_ious(
            segmenter,
            samples=samples,
            sample_masks=sample_masks,
            shots=shots,
            shot_masks=shot_masks,
            threshold=ood.prediction_threshold,
            sample_prototypes=alone,
        ),
        prototype_similarity=semantic.similarities_of(alone),
    )


def verdict(
    *,
    prompt_kind: PromptKind,
    ood_iou: float,
    prototype_similarity: float,
    shot_similarity: float,
    ood: OodConfig,
    thresholds: AcceptanceThresholds,
) -> tuple[bool, RejectedBy | None]:
    """A sample's (accepted, rejected_by): the OOD filter first, then the semantic check."""
    if not is_accepted(prompt_kind=prompt_kind, ood_iou=ood_iou, config=ood):
        return False, "ood"
    if not thresholds.passes(
        prototype_similarity=prototype_similarity, shot_similarity=shot_similarity
    ):
        return False, "similarity"
    return True, None
