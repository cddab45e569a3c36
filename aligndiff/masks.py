"""Binary mask helpers shared by every stage: binarization and IoU."""

from __future__ import annotations

import numpy as np
import numpy.typing as npt
from PIL import Image

BoolMask = npt.NDArray[np.bool_]

FOREGROUND_GRAY = 128
VOC_VOID_INDEX = 255


def binarize_mask(mask: Image.Image) -> BoolMask:
    """Foreground pixels of a mask image, by the rule of the public contract.

    Palette images: any index other than 0 (background) and 255 (VOC void) is foreground.
    Everything else (L, LA, RGB, RGBA, I, 1, …): foreground where the gray value is >= 128, so
    anti-aliased edges are cut at half intensity. An RGBA mask whose colour channels carry no
    information (all equal) but whose alpha does is read from its alpha channel.
    """
    if mask.mode == "P":
        index = np.asarray(mask)
        return (index != 0) & (index != VOC_VOID_INDEX)
    if mask.mode in ("RGBA", "LA"):
        rgba = np.asarray(mask.convert("RGBA"))
        rgb = rgba[..., :3]
        if rgb.min() == rgb.max() and rgba[..., 3].min() != rgba[..., 3].max():
            return rgba[..., 3] >= FOREGROUND_GRAY
        mask = mask.convert("RGB")
    if mask.mode in ("I", "I;16", "F"):
        values = np.asarray(mask, dtype=np.float64)
        peak = float(values.max()) or 1.0
        return values / peak * 255.0 >= FOREGROUND_GRAY
    return np.asarray(mask.convert("L")) >= FOREGROUND_GRAY


def iou(a: BoolMask, b: BoolMask) -> float:
    """Intersection over union of two boolean masks of one shape.

    Two empty masks agree perfectly (1.0); one empty and one not share nothing (0.0).
    """
    if a.shape != b.shape:
        raise ValueError(f"masks differ in shape: {a.shape} vs {b.shape}")
    union = np.logical_or(a, b).sum()
    if union == 0:
        return 1.0
    return float(np.logical_and(a, b).sum() / union)


def mask_to_image(mask: BoolMask) -> Image.Image:
    """A boolean mask as an 8-bit single-channel PNG-ready image (0 / 255)."""
    return Image.fromarray(mask.astype(np.uint8) * 255, mode="L")
