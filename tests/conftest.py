"""Paths and fixtures shared by the test files."""

from __future__ import annotations

from pathlib import Path

import pytest

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
