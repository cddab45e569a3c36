"""Fixtures and factories of the dataset export tests: a finished class made from real shots,
with random samples whose stored images and masks the archives are checked against.

Test modules load them with `pytest_plugins = ["tests.api_support", "tests.dataset_support"]`.
"""

from __future__ import annotations

import io
import tarfile
import uuid
import zipfile
from dataclasses import dataclass
from io import BytesIO
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest
from PIL import Image
from sqlalchemy import select

from aligndiff.masks import binarize_mask
from service.models import SegClass, Shot, utcnow
from tests.api_support import Api, add_sample, class_form, set_job, shot_files

Mask = npt.NDArray[np.bool_]
Pixels = npt.NDArray[np.uint8]

CLASS_SEED = 7
PROMPTS = ["a photo of a dog on grass"]
MODEL_IDS = {"diffusion": "tiny", "clip": "tiny-clip", "dino": "tiny-dino"}


@dataclass(frozen=True)
class Stored:
    """An exported item as the service stores it: its image PNG and its mask."""

    name: str
    image_png: bytes
    mask: Mask
    accepted: bool | None = None

    @property
    def pixels(self) -> Pixels:
        return np.asarray(Image.open(BytesIO(self.image_png)).convert("RGB"))


@dataclass(frozen=True)
class DatasetClass:
    id: uuid.UUID
    job_id: uuid.UUID
    shots: list[Stored]
    samples: list[Stored]

    def exported(self, *, accepted_only: bool = True) -> list[Stored]:
        """What an archive holds, in order: the shots, then the (accepted) samples."""
        samples = [s for s in self.samples if s.accepted or not accepted_only]
        return self.shots + samples

    @property
    def url(self) -> str:
        return f"/v1/classes/{self.id}/dataset"


def random_sample(rng: np.random.Generator, size: int = 32) -> tuple[Image.Image, Image.Image]:
    """A random smooth RGB image (4×4 random colours, upscaled: JPEG keeps it close) and a
    random disk mask (0/255) with foreground and background."""
    colours = rng.integers(0, 256, (4, 4, 3), dtype=np.uint8)
    image = Image.fromarray(colours).resize((size, size), Image.Resampling.BILINEAR)
    y, x = np.mgrid[:size, :size]
    cy, cx = rng.integers(size // 4, 3 * size // 4, 2)
    radius = rng.integers(3, size // 3)
    disk = (y - cy) ** 2 + (x - cx) ** 2 <= radius**2
    return image, Image.fromarray(disk.astype(np.uint8) * 255)


def create_finished_class(
    api: Api, *, num_samples: int = 6, rejected_every: int = 3, seed: int = 0
) -> DatasetClass:
    """Alice's class made from the real dog and albatross shots, its synthesis succeeded:
    `num_samples` finalized samples (every `rejected_every`-th one, counting from index 2,
    not accepted) and one more still being worked on."""
    form = class_form(seed=str(CLASS_SEED), prompts=PROMPTS)
    response = api.alice.post("/v1/classes", files=shot_files("dog", "albatross"), data=form)
    assert response.status_code == 202, response.text
    class_id, job_id = uuid.UUID(response.json()["id"]), uuid.UUID(response.json()["job_id"])
    with api.session() as session:
        seg_class = session.get(SegClass, class_id)
        assert seg_class is not None
        seg_class.token = "<dog>"
        seg_class.model_ids = MODEL_IDS
        session.commit()
    rng = np.random.default_rng(seed)
    samples = []
    for index in range(num_samples):
        image, mask = random_sample(rng)
        accepted = index % rejected_every != rejected_every - 1
        add_sample(api, class_id, index, accepted=accepted, image=image, mask=mask)
        png = BytesIO()
        image.save(png, "PNG")
        samples.append(Stored(f"sample_{index:05d}", png.getvalue(), binarize_mask(mask), accepted))
    add_sample(api, class_id, num_samples, finalized=False)
    set_job(api, job_id, status="succeeded", progress=1.0, finished_at=utcnow())
    return DatasetClass(class_id, job_id, stored_shots(api, class_id), samples)


def stored_shots(api: Api, class_id: uuid.UUID) -> list[Stored]:
    with api.session() as session:
        shots = session.execute(
            select(Shot).where(Shot.class_id == class_id).order_by(Shot.position)
        ).scalars()
        keys = [(s.position, s.image_key, s.mask_key) for s in shots]
    return [
        Stored(
            f"shot_{position:02d}",
            api.storage.get(image_key),
            binarize_mask(Image.open(BytesIO(api.storage.get(mask_key)))),
        )
        for position, image_key, mask_key in keys
    ]


@pytest.fixture
def dataset_class(api: Api) -> DatasetClass:
    return create_finished_class(api)


def download(api: Api, dataset: DatasetClass, export_format: str, **params: Any) -> bytes:
    response = api.alice.get(dataset.url, params={"format": export_format, **params})
    assert response.status_code == 200, response.text
    return response.content


def extract(archive: bytes, folder: Path) -> Path:
    """Unpack a zip or tar download into `folder`."""
    if archive.startswith(b"PK"):
        with zipfile.ZipFile(io.BytesIO(archive)) as opened:
            opened.extractall(folder)
    else:
        with tarfile.open(fileobj=io.BytesIO(archive)) as opened:
            opened.extractall(folder, filter="data")
    return folder


def labels_of(png: bytes) -> Pixels:
    """A label PNG's indices."""
    return np.asarray(Image.open(BytesIO(png)))
