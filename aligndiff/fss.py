"""Few-shot segmentation (FSS): the pluggable interface and the default prototype segmenter.

An FSS is used in three phases: `embed` images once (batched), `calibrate` on support features
and masks (returns prototypes; nothing is mutated, so one embedding serves many calibrations),
and `predict` foreground probabilities for query features at each query's own image size.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import numpy.typing as npt
import torch
import torch.nn.functional as F

from aligndiff.masks import BoolMask
from aligndiff.models.backbone import BackboneBundle

RGBImage = npt.NDArray[np.uint8]  # (H, W, 3)
ProbabilityMap = npt.NDArray[np.float32]  # (H, W), values in [0, 1]


@dataclass
class Features:
    """Backbone feature maps of a batch of images, with each source image's (height, width)."""

    maps: torch.Tensor  # (N, C, h, w)
    sizes: list[tuple[int, int]]

    def __len__(self) -> int:
        return len(self.sizes)

    def select(self, indices: Sequence[int]) -> Features:
        index = list(indices)
        return Features(self.maps[index], [self.sizes[i] for i in index])

    @staticmethod
    def concat(parts: Sequence[Features]) -> Features:
        return Features(torch.cat([p.maps for p in parts]), [s for p in parts for s in p.sizes])


class FewShotSegmenter(Protocol):
    """What the annotation and OOD stages need from a few-shot segmenter."""

    def embed(self, images: Sequence[RGBImage]) -> Features: ...

    def calibrate(self, support: Features, masks: Sequence[BoolMask]) -> Any: ...

    def predict(self, prototypes: Any, query: Features) -> list[ProbabilityMap]: ...


def calibrate_each(
    segmenter: FewShotSegmenter, features: Features, masks: Sequence[BoolMask]
) -> list[Any]:
    """Each image's prototypes calibrated on that image alone, under its own mask: what the
    OOD filter segments the shots with, and whose foreground the semantic check compares, so
    a caller computes them once for both."""
    if len(masks) != len(features):
        raise ValueError(f"{len(features)} images but {len(masks)} masks")
    return [segmenter.calibrate(features.select([i]), [mask]) for i, mask in enumerate(masks)]


# Self-support refinement (SSP, Fan et al., ECCV 2022): query regions the first prediction is
# confident about, and the weight of the query's own prototype against the support's.
SELF_SUPPORT_FOREGROUND = 0.7
SELF_SUPPORT_BACKGROUND = 0.6
SELF_SUPPORT_WEIGHT = 0.5
_EPS = 1e-6


@dataclass(frozen=True)
class Prototypes:
    """Foreground and background prototypes (C,), float32, from masked average pooling.

    The weights are the soft mask areas pooled, in feature cells; a class with weight 0 was absent
    from every support and is never predicted.
    """

    foreground: torch.Tensor
    background: torch.Tensor
    foreground_weight: float
    background_weight: float


