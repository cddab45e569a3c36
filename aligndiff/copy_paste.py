"""GAPS-style copy-paste: objects cut out by their masks, flipped, scaled, moved and pasted.

Pasting is hard (no blending): under the pasted mask the target takes the object's pixels and
its class label. The object's image and mask are resized with the same nearest-neighbour rule,
so a pasted label always sits on a pasted pixel.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
import numpy.typing as npt
from PIL import Image

from aligndiff.masks import VOC_VOID_INDEX, BoolMask

ObjectKind = Literal["shot", "inversion", "text"]
UInt8Array = npt.NDArray[np.uint8]

IGNORE_INDEX = VOC_VOID_INDEX
OBJECT_KINDS: tuple[ObjectKind, ...] = ("shot", "inversion", "text")
DEFAULT_SCALE_RANGE = (0.1, 2.0)


@dataclass
class LabeledImage:
    """An RGB image (H, W, 3) uint8 and its label map (H, W) uint8.

    Labels: 0 background, k for class k (1-based), 255 ignored.
    """

    image: UInt8Array
    labels: UInt8Array

    def __post_init__(self) -> None:
        if self.image.ndim != 3 or self.image.shape[2] != 3 or self.image.dtype != np.uint8:
            raise ValueError(
                f"image must be uint8 (H, W, 3), got {self.image.dtype} {self.image.shape}"
            )
        if self.labels.dtype != np.uint8 or self.labels.shape != self.image.shape[:2]:
            raise ValueError(
                f"labels must be uint8 {self.image.shape[:2]}, got {self.labels.dtype} "
                f"{self.labels.shape}"
            )


@dataclass
class PasteObject:
    """An object to paste: its source image (H, W, 3) uint8, boolean mask (H, W), 1-based class
    index, and where it came from (a real shot, an inversion-conditioned or a text-conditioned
    sample)."""

    image: UInt8Array
    mask: BoolMask
    class_index: int
    kind: ObjectKind

    def __post_init__(self) -> None:
        if self.image.ndim != 3 or self.image.shape[2] != 3 or self.image.dtype != np.uint8:
            raise ValueError(
                f"image must be uint8 (H, W, 3), got {self.image.dtype} {self.image.shape}"
            )
        if self.mask.dtype != np.bool_ or self.mask.shape != self.image.shape[:2]:
            raise ValueError(f"mask must be bool {self.image.shape[:2]}, got {self.mask.shape}")
        if not 1 <= self.class_index < IGNORE_INDEX:
            raise ValueError(f"class_index must be in 1..254, got {self.class_index}")
        if self.kind not in OBJECT_KINDS:
            raise ValueError(f"kind must be one of {OBJECT_KINDS}, got {self.kind!r}")


def choose_objects(
    objects: Sequence[PasteObject], k: int, rng: np.random.Generator
) -> list[PasteObject]:
    """Pick `k` objects (with replacement): half from shots and inversion samples, half from text
    samples, as in the paper's GAPS setting; all from whichever group exists if one is empty.
    Objects with empty masks are never chosen.

    With `k` odd the extra object's group is drawn at random.
    """
    if k < 0:
        raise ValueError(f"k must be >= 0, got {k}")
    if k and not objects:
        raise ValueError("no objects to choose from")
    # NOTE: an empty mask (a sample whose object was not found) has nothing to paste.
    aligned = [obj for obj in objects if obj.kind != "text" and obj.mask.any()]
    text = [obj for obj in objects if obj.kind == "text" and obj.mask.any()]
    if k and not aligned and not text:
        raise ValueError("no object with a non-empty mask to choose from")
    if not aligned or not text:
        pool = aligned or text
        return [pool[int(i)] for i in rng.integers(len(pool), size=k)]
    from_aligned = k // 2 + int(k % 2 == 1 and rng.random() < 0.5)
    chosen = [aligned[int(i)] for i in rng.integers(len(aligned), size=from_aligned)]
    chosen += [text[int(i)] for i in rng.integers(len(text), size=k - from_aligned)]
    return [chosen[int(i)] for i in rng.permutation(len(chosen))]


def copy_paste(
    target: LabeledImage,
    objects: Sequence[PasteObject],
    rng: np.random.Generator,
    *,
    scale_range: tuple[float, float] = DEFAULT_SCALE_RANGE,
) -> LabeledImage:
    """Paste `objects` in order onto a copy of `target` (later pastes cover earlier ones).

    Each object is cropped to its mask's bounding box, flipped horizontally with probability
    1/2, and scaled by s ~ U(scale_range) relative to its size in its own image once that image
    is fitted to the target (s = 1 keeps the object's share of the frame), shrunk further if
    needed so it fits inside the target. Its centre is placed uniformly at random over the
    target, so an object may be partly outside (and cut). Objects with empty masks are skipped.
    The target is not modified.
    """
    low, high = scale_range
    if not 0 < low <= high:
        raise ValueError(f"scale_range must satisfy 0 < low <= high, got {scale_range}")
    image = target.image.copy()
    labels = target.labels.copy()
    height, width = labels.shape
    for obj in objects:
        if not obj.mask.any():
            continue
        rows, cols = np.nonzero(obj.mask)
        top, bottom, left, right = rows.min(), rows.max() + 1, cols.min(), cols.max() + 1
        crop = obj.image[top:bottom, left:right]
        mask = obj.mask[top:bottom, left:right]
        if rng.random() < 0.5:
            crop, mask = crop[:, ::-1], mask[:, ::-1]
        fit = min(height / obj.image.shape[0], width / obj.image.shape[1])
        scale = fit * rng.uniform(low, high)
        scale = min(scale, height / crop.shape[0], width / crop.shape[1])
        new_h = max(1, round(crop.shape[0] * scale))
        new_w = max(1, round(crop.shape[1] * scale))
        crop = _resize_nearest(np.ascontiguousarray(crop), (new_w, new_h))
        mask = _resize_nearest(np.ascontiguousarray(mask).astype(np.uint8), (new_w, new_h)) > 0
        centre_y, centre_x = int(rng.integers(height)), int(rng.integers(width))
        y0, x0 = centre_y - new_h // 2, centre_x - new_w // 2
        # The part of the pasted box that lies inside the target.
        ty0, tx0 = max(y0, 0), max(x0, 0)
        ty1, tx1 = min(y0 + new_h, height), min(x0 + new_w, width)
        if ty0 >= ty1 or tx0 >= tx1:
            continue
        region = mask[ty0 - y0 : ty1 - y0, tx0 - x0 : tx1 - x0]
        image[ty0:ty1, tx0:tx1][region] = crop[ty0 - y0 : ty1 - y0, tx0 - x0 : tx1 - x0][region]
        labels[ty0:ty1, tx0:tx1][region] = obj.class_index
    return LabeledImage(image=image, labels=labels)


def _resize_nearest(array: UInt8Array, size: tuple[int, int]) -> UInt8Array:
    """`array` resized to (width, height) with nearest-neighbour sampling."""
    resized: UInt8Array = np.asarray(Image.fromarray(array).resize(size, Image.Resampling.NEAREST))
    return resized
