"""Instances: the separate objects of a binary mask (its connected components).

A final mask may hold several objects (two dogs, a dog cut in two by a fence post): datasets
write one annotation per object, which is what instance-segmentation trainers read. Objects are
8-connected (pixels touching at a corner belong together, as in COCO's and Ultralytics'
tooling) and at least `min_area` pixels: smaller specks, annotation noise, are no object of
their own, and the exports leave them out.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

from aligndiff.masks import BoolMask


@dataclass(frozen=True)
class Instance:
    """One object of a mask: its pixels (a mask of the whole image's size), its pixel count and
    its bounding box `(x, y, width, height)` in pixels."""

    mask: BoolMask
    area: int
    bbox: tuple[int, int, int, int]


def split_instances(mask: BoolMask, *, min_area: int) -> list[Instance]:
    """The mask's objects of at least `min_area` pixels, in raster order of their first pixel
    (top row first, then left): deterministic for a given mask."""
    if mask.ndim != 2:
        raise ValueError(f"a mask is 2-D, got shape {mask.shape}")
    count, labels, stats, _ = cv2.connectedComponentsWithStats(
        mask.astype(np.uint8), connectivity=8, ltype=cv2.CV_32S
    )
    instances = []
    # Label 0 is the background; the others are numbered in raster order by OpenCV.
    for label in range(1, count):
        x, y, width, height, area = (int(v) for v in stats[label])
        if area >= min_area:
            instances.append(Instance(labels == label, area, (x, y, width, height)))
    return instances


def count_instances(mask: BoolMask, *, min_area: int) -> int:
    """How many objects of at least `min_area` pixels the mask holds."""
    _, _, stats, _ = cv2.connectedComponentsWithStats(
        mask.astype(np.uint8), connectivity=8, ltype=cv2.CV_32S
    )
    return int((stats[1:, cv2.CC_STAT_AREA] >= min_area).sum())
