"""The one settings object: everything configurable comes from `ALIGNDIFF_*` variables."""

from __future__ import annotations

from pathlib import Path
from typing import Final, Literal

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

TINY = "tiny"
AUTO: Final = "auto"
# The inversion's background weight λ_bg: any value in this range, or "auto".
BG_LAMBDA_MIN, BG_LAMBDA_MAX = 0.0, 2.0


def parse_bg_lambda(text: str) -> float | Literal["auto"]:
    """A `bg_lambda` as users write it: "auto" or a number in [0, 2]; ValueError otherwise."""
    if text.strip().lower() == AUTO:
        return AUTO
    try:
        value = float(text)
    except ValueError:
        raise ValueError(f"bg_lambda must be a number in [0, 2] or 'auto', got {text!r}") from None
    if not BG_LAMBDA_MIN <= value <= BG_LAMBDA_MAX:
        raise ValueError(f"bg_lambda must be in [0, 2], got {value:g}")
    return value


def _default_cache_dir() -> Path:
    return Path.home() / ".cache" / "aligndiff"


class Settings(BaseSettings):
    """Process-wide configuration, read from the environment (prefix `ALIGNDIFF_`)."""

    model_config = SettingsConfigDict(env_prefix="ALIGNDIFF_", extra="ignore")

    # Models: "tiny" (random weights built from config, cached on disk), a local path or a hub id.
    diffusion_model: str = TINY
    clip_model: str = TINY
    fss_backbone: str = TINY
    model_cache_dir: Path = Field(default_factory=_default_cache_dir)
    device: str = "cpu"
    dtype: str = "float32"  # UNet, VAE and text encoder; also "float16" or "bfloat16"

    # The GPU fast path (aligndiff.acceleration). Every switch is off by default, so a CPU run is
    # the plain eager float32 pipeline and its samples keep their bits.
    channels_last: bool = False
    # "explicit": captured cross-attention layers compute their probabilities (the reference);
    # "sdpa": fused attention everywhere, the capture read from an extra value channel.
    capture_attention: Literal["explicit", "sdpa"] = "sdpa"
    compile_unet: bool = False
    # UNet batch sizes compiled once each; a batch is padded up to the nearest (JSON list).
    compile_buckets: tuple[int, ...] = (1, 2, 4, 8, 16, 32)
    vae_slicing: bool = False
    vae_tiling: bool = False
    # Sampling batch size: unset keeps the model's default; "auto" fits free device memory
    # (CUDA; elsewhere the default).
    batch_size: int | Literal["auto"] | None = Field(default=None)
    # Share of free device memory "auto" may plan to fill.
    memory_fraction: float = Field(default=0.85, gt=0, le=1)

    # Acceptance (aligndiff.acceptance): the semantic check of every sample against its class's
    # shots. Unset: on for real models, off for `tiny` (random features say nothing about a
    # class; the signals are still computed and stored) unless a threshold is fixed here.
    # Thresholds are calibrated per class from its shots unless fixed here.
    accept_semantic_check: bool | None = None
    accept_distance_factor: float = Field(default=1.5, ge=1)
    accept_min_prototype_similarity: float | None = Field(default=None, ge=-1, le=1)
    accept_min_shot_similarity: float | None = Field(default=None, ge=-1, le=1)

    # Instances (aligndiff.instances): a final mask's connected objects (8-connected) of at
    # least this many pixels; smaller specks are no object of their own. Counted on every
    # sample and written one per annotation (COCO) or label line (YOLO) in datasets.
    instance_min_area: int = Field(default=16, ge=1)

    # The inversion's background weight λ_bg for classes that do not choose one, and what
    # `bg_lambda=auto` tries (aligndiff.tuning): the grid, the share of the inversion's steps
    # each trial runs, and the trial samples drawn per value.
    bg_lambda: float = Field(default=0.6, ge=0, le=2)
    bg_lambda_grid: tuple[float, ...] = (0.2, 0.6, 1.0)
    bg_lambda_trial_fraction: float = Field(default=0.1, gt=0, le=0.3)
    bg_lambda_trial_samples: int = Field(default=2, ge=1, le=16)

    @property
    def uses_tiny_models(self) -> bool:
        return self.diffusion_model == TINY
