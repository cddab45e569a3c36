"""CLIP for scoring: real weights by local path or hub id, or a tiny random CLIP.

Both go through one loading path (`from_pretrained` on a `save_pretrained`-layout folder or hub
id): `tiny` is built once from config, saved in that layout under the model cache, then loaded
like any other checkpoint.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import CLIPConfig, CLIPImageProcessorPil, CLIPModel, CLIPTokenizer

from aligndiff.models.cache import cached_build
from aligndiff.models.tokenizer import (
    BOS,
    CONTEXT_LENGTH,
    EOS,
    tiny_vocab_and_merges,
    write_tiny_tokenizer,
)
from aligndiff.settings import TINY

TINY_CACHE_NAME = "tiny-clip-v1"
TINY_SEED = 0
TINY_IMAGE_SIZE = 64


@dataclass
class ClipBundle:
    """A frozen CLIP model with its tokenizer and image processor, on one device and dtype."""

    model: CLIPModel
    tokenizer: CLIPTokenizer
    image_processor: CLIPImageProcessorPil
    model_id: str

    @property
    def device(self) -> torch.device:
        return self.model.device

    @property
    def dtype(self) -> torch.dtype:
        return self.model.dtype


def tiny_clip_config() -> CLIPConfig:
    """A small CLIP with the real architecture, sized for the tiny tokenizer and 64 px images."""
    vocab, _ = tiny_vocab_and_merges()
    text_config = {
        "vocab_size": len(vocab),
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "max_position_embeddings": CONTEXT_LENGTH,
        "bos_token_id": vocab[BOS],
        "eos_token_id": vocab[EOS],
        # CLIP pads with its end-of-text token (the tokenizer's pad token).
        "pad_token_id": vocab[EOS],
    }
    vision_config = {
        "image_size": TINY_IMAGE_SIZE,
        "patch_size": 8,
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
    }
    return CLIPConfig(text_config=text_config, vision_config=vision_config, projection_dim=32)


def tiny_image_processor() -> CLIPImageProcessorPil:
    """CLIP preprocessing at the tiny size: shortest side resized, centre crop, CLIP mean/std."""
    return CLIPImageProcessorPil(
        size={"shortest_edge": TINY_IMAGE_SIZE},
        crop_size={"height": TINY_IMAGE_SIZE, "width": TINY_IMAGE_SIZE},
    )


def build_tiny_clip() -> CLIPModel:
    """The tiny CLIP with deterministic random weights (the global RNG is left untouched)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(TINY_SEED)
        return CLIPModel(tiny_clip_config())


def save_tiny_clip(directory: Path) -> None:
    """Write the tiny CLIP, its tokenizer and image processor in the `save_pretrained` layout.

    `CLIPModel.from_pretrained(directory)` and `CLIPProcessor.from_pretrained(directory)` load it.
    """
    build_tiny_clip().save_pretrained(str(directory))
    write_tiny_tokenizer(directory)
    tiny_image_processor().save_pretrained(str(directory))


def load_clip(
    spec: str,
    *,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    cache_dir: Path,
) -> ClipBundle:
    """Load a CLIP checkpoint (`tiny`, a local folder or a hub id).

    The model is frozen (eval mode, no gradients) and placed on `device` in `dtype`; `tiny` is
    built into `cache_dir` on first use.
    """
    source = str(cached_build(cache_dir, TINY_CACHE_NAME, save_tiny_clip)) if spec == TINY else spec
    model = CLIPModel.from_pretrained(source, dtype=dtype)
    model.requires_grad_(False)
    model.eval()
    # transformers declares `to` with `@wraps(nn.Module.to)`, which mypy reads as unbound.
    model.to(torch.device(device))  # type: ignore[arg-type]
    # NOTE: the PIL processor, not the torchvision one `CLIPImageProcessor` names when
    # torchvision is installed: preprocessing then does not depend on what a machine has.
    image_processor = CLIPImageProcessorPil.from_pretrained(source)
    return ClipBundle(
        model=model,
        tokenizer=CLIPTokenizer.from_pretrained(source),
        image_processor=image_processor,
        model_id=spec,
    )
