"""The few-shot segmenter's vision backbone: DINOv2 from `transformers`, real or tiny.

"tiny" builds a small random-weight DINOv2 from config (cached on disk) and then loads it by
the same path as real weights, a local folder or a hub id such as "facebook/dinov2-small".
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModel, BitImageProcessorPil, Dinov2Config, Dinov2Model
from transformers.utils import IMAGE_PROCESSOR_NAME, cached_file

from aligndiff.models.cache import cached_build
from aligndiff.settings import TINY

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
TINY_BACKBONE_NAME = "tiny-dinov2-v1"
_TINY_SEED = 0
_BILINEAR = 2  # PIL.Image.Resampling.BILINEAR, as stored in preprocessing configs

RGBTriple = tuple[float, float, float]


@dataclass
class BackboneBundle:
    """A loaded backbone and how to feed it.

    `model(pixel_values=x)` takes (N, 3, image_size, image_size) normalized pixels in `dtype` on
    `device` and returns an object whose `last_hidden_state` is (N, prefix + h * w, C): any
    prefix tokens (CLS, registers) followed by the patch tokens in row-major order, with
    h = w = image_size // patch_size.
    """

    model: torch.nn.Module
    image_size: int
    mean: RGBTriple
    std: RGBTriple
    patch_size: int
    model_id: str
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    dtype: torch.dtype = torch.float32

    def __post_init__(self) -> None:
        if self.image_size <= 0 or self.image_size % self.patch_size:
            raise ValueError(
                f"image_size {self.image_size} is not a positive multiple of "
                f"patch_size {self.patch_size}"
            )
        if len(self.mean) != 3 or len(self.std) != 3:
            raise ValueError("mean and std need one value per RGB channel")

    @property
    def grid_size(self) -> int:
        """Patch tokens per side of the feature map."""
        return self.image_size // self.patch_size


def tiny_dinov2_config() -> Dinov2Config:
    """A small DINOv2 (2 layers, width 64, 8-pixel patches, 128-pixel input: a 16x16 grid)."""
    return Dinov2Config(
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        mlp_ratio=4,
        image_size=128,
        patch_size=8,
    )


def save_tiny_backbone(directory: Path) -> None:
    """Write the tiny random-weight DINOv2 and its preprocessing config to `directory`.

    The weights depend only on the seed, so every process builds the same model.
    """
    config = tiny_dinov2_config()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(_TINY_SEED)
        model = Dinov2Model(config)
    model.save_pretrained(directory)
    size = _side(config.image_size)
    BitImageProcessorPil(
        do_resize=True,
        size={"height": size, "width": size},
        resample=_BILINEAR,
        do_center_crop=False,
        image_mean=list(IMAGENET_MEAN),
        image_std=list(IMAGENET_STD),
    ).save_pretrained(directory)


def load_backbone(
    spec: str,
    *,
    device: torch.device | str,
    dtype: torch.dtype,
    cache_dir: Path,
    image_size: int | None = None,
) -> BackboneBundle:
    """Load a DINOv2-style backbone in eval mode with gradients off.

    `spec` is "tiny" (built into `cache_dir` on first use), a local folder or a hub id. The
    input size is `image_size` if given; else the preprocessing config's exact (height, width)
    resize when it has one; else the model's native resolution (`config.image_size`, 518 for the
    released DINOv2: resize-and-crop classification preprocessing is not used for dense features).
    Mean and std come from the preprocessing config, ImageNet's when absent.
    """
    source = (
        str(cached_build(cache_dir, TINY_BACKBONE_NAME, save_tiny_backbone))
        if spec == TINY
        else spec
    )
    device = torch.device(device)
    model = AutoModel.from_pretrained(source, dtype=dtype)
    model.to(device).eval().requires_grad_(False)
    preprocessing = _preprocessing_config(source)
    patch_size = _side(model.config.patch_size)
    size = preprocessing.get("size") or {}
    if image_size is None:
        if "height" in size and "width" in size and size["height"] == size["width"]:
            image_size = int(size["height"])
        else:
            image_size = _side(model.config.image_size)
    return BackboneBundle(
        model=model,
        image_size=image_size,
        mean=_triple(preprocessing.get("image_mean"), IMAGENET_MEAN),
        std=_triple(preprocessing.get("image_std"), IMAGENET_STD),
        patch_size=patch_size,
        model_id=spec,
        device=device,
        dtype=dtype,
    )


def _preprocessing_config(source: str) -> dict[str, Any]:
    """The saved preprocessing config of a folder or hub repo, or {} when there is none."""
    path = cached_file(source, IMAGE_PROCESSOR_NAME, _raise_exceptions_for_missing_entries=False)
    if path is None:
        return {}
    config: dict[str, Any] = json.loads(Path(path).read_text())
    return config


def _side(value: int | list[int] | tuple[int, int]) -> int:
    if isinstance(value, int):
        return value
    height, width = value
    if height != width:
        raise ValueError(f"only square patches and inputs are supported, got {value}")
    return int(height)


def _triple(value: Any, default: RGBTriple) -> RGBTriple:
    if value is None:
        return default
    if isinstance(value, int | float):
        return (float(value),) * 3
    red, green, blue = (float(v) for v in value)
    return (red, green, blue)
