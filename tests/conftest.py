"""Paths and fixtures shared by the test files."""

from __future__ import annotations

from pathlib import Path

import pytest

from aligndiff.models.diffusion import DiffusionModel, load_diffusion_model
from aligndiff.settings import Settings
from aligndiff.synth import Models, load_models

# The repository is checked out with the project's `shared/` folder beside it.
SHOTS_DIR = Path(__file__).resolve().parents[2] / "shared" / "fixtures" / "shots"


def _shots_fixture(name: str) -> Path:
    folder = SHOTS_DIR / name
    if not folder.is_dir():
        pytest.fail(f"shots fixture folder is missing: {folder}")
    return folder


@pytest.fixture
def dog_shots_dir() -> Path:
    """A flat shots folder: one JPEG photo of a dog and its binary PNG mask."""
    return _shots_fixture("dog")


@pytest.fixture
def albatross_shots_dir() -> Path:
    """A flat shots folder: one JPEG photo of an albatross and its anti-aliased RGBA PNG mask."""
    return _shots_fixture("albatross")


@pytest.fixture(scope="session")
def model_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One model cache per test session (tiny models are built into it once)."""
    return tmp_path_factory.mktemp("model-cache")


@pytest.fixture(scope="session")
def tiny_sd(model_cache: Path) -> DiffusionModel:
    """The tiny random Stable Diffusion, loaded through the real loading path."""
    return load_diffusion_model("tiny", cache_dir=model_cache)


@pytest.fixture(scope="session")
def tiny_models(model_cache: Path) -> Models:
    """Every model the pipeline runs (tiny SD, CLIP and DINOv2)."""
    return load_models(Settings(model_cache_dir=model_cache))
