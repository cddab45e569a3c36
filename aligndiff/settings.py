"""The one settings object: everything configurable comes from `ALIGNDIFF_*` variables."""

from __future__ import annotations

from pathlib import Path

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
    dtype: str = "float32"

    @property
    def uses_tiny_models(self) -> bool:
        return self.diffusion_model == TINY
