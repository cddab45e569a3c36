"""The one settings object: everything configurable comes from `ALIGNDIFF_*` variables."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

TINY = "tiny"


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
    capture_attention: Literal["explicit", "sdpa"] = "explicit"
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

    @property
    def uses_tiny_models(self) -> bool:
        return self.diffusion_model == TINY
