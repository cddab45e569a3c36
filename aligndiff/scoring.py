"""Scoring: each sample's CLIP score against its class name and its similarity to the real shots.

`clip_score` is torchmetrics' CLIPScore for one image and the text "a photo of a {name}", as the
public contract defines it (always "a", whatever article the class's sampling prompts use, so
scores compare across classes and across versions):
max(100 · cos(image embedding, text embedding), 0), with the same preprocessing (the checkpoint's
image processor and tokenizer, projected `get_image_features` / `get_text_features` outputs).
`shot_similarity` is the cosine between a sample's image embedding and the mean of the real
shots' unit-length image embeddings (so every shot weighs the same), in [-1, 1].

What a class is scored against (`ScoreReference`) is computed once and reused for every chunk
of samples, on any worker.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from aligndiff.fss import RGBImage
from aligndiff.models.clip import ClipBundle
from aligndiff.names import PromptStyle, text_prompt

ImageInput = RGBImage | Image.Image
# The contract's CLIP-score text says "a photo of a {name}" for every name.
CLIP_SCORE_STYLE: PromptStyle = "always-a"


@dataclass(frozen=True)
class SampleScore:
    clip_score: float  # in [0, 100]
    shot_similarity: float  # in [-1, 1]


@dataclass(frozen=True)
class ScoreReference:
    """What the samples of one class are scored against (unit-length float32 vectors on CPU)."""

    text_embedding: torch.Tensor  # (D,) of "a photo of a {name}"
    shot_centroid: torch.Tensor  # (D,) direction of the mean shot embedding


class ClipScorer:
    """Scores images with one CLIP checkpoint, `batch_size` images per forward pass."""

    def __init__(self, bundle: ClipBundle, *, batch_size: int = 32) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        self.bundle = bundle
        self.batch_size = batch_size

    def embed_images(self, images: Sequence[ImageInput]) -> torch.Tensor:
        """Unit-length CLIP image embeddings, (N, D) float32 on CPU, in the order given."""
        arrays = [_as_rgb_array(image) for image in images]
        model = self.bundle.model
        parts = [torch.zeros(0, model.visual_projection.out_features)]
        with torch.inference_mode():
            for start in range(0, len(arrays), self.batch_size):
                pixels = self.bundle.image_processor(
                    images=arrays[start : start + self.batch_size],
                    return_tensors="pt",
                    input_data_format="channels_last",
                )["pixel_values"]
                outputs = model.get_image_features(
                    pixel_values=pixels.to(device=self.bundle.device, dtype=self.bundle.dtype)
                )
                parts.append(_unit(outputs.pooler_output))
        return torch.cat(parts)

    def embed_text(self, text: str) -> torch.Tensor:
        """The unit-length CLIP embedding of one text, (D,) float32 on CPU."""
        model = self.bundle.model
        # NOTE: truncated to the model's context like torchmetrics, but keeping the end-of-text
        # token (torchmetrics slices it off, which moves CLIP's pooling to the first token).
        tokens = self.bundle.tokenizer(
            [text],
            truncation=True,
            max_length=model.text_model.config.max_position_embeddings,
            return_tensors="pt",
        )
        with torch.inference_mode():
            outputs = model.get_text_features(
                input_ids=tokens["input_ids"].to(self.bundle.device),
                attention_mask=tokens["attention_mask"].to(self.bundle.device),
            )
            return _unit(outputs.pooler_output)[0]

    def shot_centroid(self, shot_images: Sequence[ImageInput]) -> torch.Tensor:
        """The direction of the mean of the shots' unit-length embeddings, (D,) float32 on CPU."""
        if not shot_images:
            raise ValueError("at least one shot image is needed")
        return _unit(self.embed_images(shot_images).mean(dim=0))

    def reference(self, *, class_name: str, shot_images: Sequence[ImageInput]) -> ScoreReference:
        """Everything a class's samples are scored against; compute once per class."""
        return ScoreReference(
            text_embedding=self.embed_text(text_prompt(class_name, CLIP_SCORE_STYLE)),
            shot_centroid=self.shot_centroid(shot_images),
        )

    def score(self, images: Sequence[ImageInput], reference: ScoreReference) -> list[SampleScore]:
        """The CLIP score and shot similarity of each image, in the order given."""
        embeddings = self.embed_images(images)
        clip_scores = (100.0 * embeddings @ reference.text_embedding).clamp(min=0.0)
        similarities = embeddings @ reference.shot_centroid
        return [
            SampleScore(clip_score=float(c), shot_similarity=float(s))
            for c, s in zip(clip_scores.tolist(), similarities.tolist(), strict=True)
        ]


def mean_clip_score(clip_scores: Iterable[float]) -> float | None:
    """The class's mean CLIP score, or None when it has no samples."""
    values = list(clip_scores)
    return math.fsum(values) / len(values) if values else None


def _unit(embeddings: torch.Tensor) -> torch.Tensor:
    return F.normalize(embeddings.float().cpu(), dim=-1)


def _as_rgb_array(image: ImageInput) -> RGBImage:
    if isinstance(image, Image.Image):
        return np.asarray(image.convert("RGB"))
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(
            f"expected a uint8 (H, W, 3) RGB array, got {image.dtype} of shape {image.shape}"
        )
    return image
