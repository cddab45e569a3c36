"""Downstream segmentation models: DeepLabV3 with a cosine classifier, and SegFormer.

Both come from `transformers` (a `ResNetModel` backbone under an ASPP head, or
`SegformerForSemanticSegmentation`), real by local folder or hub id, or "tiny": a small
random-weight model built from config into the model cache and loaded by the same
`from_pretrained` path. `save_segmenter` stores the backbone's config beside the weights, so a
trained model loads back without the hub.
"""

from __future__ import annotations

import io
import json
import zipfile
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors
from torch import nn
from transformers import (
    ResNetConfig,
    ResNetModel,
    SegformerConfig,
    SegformerForSemanticSegmentation,
)

import aligndiff
from aligndiff.models.backbone import IMAGENET_MEAN, IMAGENET_STD
from aligndiff.models.cache import cached_build
from aligndiff.settings import TINY

ARCHITECTURES = ("deeplabv3", "segformer")
COSINE_SCALE = 10.0
TINY_RESNET_NAME = "tiny-resnet-v1"
TINY_SEGFORMER_NAME = "tiny-segformer-v1"
_TINY_SEED = 0
# ASPP dilation rates at output stride 8: DeepLabV3's (12, 24, 36) for real backbones; small
# rates for the tiny one, whose 64 px inputs give 8x8 feature maps.
_ASPP_RATES = (12, 24, 36)
_TINY_ASPP_RATES = (1, 2, 3)
_ASPP_CHANNELS = 256
_TINY_ASPP_CHANNELS = 32
_WEIGHTS_FILE = "model.safetensors"
_CONFIG_FILE = "config.json"


def tiny_resnet_config() -> ResNetConfig:
    """A small ResNet (basic blocks, one per stage, widths 16/32/64/64)."""
    return ResNetConfig(
        embedding_size=16, hidden_sizes=[16, 32, 64, 64], depths=[1, 1, 1, 1], layer_type="basic"
    )


def tiny_segformer_config() -> SegformerConfig:
    """A small SegFormer (MiT with one block per stage, widths 16/32/64/64, no dropout)."""
    return SegformerConfig(
        hidden_sizes=[16, 32, 64, 64],
        depths=[1, 1, 1, 1],
        num_attention_heads=[1, 1, 2, 2],
        decoder_hidden_size=32,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        classifier_dropout_prob=0.0,
        drop_path_rate=0.0,
    )


def save_tiny_resnet(directory: Path) -> None:
    """Write the tiny random-weight ResNet (weights depend only on the seed)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(_TINY_SEED)
        model = ResNetModel(tiny_resnet_config())
    model.save_pretrained(directory)


def save_tiny_segformer(directory: Path) -> None:
    """Write the tiny random-weight SegFormer (weights depend only on the seed)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(_TINY_SEED)
        model = SegformerForSemanticSegmentation(tiny_segformer_config())
    model.save_pretrained(directory)


class CosineClassifier(nn.Module):
    """Per-pixel classifier: `scale` times the cosine of each feature with each class weight.

    Logits are therefore bounded by `scale` in magnitude whatever the feature norms (GAPS).
    """

    def __init__(self, in_channels: int, num_classes: int, scale: float = COSINE_SCALE) -> None:
        super().__init__()
        self.scale = scale
        self.weight = nn.Parameter(torch.empty(num_classes, in_channels))
        nn.init.normal_(self.weight, std=0.01)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        features = F.normalize(features, dim=1)
        weight = F.normalize(self.weight, dim=1)
        return self.scale * torch.einsum("bchw,kc->bkhw", features, weight)


class ASPP(nn.Module):
    """Atrous spatial pyramid pooling: a 1x1 branch, three dilated 3x3 branches, image pooling,
    concatenated and projected by a 1x1 convolution."""

    def __init__(self, in_channels: int, channels: int, rates: tuple[int, ...]) -> None:
        super().__init__()

        def branch(kernel: int, rate: int) -> nn.Sequential:
            padding = 0 if kernel == 1 else rate
            return nn.Sequential(
                nn.Conv2d(
                    in_channels, channels, kernel, padding=padding, dilation=rate, bias=False
                ),
                nn.BatchNorm2d(channels),
                nn.ReLU(),
            )

        self.branches = nn.ModuleList([branch(1, 1), *(branch(3, rate) for rate in rates)])
        # NOTE: no batch norm on the pooled branch: it sees one value per channel and image, and
        # batch norm in training mode fails on a batch of one.
        self.pooling = nn.Sequential(
            nn.AdaptiveAvgPool2d(1), nn.Conv2d(in_channels, channels, 1), nn.ReLU()
        )
        self.project = nn.Sequential(
            nn.Conv2d(channels * (len(rates) + 2), channels, 1, bias=False),
            nn.BatchNorm2d(channels),
            nn.ReLU(),
        )

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        outputs = [branch(features) for branch in self.branches]
        pooled = self.pooling(features).expand(-1, -1, *features.shape[-2:])
        return self.project(torch.cat([*outputs, pooled], dim=1))


