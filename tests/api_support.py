"""Fixtures and factories of the API tests: an app on SQLite and on PostgreSQL (each API test
runs on both), keys of two owners and an admin, uploads, and rows inserted directly to stand
in for a worker's results.

Test modules load the fixtures with `pytest_plugins = ["tests.api_support"]`.
"""

from __future__ import annotations

import re
import shutil
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import timedelta
from io import BytesIO
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from PIL import Image
from sqlalchemy import Engine, func, select
from sqlalchemy.orm import Session

from service.app import create_app
from service.auth import authenticate, create_key
from service.db import make_engine
from service.models import Base, Job, Sample, SegClass, utcnow
from service.queue import RecordingQueue
from service.settings import Settings
from service.storage import LocalStorage, Storage, StorageUnavailable, class_key, sample_key
from tests.conftest import SHOTS_DIR

# Rows of these tables are the test's own setup (keys and their owners), never the API's work.
SETUP_TABLES = ("owners", "api_keys")

Files = list[tuple[str, tuple[str, bytes, str]]]


# --- the app -------------------------------------------------------------------------------


@dataclass
class Api:
    """An app and clients for it: anonymous, two owners (alice, bob) and an admin."""

    app: FastAPI
    queue: RecordingQueue
    anonymous: TestClient
    alice: TestClient
    bob: TestClient
    admin: TestClient
    alice_id: uuid.UUID
    bob_id: uuid.UUID
    keys: dict[str, str] = field(default_factory=dict)

    @property
    def storage(self) -> Storage:
        return self.app.state.storage  # type: ignore[no-any-return]

    @property
    def settings(self) -> Settings:
        return self.app.state.settings  # type: ignore[no-any-return]

    def session(self) -> Session:
        return self.app.state.session_factory()  # type: ignore[no-any-return]

    def work_rows(self) -> dict[str, int]:
        """Row counts of every table but the test's keys and owners."""
        with self.session() as session:
            return {
                table.name: session.execute(select(func.count()).select_from(table)).scalar_one()
                for table in Base.metadata.sorted_tables
                if table.name not in SETUP_TABLES
            }

    def blobs(self, prefix: str = "") -> list[str]:
        return list(self.storage.list_keys(prefix))

    def assert_nothing_stored(self) -> None:
        assert all(count == 0 for count in self.work_rows().values()), self.work_rows()
        assert self.blobs() == []
        assert self.queue.sent == []


@pytest.fixture(scope="session")
def postgres_engine(postgres_url: str) -> Iterator[Engine]:
    """The session's PostgreSQL database with the models' tables (migrations are tested
    elsewhere)."""
    engine = make_engine(postgres_url)
    Base.metadata.create_all(engine)
    yield engine
    engine.dispose()


@pytest.fixture(scope="session")
def sqlite_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A SQLite file with the models' tables, copied for each test (faster than creating)."""
    path = tmp_path_factory.mktemp("sqlite-template") / "api.db"
    engine = make_engine(f"sqlite:///{path}")
    Base.metadata.create_all(engine)
    with engine.connect() as connection:
        # One self-contained file to copy: no write-ahead log beside it.
        connection.exec_driver_sql("PRAGMA journal_mode=DELETE")
    engine.dispose()
    return path


def sqlite_database(folder: Path, template: Path) -> str:
    """A fresh SQLite database in `folder`, a copy of `template`: for a test module that
    overrides `database_url` because it needs no run on PostgreSQL."""
    path = folder / "api.db"
    shutil.copyfile(template, path)
    return f"sqlite:///{path}"


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """An empty database with the models' tables: a fresh SQLite file, or the session's
    PostgreSQL database, emptied after the test."""
    if request.param == "sqlite":
        yield sqlite_database(tmp_path, request.getfixturevalue("sqlite_template"))
        return
    engine: Engine = request.getfixturevalue("postgres_engine")
    # NOTE: emptied before as well as after: tests of workers and the live stack share the
    # session's database through `postgres_url` and leave their rows behind.
    _empty(engine)
    yield engine.url.render_as_string(hide_password=False)
    _empty(engine)


def _empty(engine: Engine) -> None:
    # NOTE: DELETE rather than TRUNCATE: on a handful of rows it is several times faster.
    with engine.begin() as connection:
        for table in reversed(Base.metadata.sorted_tables):
            connection.execute(table.delete())


ApiFactory = Callable[..., Api]


