"""Which pipeline family a diffusion model belongs to, read from its `model_index.json`.

Torch-free: the API and the service layer ask it without loading any weights.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

ModelFamily = Literal["sd", "sdxl"]

# diffusers' pipeline class names (`model_index.json`'s `_class_name`) → family.
PIPELINE_FAMILIES: dict[str, ModelFamily] = {
    "StableDiffusionPipeline": "sd",
    "StableDiffusionXLPipeline": "sdxl",
}

# The tiny random models built from config in code (`aligndiff.models.diffusion`).
TINY_FAMILIES: dict[str, ModelFamily] = {"tiny": "sd", "tiny-sd2": "sd", "tiny-sdxl": "sdxl"}


class UnsupportedModelError(ValueError):
    """The model is of a pipeline family AlignDiff does not run."""


def family_of_class(class_name: str, *, source: str = "") -> ModelFamily:
    """The family of a diffusers pipeline class name; raises UnsupportedModelError otherwise."""
    if class_name not in PIPELINE_FAMILIES:
        where = f"{source}: " if source else ""
        raise UnsupportedModelError(
            f"{where}unsupported model family {class_name!r}; "
            f"supported: {', '.join(sorted(PIPELINE_FAMILIES))}"
        )
    return PIPELINE_FAMILIES[class_name]


def model_family(spec: str) -> ModelFamily:
    """The family, "sd" (Stable Diffusion 1.x/2.x) or "sdxl", of a model spec: a tiny model's
    name, a local diffusers folder or a hub id (its `model_index.json` fetched, or read from the
    local hub cache). Raises UnsupportedModelError for any other pipeline class, OSError when
    the index cannot be read."""
    if spec in TINY_FAMILIES:
        return TINY_FAMILIES[spec]
    folder = Path(spec)
    if folder.is_dir():
        index_path = folder / "model_index.json"
        if not index_path.is_file():
            raise OSError(f"{spec} has no model_index.json: not a diffusers model folder")
    elif spec.startswith(("/", ".", "~")) or spec.count("/") > 1:
        # A path, which no hub id looks like ("org/name"): say so rather than the hub's error.
        raise OSError(f"{spec}: no such folder")
    else:
        from huggingface_hub import hf_hub_download

        try:
            index_path = Path(hf_hub_download(spec, "model_index.json"))
        except Exception as error:  # not a hub id, offline, missing: all "cannot read"
            raise OSError(
                f"{spec} is neither a model folder here nor a model the hub (or its local "
                f"cache) has: {error}"
            ) from error
    index = json.loads(index_path.read_text(encoding="utf-8"))
    return family_of_class(str(index.get("_class_name", "")), source=spec)


# The resolution the tiny random models are built for.
TINY_RESOLUTION = 128


def default_resolution(spec: str) -> int:
    """The side, in pixels, the model's UNet was trained at: 128 for the tiny models, else the
    UNet's `sample_size` times the VAE's downscale factor, 2^(len(block_out_channels) - 1)
    (512 for SD 1.5, 768 for SD 2-768, 1024 for SDXL). Raises OSError when a config cannot be
    read."""
    if spec in TINY_FAMILIES:
        return TINY_RESOLUTION
    unet = _read_config(spec, "unet/config.json")
    vae = _read_config(spec, "vae/config.json")
    blocks = vae.get("block_out_channels") or [0, 0, 0, 0]
    return int(unet["sample_size"]) * 2 ** (len(blocks) - 1)


def _read_config(spec: str, filename: str) -> dict[str, Any]:
    folder = Path(spec)
    if folder.is_dir():
        path = folder / filename
    else:
        from huggingface_hub import hf_hub_download

        path = Path(hf_hub_download(spec, filename))
    loaded = json.loads(path.read_text(encoding="utf-8"))
    if not isinstance(loaded, dict):
        raise OSError(f"{spec}: {filename} is not a JSON object")
    return loaded