class DeepLabV3(nn.Module):
    """ResNet at output stride 8 (last two stages dilated), ASPP, a 3x3 conv, cosine classifier."""

    def __init__(
        self, backbone: ResNetModel, *, num_classes: int, channels: int, rates: tuple[int, ...]
    ) -> None:
        super().__init__()
        _dilate_last_stages(backbone)
        self.backbone = backbone
        hidden_sizes = backbone.config.hidden_sizes
        if not hidden_sizes:
            raise ValueError("the ResNet config has no hidden_sizes")
        in_channels = int(hidden_sizes[-1])
        self.aspp = ASPP(in_channels, channels, rates)
        self.head = nn.Sequential(
            nn.Conv2d(channels, channels, 3, padding=1, bias=False),
            nn.BatchNorm2d(channels),
            nn.ReLU(),
        )
        self.classifier = CosineClassifier(channels, num_classes)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        features = self.backbone(pixel_values=pixel_values).last_hidden_state
        return self.classifier(self.head(self.aspp(features)))


class SegFormer(nn.Module):
    """`SegformerForSemanticSegmentation` returning its (1/4-resolution) logits tensor."""

    def __init__(self, model: SegformerForSemanticSegmentation) -> None:
        super().__init__()
        self.model = model

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        logits: torch.Tensor = self.model(pixel_values=pixel_values).logits
        return logits


class SegmentationModel(nn.Module):
    """A segmenter taking normalized (B, 3, H, W) pixels to (B, num_classes, H, W) logits.

    Channel 0 is background and channel k is class k (labels are 1-based), so `num_classes`
    counts the background. `mean` and `std` are the per-channel normalization of the input.
    """

    def __init__(
        self,
        network: nn.Module,
        *,
        architecture: str,
        num_classes: int,
        backbone_id: str,
        backbone_config: dict[str, Any],
        head_config: dict[str, Any],
    ) -> None:
        super().__init__()
        self.network = network
        self.architecture = architecture
        self.num_classes = num_classes
        self.backbone_id = backbone_id
        self.backbone_config = backbone_config
        self.head_config = head_config
        self.mean: tuple[float, float, float] = IMAGENET_MEAN
        self.std: tuple[float, float, float] = IMAGENET_STD

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        logits: torch.Tensor = self.network(pixel_values)
        return F.interpolate(
            logits, size=pixel_values.shape[-2:], mode="bilinear", align_corners=False
        )


def build_segmenter(
    architecture: str, *, num_classes: int, spec: str = TINY, cache_dir: Path
) -> SegmentationModel:
    """Build a segmenter with `num_classes` outputs (background included) on a pretrained backbone.

    `spec` is "tiny" (a random-weight model built into `cache_dir` on first use), a local folder
    or a hub id: a ResNet such as "microsoft/resnet-50" for "deeplabv3", a SegFormer/MiT such as
    "nvidia/mit-b0" for "segformer". The head is freshly initialized from torch's global RNG.
    """
    _check_architecture(architecture)
    if num_classes < 2:
        raise ValueError(f"num_classes counts the background and must be >= 2, got {num_classes}")
    tiny = spec == TINY
    if architecture == "deeplabv3":
        source = str(cached_build(cache_dir, TINY_RESNET_NAME, save_tiny_resnet)) if tiny else spec
        backbone = ResNetModel.from_pretrained(source)
        head_config = {
            "channels": _TINY_ASPP_CHANNELS if tiny else _ASPP_CHANNELS,
            "rates": list(_TINY_ASPP_RATES if tiny else _ASPP_RATES),
        }
        return _deeplabv3(backbone, num_classes=num_classes, spec=spec, head_config=head_config)
    source = (
        str(cached_build(cache_dir, TINY_SEGFORMER_NAME, save_tiny_segformer)) if tiny else spec
    )
    segformer = SegformerForSemanticSegmentation.from_pretrained(
        source, num_labels=num_classes, ignore_mismatched_sizes=True
    )
    return _segformer(segformer, spec=spec)