@pytest.fixture
def make_api(tmp_path: Path, database_url: str) -> Iterator[ApiFactory]:
    """Build an `Api`; keyword arguments override settings, `storage=` replaces the store."""
    engines: list[Engine] = []

    def build(*, storage: Storage | None = None, **overrides: Any) -> Api:
        settings = Settings(data_dir=tmp_path, database_url=database_url, **overrides)
        queue = RecordingQueue()
        app = create_app(settings, queue=queue, storage=storage)
        engines.append(app.state.engine)
        with app.state.session_factory() as session:
            keys = {
                name: create_key(session, name=name, admin=name == "admin")
                for name in ("alice", "bob", "admin")
            }
            owners = {name: authenticate(session, f"Bearer {key}") for name, key in keys.items()}
            session.commit()

        def client(name: str | None) -> TestClient:
            headers = {"Authorization": f"Bearer {keys[name]}"} if name else {}
            return TestClient(app, headers=headers)

        return Api(
            app=app,
            queue=queue,
            anonymous=client(None),
            alice=client("alice"),
            bob=client("bob"),
            admin=client("admin"),
            alice_id=owners["alice"].owner_id,
            bob_id=owners["bob"].owner_id,
            keys=keys,
        )

    yield build
    for engine in engines:
        engine.dispose()


@pytest.fixture
def api(make_api: ApiFactory) -> Api:
    return make_api()


class BrokenStorage(LocalStorage):
    """A local store whose readiness check fails, as an unreachable bucket's would."""

    def check(self) -> None:
        raise StorageUnavailable("connection refused")


class PresigningStorage(LocalStorage):
    """A local store that hands out presigned URLs, as S3 does."""

    def presigned_url(self, key: str, *, expires_seconds: int) -> str | None:
        return f"https://blobs.example/{key}?expires={expires_seconds}"


# --- uploads -------------------------------------------------------------------------------


def shot_files(*names: str) -> Files:
    """Multipart files for real fixture shots (e.g. "dog", "albatross"), paired by order."""
    files: Files = []
    for name in names:
        files.append(("images", (f"{name}.jpg", (SHOTS_DIR / name / "1.jpg").read_bytes(), "")))
    for name in names:
        files.append(("masks", (f"{name}.png", (SHOTS_DIR / name / "1.png").read_bytes(), "")))
    return files


def photo(size: tuple[int, int] = (24, 16)) -> Image.Image:
    width, height = size
    red = np.broadcast_to(np.linspace(0, 255, width), (height, width))
    green = np.broadcast_to(np.linspace(0, 255, height)[:, None], (height, width))
    blue = np.full((height, width), 90.0)
    return Image.fromarray(np.stack([red, green, blue], axis=-1).astype(np.uint8))


