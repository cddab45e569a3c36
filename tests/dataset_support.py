"""Fixtures and factories of the dataset export tests: a finished class made from real shots,
with random samples whose stored images and masks the archives are checked against.

Test modules load them with `pytest_plugins = ["tests.api_support", "tests.dataset_support"]`.
"""

from __future__ import annotations

import io
import json
import socket
import tarfile
import threading
import time
import tracemalloc
import uuid
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from io import BytesIO
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest
import uvicorn
import yaml
from fastapi.testclient import TestClient
from PIL import Image
from sqlalchemy import insert, select

from aligndiff.instances import count_instances
from aligndiff.masks import binarize_mask
from service.auth import authenticate
from service.contexts import datasets
from service.models import Sample, SegClass, Shot, utcnow
from service.storage import BlobNotFound, LocalStorage, sample_key
from tests.api_support import (
    Api,
    Files,
    add_class,
    add_sample,
    class_form,
    encode,
    pair,
    photo,
    set_job,
    shot_files,
)

Mask = npt.NDArray[np.bool_]
Pixels = npt.NDArray[np.uint8]

CLASS_SEED = 7
PROMPTS = ["a photo of a dog on grass"]
MODEL_IDS = {"diffusion": "tiny", "clip": "tiny-clip", "dino": "tiny-dino"}
# The deployment's default ALIGNDIFF_INSTANCE_MIN_AREA.
MIN_AREA = 16
WEBDATASET_METADATA = "__meta__/metadata.json"


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
    name: str = "dog"

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
    api: Api,
    *,
    num_samples: int = 6,
    rejected_every: int = 3,
    seed: int = 0,
    name: str = "dog",
    owner: str = "alice",
    shots: Files | None = None,
    masks: list[Mask] | None = None,
) -> DatasetClass:
    """A class of `owner`'s made from `shots` (default: the real dog and albatross shots), its
    synthesis succeeded: `num_samples` finalized samples (every `rejected_every`-th one,
    counting from index 2, not accepted; their masks `masks` if given, else random disks; their
    instances counted and their verdict the filter's) and one more still being worked on."""
    prompts = PROMPTS if name == "dog" else [f"a photo of a {name}"]
    form = class_form(name=name, seed=str(CLASS_SEED), prompts=prompts)
    files = shots if shots is not None else shot_files("dog", "albatross")
    client: TestClient = getattr(api, owner)
    response = client.post("/v1/classes", files=files, data=form)
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
    for index in range(num_samples if masks is None else len(masks)):
        image, mask = random_sample(rng)
        if masks is not None:
            mask = Image.fromarray(masks[index].astype(np.uint8) * 255)
            image = image.resize(mask.size)
        accepted = index % rejected_every != rejected_every - 1
        sample_id = add_sample(api, class_id, index, accepted=accepted, image=image, mask=mask)
        binary = binarize_mask(mask)
        with api.session() as session:
            row = session.get(Sample, sample_id)
            assert row is not None
            row.instances = count_instances(binary, min_area=MIN_AREA)
            row.accepted_by = "filter"
            session.commit()
        png = BytesIO()
        image.save(png, "PNG")
        samples.append(Stored(f"sample_{index:05d}", png.getvalue(), binary, accepted))
    add_sample(api, class_id, len(samples), finalized=False)
    set_job(api, job_id, status="succeeded", progress=1.0, finished_at=utcnow())
    return DatasetClass(class_id, job_id, stored_shots(api, class_id), samples, name)


# --- masks of several objects -------------------------------------------------------------

OBJECTS_SIZE = 64


def disk(cy: int, cx: int, radius: float, size: int = OBJECTS_SIZE) -> Mask:
    y, x = np.mgrid[:size, :size]
    return np.asarray((y - cy) ** 2 + (x - cx) ** 2 <= radius**2)


def two_objects() -> Mask:
    """Two disks apart: two instances."""
    return disk(20, 16, 9) | disk(40, 46, 11)


def ring() -> Mask:
    """A disk with a hole in it: one instance, whose outline must keep the hole open."""
    return disk(32, 32, 22) & ~disk(30, 34, 8)


def with_speck() -> Mask:
    """One disk, and a speck of 4 pixels: one instance (the speck is below the min area)."""
    mask = disk(30, 30, 12)
    mask[56:58, 5:7] = True
    return mask


def at_the_edge() -> Mask:
    """A disk cut off by the image's edges: one instance touching them."""
    return disk(60, 62, 14)


def objects_shot(mask: Mask | None = None) -> Files:
    """One shot upload whose mask holds two separate objects (by default)."""
    size = (OBJECTS_SIZE, OBJECTS_SIZE)
    gray = Image.fromarray((two_objects() if mask is None else mask).astype(np.uint8) * 255)
    return pair(encode(photo(size), "PNG"), encode(gray), name="pair")


def create_objects_class(api: Api, **fields: Any) -> DatasetClass:
    """A finished class whose shot holds two objects and whose samples are a ring, two
    objects, one object with a speck, and one at the image's edge (all accepted)."""
    masks = [ring(), two_objects(), with_speck(), at_the_edge()]
    return create_finished_class(
        api, shots=objects_shot(), masks=masks, rejected_every=len(masks) + 1, **fields
    )


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


@pytest.fixture
def objects_class(api: Api) -> DatasetClass:
    return create_objects_class(api)


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


def metadata_of(folder: Path, export_format: str) -> Any:
    """An extracted archive's `metadata.json` (webdataset keeps it where WebDataset skips)."""
    name = WEBDATASET_METADATA if export_format == "webdataset" else "metadata.json"
    return json.loads((folder / name).read_text())