def save_segmenter(model: SegmentationModel, *, class_names: list[str], resolution: int) -> bytes:
    """A zip of `model.safetensors` and `config.json`, enough to rebuild the model offline.

    The config holds the architecture, class names (foreground, in label order), training
    resolution, backbone spec and full backbone config, head config, mean/std and the package
    version.
    """
    if len(class_names) + 1 != model.num_classes:
        raise ValueError(
            f"{len(class_names)} class names for a model with {model.num_classes} outputs "
            "(background + one per class expected)"
        )
    config = {
        "architecture": model.architecture,
        "num_classes": model.num_classes,
        "class_names": list(class_names),
        "resolution": resolution,
        "backbone": model.backbone_id,
        "backbone_config": model.backbone_config,
        "head_config": model.head_config,
        "mean": list(model.mean),
        "std": list(model.std),
        "aligndiff_version": aligndiff.__version__,
    }
    state = {
        name: tensor.detach().cpu().contiguous() for name, tensor in model.state_dict().items()
    }
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        archive.writestr(_WEIGHTS_FILE, save_safetensors(state))
        archive.writestr(_CONFIG_FILE, json.dumps(config, indent=2))
    return buffer.getvalue()


def load_segmenter(data: bytes) -> tuple[SegmentationModel, dict[str, Any]]:
    """Rebuild a model written by `save_segmenter` (no hub access) and load its weights strictly.

    Returns the model in eval mode and the stored config.
    """
    with zipfile.ZipFile(io.BytesIO(data)) as archive:
        config: dict[str, Any] = json.loads(archive.read(_CONFIG_FILE))
        state = load_safetensors(archive.read(_WEIGHTS_FILE))
    architecture = config["architecture"]
    _check_architecture(architecture)
    model: SegmentationModel
    if architecture == "deeplabv3":
        backbone = ResNetModel(ResNetConfig.from_dict(config["backbone_config"]))
        model = _deeplabv3(
            backbone,
            num_classes=int(config["num_classes"]),
            spec=config["backbone"],
            head_config=config["head_config"],
        )
    else:
        segformer_config = SegformerConfig.from_dict(config["backbone_config"])
        model = _segformer(
            SegformerForSemanticSegmentation(segformer_config), spec=config["backbone"]
        )
    model.load_state_dict(state, strict=True)
    model.mean = _triple(config["mean"])
    model.std = _triple(config["std"])
    return model.eval(), config


def _deeplabv3(
    backbone: ResNetModel, *, num_classes: int, spec: str, head_config: dict[str, Any]
) -> SegmentationModel:
    network = DeepLabV3(
        backbone,
        num_classes=num_classes,
        channels=int(head_config["channels"]),
        rates=tuple(int(rate) for rate in head_config["rates"]),
    )
    return SegmentationModel(
        network,
        architecture="deeplabv3",
        num_classes=num_classes,
        backbone_id=spec,
        backbone_config=backbone.config.to_dict(),
        head_config=dict(head_config),
    )


def _segformer(model: SegformerForSemanticSegmentation, *, spec: str) -> SegmentationModel:
    num_labels = model.config.num_labels
    if num_labels is None:
        raise ValueError("the SegFormer config has no num_labels")
    return SegmentationModel(
        SegFormer(model),
        architecture="segformer",
        num_classes=int(num_labels),
        backbone_id=spec,
        backbone_config=model.config.to_dict(),
        head_config={},
    )


def _dilate_last_stages(backbone: ResNetModel) -> None:
    """Output stride 8 as in DeepLabV3: the last two stages' strides become dilations 2 and 4.

    Only strides, dilations and paddings change, so pretrained weights still apply.
    """
    for stage, dilation in zip(backbone.encoder.stages[-2:], (2, 4), strict=True):
        for module in stage.modules():
            if not isinstance(module, nn.Conv2d):
                continue
            module.stride = (1, 1)
            if module.kernel_size == (3, 3):
                module.dilation = (dilation, dilation)
                module.padding = (dilation, dilation)


def _check_architecture(architecture: str) -> None:
    if architecture not in ARCHITECTURES:
        raise ValueError(f"unknown architecture {architecture!r}; expected one of {ARCHITECTURES}")


def _triple(values: list[float]) -> tuple[float, float, float]:
    red, green, blue = (float(v) for v in values)
    return (red, green, blue)
