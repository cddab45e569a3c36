"""Mask helpers: IoU's edge cases and the binarization rule of the public contract."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from aligndiff.masks import binarize_mask, iou


def disk(size: int = 16, radius: float = 5, center: tuple[float, float] = (8, 8)) -> np.ndarray:
    yy, xx = np.mgrid[:size, :size]
    return (yy - center[0]) ** 2 + (xx - center[1]) ** 2 <= radius**2


def test_two_empty_masks_agree_perfectly() -> None:
    empty = np.zeros((8, 8), dtype=bool)
    assert iou(empty, empty) == 1.0


def test_an_empty_mask_shares_nothing_with_an_object() -> None:
    assert iou(np.zeros((16, 16), dtype=bool), disk()) == 0.0
    assert iou(disk(), np.zeros((16, 16), dtype=bool)) == 0.0


def test_iou_is_intersection_over_union() -> None:
    left = np.zeros((4, 4), dtype=bool)
    left[:, :2] = True
    middle = np.zeros((4, 4), dtype=bool)
    middle[:, 1:3] = True

    assert iou(left, middle) == pytest.approx(4 / 12)
    assert iou(disk(), disk()) == 1.0


def test_masks_of_different_shapes_are_refused() -> None:
    with pytest.raises(ValueError, match="differ in shape"):
        iou(np.zeros((4, 4), dtype=bool), np.zeros((4, 5), dtype=bool))


def test_gray_masks_are_cut_at_half_intensity() -> None:
    gray = Image.fromarray(np.array([[0, 127, 128, 255]], dtype=np.uint8), mode="L")

    assert binarize_mask(gray).tolist() == [[False, False, True, True]]


def test_an_alpha_only_rgba_mask_is_read_from_its_alpha() -> None:
    rgba = np.zeros((1, 3, 4), dtype=np.uint8)
    rgba[..., 3] = [0, 100, 200]

    assert binarize_mask(Image.fromarray(rgba, mode="RGBA")).tolist() == [[False, False, True]]