# --- large exports ------------------------------------------------------------------------


class MemoryStorage(LocalStorage):
    """Blobs in a dict (a local store's other operations are never called here)."""

    def __init__(self) -> None:
        self.blobs: dict[str, bytes] = {}

    def put(self, key: str, data: bytes, *, content_type: str) -> None:
        self.blobs[key] = data

    def get(self, key: str) -> bytes:
        try:
            return self.blobs[key]
        except KeyError:
            raise BlobNotFound(key) from None


def many_samples(api: Api, count: int, *, name: str = "dog") -> uuid.UUID:
    """A succeeded class of `count` finalized samples sharing one tiny image and mask."""
    class_id, _ = add_class(api, owner_id=api.alice_id, name=name, status="succeeded")
    image, mask = random_sample(np.random.default_rng(count))
    image_key, mask_key = sample_key(class_id, 0, "image.png"), sample_key(class_id, 0, "mask.png")
    api.storage.put(image_key, encode(image), content_type="image/png")
    api.storage.put(mask_key, encode(mask), content_type="image/png")
    rows = [
        {
            "class_id": class_id,
            "index": index,
            "prompt": "a photo of a dog",
            "prompt_kind": "text",
            "seed": index,
            "width": 32,
            "height": 32,
            "image_key": image_key,
            "coarse_mask_key": mask_key,
            "mask_key": mask_key,
            "mask_source": "consensus",
            "clip_score": 30.0,
            "accepted": True,
            "accepted_by": "filter",
            "instances": 1,
            "finalized_at": utcnow(),
        }
        for index in range(count)
    ]
    with api.session() as session:
        session.execute(insert(Sample), rows)
        session.commit()
    return class_id


def export_peak(api: Api, class_ids: list[uuid.UUID], export_format: Any, **options: Any) -> int:
    """The most memory Python held at once while the archive of `class_ids` was streamed (after
    a pass to warm up)."""
    with api.session() as session:
        principal = authenticate(session, f"Bearer {api.keys['alice']}")
        download_ = datasets.prepare_download(
            session=session,
            session_factory=api.app.state.session_factory,
            storage=api.storage,
            settings=api.settings,
            principal=principal,
            class_ids=class_ids,
            export_format=export_format,
            accepted_only=True,
            **options,
        )
        for _ in download_.stream():
            pass
        tracemalloc.start()
        try:
            size = sum(len(chunk) for chunk in download_.stream())
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
    assert size > 0
    return peak


# --- over a real connection ---------------------------------------------------------------


@contextmanager
def serving(api: Api) -> Iterator[str]:
    """The app behind uvicorn on a free loopback port, in a thread."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    server = uvicorn.Server(
        uvicorn.Config(api.app, host="127.0.0.1", port=port, log_level="warning")
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)


# --- YOLO, read as Ultralytics documents its segmentation format -------------------------

IMAGE_SUFFIXES = {".bmp", ".jpeg", ".jpg", ".png", ".tif", ".tiff", ".webp"}


# --- a reader, from Ultralytics' documentation of the format ------------------------------


@dataclass(frozen=True)
class Line:
    cls: int
    points: np.ndarray  # (n, 2), normalized x, y


@dataclass(frozen=True)
class YoloImage:
    split: str
    path: Path
    size: tuple[int, int]  # width, height
    lines: list[Line]


@dataclass(frozen=True)
class YoloDataset:
    config: dict[str, object]
    names: dict[int, str]
    images: dict[str, YoloImage]  # by file stem


def read_yolo(data_yaml: Path) -> YoloDataset:
    """A YOLO segmentation dataset as Ultralytics documents it, every rule checked: `train`
    and `val` image folders (relative to `path`, or to the YAML's folder without one), `names`
    from class 0 up, each image's labels in the matching `labels/` folder (the `images` path
    part replaced by `labels`, the suffix by `.txt`), one object a line: an integer class,
    then at least three x y points, every coordinate normalized to [0, 1]."""
    config = yaml.safe_load(data_yaml.read_text())
    assert {"train", "val", "names"} <= set(config), config
    root = data_yaml.parent / config.get("path", "")
    names = config["names"]
    assert isinstance(names, dict) and list(names) == list(range(len(names))), names
    assert config.get("nc", len(names)) == len(names)
    images: dict[str, YoloImage] = {}
    for split in ("train", "val"):
        folder = root / config[split]
        assert folder.is_dir(), f"{split}: {folder} is no folder"
        for image_path in sorted(folder.iterdir()):
            if image_path.suffix.lower() not in IMAGE_SUFFIXES:
                continue
            parts = list(image_path.relative_to(root).parts)
            label_path = root.joinpath(
                *["labels" if p == "images" else p for p in parts]
            ).with_suffix(".txt")
            lines = []
            for text in label_path.read_text().splitlines():
                fields = text.split()
                assert fields[0].isdigit(), text
                cls = int(fields[0])
                assert 0 <= cls < len(names), text
                coordinates = np.array([float(v) for v in fields[1:]])
                assert len(coordinates) % 2 == 0 and len(coordinates) >= 6, text
                assert coordinates.min() >= 0 and coordinates.max() <= 1, text
                lines.append(Line(cls, coordinates.reshape(-1, 2)))
            with Image.open(image_path) as image:
                size = image.size
            stem = image_path.stem
            if stem in images:
                # the same image in train and val, as when val falls back to train
                assert images[stem].path == image_path
                continue
            images[stem] = YoloImage(split, image_path, size, lines)
    return YoloDataset(config, names, images)