def box_mask(size: tuple[int, int] = (24, 16), *, fill: int | None = None) -> Image.Image:
    """A white box on black; with `fill`, every pixel that gray value instead."""
    width, height = size
    gray = np.zeros((height, width), np.uint8)
    if fill is None:
        gray[height // 4 : 3 * height // 4, width // 4 : 3 * width // 4] = 255
    else:
        gray[:] = fill
    return Image.fromarray(gray)


def encode(image: Image.Image, image_format: str = "PNG") -> bytes:
    buffer = BytesIO()
    image.save(buffer, image_format)
    return buffer.getvalue()


def pair(image: bytes | None = None, mask: bytes | None = None, *, name: str = "shot") -> Files:
    """One tiny image + mask pair (a valid one unless either is given)."""
    return [
        ("images", (f"{name}.jpg", image if image is not None else encode(photo(), "JPEG"), "")),
        ("masks", (f"{name}.png", mask if mask is not None else encode(box_mask()), "")),
    ]


def class_form(name: str = "dog", num_samples: int = 4, **fields: Any) -> dict[str, Any]:
    return {"name": name, "num_samples": str(num_samples), **fields}


def multipart(files: Files, data: dict[str, Any]) -> tuple[bytes, str]:
    """A multipart body and its Content-Type, encoded as httpx would send it."""
    request = httpx.Request("POST", "http://testserver/", files=files, data=data)
    return request.read(), request.headers["content-type"]


# --- rows standing in for a worker's results -----------------------------------------------


def insert_class(
    session: Session,
    *,
    owner_id: uuid.UUID,
    name: str,
    status: str,
    job_fields: dict[str, Any] | None = None,
    **class_fields: Any,
) -> tuple[uuid.UUID, uuid.UUID]:
    """A class (seed 7, and `class_fields`) and its synthesis job in `status` (and
    `job_fields`), flushed in `session`; returns (class id, job id)."""
    class_id = uuid.uuid4()
    job = Job(
        kind="synthesis",
        owner_id=owner_id,
        target_id=class_id,
        status=status,
        **(job_fields or {}),
    )
    session.add(job)
    session.flush()
    session.add(
        SegClass(id=class_id, owner_id=owner_id, name=name, seed=7, job_id=job.id, **class_fields)
    )
    session.flush()
    return class_id, job.id


def add_class(
    api: Api,
    *,
    owner_id: uuid.UUID,
    name: str = "dog",
    status: str = "queued",
    age: timedelta = timedelta(0),
    **job_fields: Any,
) -> tuple[uuid.UUID, uuid.UUID]:
    """A class and its synthesis job, inserted directly; returns (class id, job id)."""
    created = utcnow() - age
    with api.session() as session:
        ids = insert_class(
            session,
            owner_id=owner_id,
            name=name,
            status=status,
            job_fields={"created_at": created, **job_fields},
            num_shots=1,
            num_samples_requested=8,
            created_at=created,
        )
        session.commit()
        return ids


def add_sample(
    api: Api,
    class_id: uuid.UUID,
    index: int,
    *,
    accepted: bool = True,
    clip_score: float = 30.0,
    finalized: bool = True,
    image: Image.Image | None = None,
    mask: Image.Image | None = None,
) -> uuid.UUID:
    """A sample with its image and mask blobs (8×8 unless given), as a finished synthesis job
    leaves it."""
    image = image if image is not None else photo((8, 8))
    mask = mask if mask is not None else box_mask(image.size)
    image_key = sample_key(class_id, index, "image.png")
    mask_key = sample_key(class_id, index, "mask.png")
    api.storage.put(image_key, encode(image), content_type="image/png")
    api.storage.put(mask_key, encode(mask), content_type="image/png")
    with api.session() as session:
        sample = Sample(
            class_id=class_id,
            index=index,
            prompt="a photo of a dog",
            prompt_kind="text" if index % 2 else "inversion",
            seed=1000 + index,
            width=image.width,
            height=image.height,
            image_key=image_key,
            coarse_mask_key=sample_key(class_id, index, "coarse.png"),
            mask_key=mask_key,
            consensus_iou=0.9,
            mask_source="consensus",
            ood_iou=0.7,
            clip_score=clip_score,
            shot_similarity=0.8,
            accepted=accepted,
            finalized_at=utcnow() if finalized else None,
        )
        session.add(sample)
        session.commit()
        return sample.id


def add_embedding(api: Api, class_id: uuid.UUID, data: bytes) -> None:
    """Store a learned embedding for a class, as the inversion stage does."""
    key = class_key(class_id, "embedding.safetensors")
    api.storage.put(key, data, content_type="application/octet-stream")
    with api.session() as session:
        seg_class = session.get(SegClass, class_id)
        assert seg_class is not None
        seg_class.embedding_key = key
        session.commit()


def set_job(api: Api, job_id: uuid.UUID, **fields: Any) -> None:
    with api.session() as session:
        job = session.get(Job, job_id)
        assert job is not None
        for name, value in fields.items():
            setattr(job, name, value)
        session.commit()


def get_job_row(api: Api, job_id: uuid.UUID) -> Job:
    with api.session() as session:
        job = session.get(Job, job_id)
        assert job is not None
        return job


# --- the dashboard -------------------------------------------------------------------------

HTML = {"Accept": "text/html,application/xhtml+xml"}


def csrf_token_of(page: str) -> str:
    """The session's CSRF token, as a dashboard page holds it for its scripts."""
    found = re.search(r'<meta name="csrf-token" content="([^"]+)">', page)
    assert found is not None
    return found.group(1)


def sign_in(api: Api, key: str) -> TestClient:
    """A browser-like client (no Authorization header) that signed in with `key`."""
    browser = TestClient(api.app)
    form = browser.get("/admin/sign-in", headers=HTML)
    token = re.search(r'name="csrf_token" value="([^"]+)"', form.text)
    assert token is not None, form.text
    answer = browser.post(
        "/admin/sign-in",
        data={"key": key, "csrf_token": token.group(1), "next": "/admin"},
        follow_redirects=False,
    )
    assert answer.status_code == 303, answer.text
    return browser