class PrototypeSegmenter:
    """Training-free prototype matching over a ViT backbone, with self-support refinement.

    Features are the backbone's last-layer patch tokens. Calibration pools them under the soft
    support masks into one foreground and one background prototype; prediction is a softmax over
    the scaled cosine similarities to the two, refined once with prototypes pooled from the
    query's own confident regions (SSP), and upsampled bilinearly to each query's size.
    """

    def __init__(
        self,
        backbone: BackboneBundle,
        *,
        batch_size: int = 16,
        temperature: float = 10.0,
        refine: bool = True,
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        self.backbone = backbone
        self.batch_size = batch_size
        self.temperature = temperature
        self.refine = refine

    def embed(self, images: Sequence[RGBImage]) -> Features:
        """Patch features (N, C, h, w) of RGB uint8 images of any sizes, in the backbone's dtype
        and on its device, with each image's (height, width)."""
        if not images:
            raise ValueError("embed needs at least one image")
        for image in images:
            if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
                raise ValueError(
                    f"expected an (H, W, 3) uint8 RGB image, got {image.dtype} {image.shape}"
                )
        parts = [
            self._embed_batch(images[start : start + self.batch_size])
            for start in range(0, len(images), self.batch_size)
        ]
        return Features(
            torch.cat(parts), [(int(image.shape[0]), int(image.shape[1])) for image in images]
        )

    @torch.inference_mode()
    def calibrate(self, support: Features, masks: Sequence[BoolMask]) -> Prototypes:
        """Foreground and background prototypes pooled over all supports under their masks.

        Masks are area-downsampled to the feature grid, so a foreground smaller than a patch
        still contributes in proportion to the area it covers.
        """
        if len(support) == 0:
            raise ValueError("calibrate needs at least one support")
        if len(masks) != len(support):
            raise ValueError(f"{len(support)} supports but {len(masks)} masks")
        for index, (mask, size) in enumerate(zip(masks, support.sizes, strict=True)):
            if mask.shape != size:
                raise ValueError(f"mask {index} is {mask.shape}, its image {size}")
        channels = support.maps.shape[1]
        device = support.maps.device
        foreground = torch.zeros(channels, device=device)
        background = torch.zeros(channels, device=device)
        foreground_weight = torch.zeros((), device=device)
        background_weight = torch.zeros((), device=device)
        for start in range(0, len(support), self.batch_size):
            maps = support.maps[start : start + self.batch_size].float()
            # (n, 2, h, w): foreground and background cover of each feature cell. NOTE: the
            # background is pooled from the complement mask, not 1 - cover, so a full mask
            # leaves exactly zero background weight rather than rounding error.
            weights = torch.cat(
                [
                    _cell_cover(mask, maps.shape[-2:], device)
                    for mask in masks[start : start + self.batch_size]
                ]
            )
            foreground += torch.einsum("nchw,nhw->c", maps, weights[:, 0])
            background += torch.einsum("nchw,nhw->c", maps, weights[:, 1])
            foreground_weight += weights[:, 0].sum()
            background_weight += weights[:, 1].sum()
        # An absent class (weight 0) keeps a zero prototype; it is never matched against.
        return Prototypes(
            foreground=foreground / foreground_weight if foreground_weight > 0 else foreground,
            background=background / background_weight if background_weight > 0 else background,
            foreground_weight=float(foreground_weight),
            background_weight=float(background_weight),
        )

    def predict(self, prototypes: Prototypes, query: Features) -> list[ProbabilityMap]:
        """Foreground probability of every pixel of each query, at the query's own size."""
        results: list[ProbabilityMap] = []
        for start in range(0, len(query), self.batch_size):
            maps = query.maps[start : start + self.batch_size].float()
            probabilities = self._predict_grid(prototypes, maps)
            for probability, size in zip(
                probabilities, query.sizes[start : start + self.batch_size], strict=True
            ):
                upsampled = F.interpolate(
                    probability[None, None], size=size, mode="bilinear", align_corners=False
                )[0, 0]
                results.append(upsampled.clamp(0.0, 1.0).cpu().numpy().astype(np.float32))
        return results

    @torch.inference_mode()
    def _embed_batch(self, images: Sequence[RGBImage]) -> torch.Tensor:
        backbone = self.backbone
        size = (backbone.image_size, backbone.image_size)
        pixels = torch.cat(
            [
                F.interpolate(
                    torch.from_numpy(np.array(image, copy=True))
                    .to(backbone.device)
                    .permute(2, 0, 1)[None]
                    .float(),
                    size=size,
                    mode="bilinear",
                    align_corners=False,
                    antialias=True,
                )
                for image in images
            ]
        )
        mean = torch.tensor(backbone.mean, device=backbone.device).view(1, 3, 1, 1)
        std = torch.tensor(backbone.std, device=backbone.device).view(1, 3, 1, 1)
        pixels = ((pixels / 255.0 - mean) / std).to(backbone.dtype)
        tokens = backbone.model(pixel_values=pixels).last_hidden_state
        side = backbone.grid_size
        if tokens.shape[1] < side * side:
            raise ValueError(
                f"backbone returned {tokens.shape[1]} tokens for a {side}x{side} patch grid"
            )
        # NOTE: the patch tokens come last; whatever precedes them (CLS, registers) is dropped.
        patches = tokens[:, tokens.shape[1] - side * side :]
        return patches.reshape(len(images), side, side, -1).permute(0, 3, 1, 2).contiguous()

    @torch.inference_mode()
    def _predict_grid(self, prototypes: Prototypes, maps: torch.Tensor) -> torch.Tensor:
        """Foreground probabilities (N, h, w) on the feature grid of float32 maps (N, C, h, w)."""
        count = maps.shape[0]
        has_foreground = prototypes.foreground_weight > 0
        has_background = prototypes.background_weight > 0
        if not (has_foreground and has_background):
            return maps.new_full((count, *maps.shape[-2:]), float(has_foreground))
        foreground = prototypes.foreground.to(maps.device).expand(count, -1)
        background = prototypes.background.to(maps.device).expand(count, -1)
        probability = self._match(maps, foreground, background)
        if not self.refine:
            return probability
        foreground = _blend_self_support(foreground, maps, probability > SELF_SUPPORT_FOREGROUND)
        background = _blend_self_support(
            background, maps, (1.0 - probability) > SELF_SUPPORT_BACKGROUND
        )
        return self._match(maps, foreground, background)

    def _match(
        self, maps: torch.Tensor, foreground: torch.Tensor, background: torch.Tensor
    ) -> torch.Tensor:
        """Softmax over scaled cosine similarities to per-query prototypes (N, C)."""
        features = F.normalize(maps, dim=1, eps=_EPS)
        similarity_fg = torch.einsum("nchw,nc->nhw", features, F.normalize(foreground, dim=1))
        similarity_bg = torch.einsum("nchw,nc->nhw", features, F.normalize(background, dim=1))
        # A two-way softmax is the sigmoid of the logit difference.
        return torch.sigmoid(self.temperature * (similarity_fg - similarity_bg))


def _blend_self_support(
    prototype: torch.Tensor, maps: torch.Tensor, region: torch.Tensor
) -> torch.Tensor:
    """Average each query's support prototype (N, C) with the query's own features pooled over
    its confident `region` (N, h, w); queries with no confident region keep the support's."""
    weights = region.to(maps.dtype)
    area = weights.sum(dim=(1, 2))
    pooled = torch.einsum("nchw,nhw->nc", maps, weights) / area.clamp_min(1.0)[:, None]
    blended = (1.0 - SELF_SUPPORT_WEIGHT) * prototype + SELF_SUPPORT_WEIGHT * pooled
    return torch.where((area > 0)[:, None], blended, prototype)


def _cell_cover(mask: BoolMask, grid: Sequence[int], device: torch.device) -> torch.Tensor:
    """Fractions (1, 2, h, w) of each feature cell covered by the mask and by its complement."""
    both = np.stack([mask, ~mask]).astype(np.float32)
    return F.interpolate(torch.from_numpy(both).to(device)[None], size=tuple(grid), mode="area")
