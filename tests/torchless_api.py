"""The API as its torch-free image runs it, for `tests/test_api_imports.py` to run in a fresh
interpreter: `python -m tests.torchless_api DATA_DIR [--block]`.

It builds the app on SQLite, a local blob folder and the in-memory broker (the API's real
Celery queue), then plays a user's requests through every resource: classes, samples and their
blobs, a COCO export, jobs, trainings (create, read, predict before it succeeded), health and
the OpenAPI schema. With `--block`, importing torch, diffusers, transformers or accelerate
fails as it would where they are not installed, and every module of `service` is imported
too. It prints one JSON line: the statuses seen, the heavy modules that were loaded, and the
imports that were refused.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import json
import pkgutil
import sys
import uuid
import zipfile
from collections.abc import Sequence
from io import BytesIO
from pathlib import Path
from types import ModuleType
from typing import Any

HEAVY = ("torch", "diffusers", "transformers", "accelerate")


class HeavyImportBlocker(importlib.abc.MetaPathFinder):
    """Refuses the heavy ML packages as an interpreter without them would, recording who
    asked (the first one names the import path to fix)."""

    def __init__(self) -> None:
        self.refused: list[str] = []

    def find_spec(
        self,
        fullname: str,
        path: Sequence[str] | None,
        target: ModuleType | None = None,
    ) -> importlib.machinery.ModuleSpec | None:
        if fullname.split(".", 1)[0] in HEAVY:
            self.refused.append(fullname)
            raise ModuleNotFoundError(f"No module named {fullname!r}", name=fullname)
        return None


def heavy_modules() -> list[str]:
    return sorted(name for name in sys.modules if name.split(".", 1)[0] in HEAVY)


def png(mode: str, size: tuple[int, int], color: Any) -> bytes:
    from PIL import Image

    buffer = BytesIO()
    Image.new(mode, size, color).save(buffer, "PNG")
    return buffer.getvalue()


def import_every_service_module() -> list[str]:
    import service

    names = [
        module.name
        for module in pkgutil.walk_packages(service.__path__, prefix="service.")
        if not module.name.endswith("__main__")
    ]
    for name in names:
        importlib.import_module(name)
    return names


def play(data_dir: Path) -> dict[str, Any]:
    """A user's requests against the app; the status (or outcome) of each, by name."""
    from fastapi.testclient import TestClient

    from service.app import create_app
    from service.auth import create_key
    from service.migrate import upgrade
    from service.models import Job, Sample, utcnow
    from service.settings import Settings
    from service.storage import sample_key

    settings = Settings(data_dir=data_dir, broker_url="memory://")
    upgrade(settings.resolved_database_url)
    app = create_app(settings)
    with app.state.session_factory() as session:
        key = create_key(session, name="user", admin=False)
        session.commit()
    seen: dict[str, Any] = {}
    client = TestClient(app, headers={"Authorization": f"Bearer {key}"})
    seen["healthz"] = client.get("/healthz").status_code
    seen["openapi"] = client.get("/openapi.json").status_code

    shots = Path(__file__).resolve().parents[2] / "shared" / "fixtures" / "shots" / "dog"
    created = client.post(
        "/v1/classes",
        data={"name": "dog", "num_samples": "2"},
        files=[
            ("images", ("dog.jpg", (shots / "1.jpg").read_bytes(), "image/jpeg")),
            ("masks", ("dog.png", (shots / "1.png").read_bytes(), "image/png")),
        ],
    )
    seen["create class"] = created.status_code
    class_id = created.json()["id"]
    job_id = created.json()["job_id"]

    # A worker's results, written as a finished synthesis leaves them.
    storage = app.state.storage
    class_uuid = uuid.UUID(class_id)
    with app.state.session_factory() as session:
        for index in range(2):
            image_key = sample_key(class_uuid, index, "image.png")
            mask_key = sample_key(class_uuid, index, "mask.png")
            storage.put(image_key, png("RGB", (16, 12), (200, 90, 40)), content_type="image/png")
            storage.put(mask_key, png("L", (16, 12), 255), content_type="image/png")
            session.add(
                Sample(
                    class_id=class_uuid,
                    index=index,
                    prompt="a photo of a dog",
                    prompt_kind="text" if index % 2 else "inversion",
                    seed=index,
                    width=16,
                    height=12,
                    image_key=image_key,
                    coarse_mask_key=sample_key(class_uuid, index, "coarse.png"),
                    mask_key=mask_key,
                    mask_source="consensus",
                    clip_score=30.0,
                    accepted=True,
                    finalized_at=utcnow(),
                )
            )
        job = session.get(Job, uuid.UUID(job_id))
        assert job is not None
        job.status, job.progress = "succeeded", 1.0
        session.commit()

    seen["get class"] = client.get(f"/v1/classes/{class_id}").json()["status"]
    samples = client.get(f"/v1/classes/{class_id}/samples").json()["items"]
    seen["samples"] = len(samples)
    seen["sample mask"] = client.get(samples[0]["mask_url"]).status_code
    coco = client.get(f"/v1/classes/{class_id}/dataset", params={"format": "coco"})
    seen["coco export"] = coco.status_code
    with zipfile.ZipFile(BytesIO(coco.content)) as archive:
        annotations = [name for name in archive.namelist() if name.endswith(".json")]
        seen["coco files"] = len(archive.namelist())
        seen["coco json"] = bool(annotations)
    seen["jobs"] = len(client.get("/v1/jobs").json()["items"])
    seen["get job"] = client.get(f"/v1/jobs/{job_id}").json()["status"]

    training = client.post(
        "/v1/trainings", json={"class_ids": [class_id], "architecture": "deeplabv3"}
    )
    seen["create training"] = training.status_code
    training_id = training.json()["id"]
    seen["get training"] = client.get(f"/v1/trainings/{training_id}").json()["status"]
    seen["predict before it succeeded"] = client.post(
        f"/v1/trainings/{training_id}/predict",
        files={"image": ("a.png", png("RGB", (8, 8), (0, 0, 0)), "image/png")},
    ).status_code
    return seen


def main(argv: list[str]) -> None:
    data_dir, block = Path(argv[0]), "--block" in argv[1:]
    blocker = HeavyImportBlocker()
    if block:
        sys.meta_path.insert(0, blocker)
    report: dict[str, Any] = {"seen": play(data_dir)}
    if block:
        report["service modules"] = len(import_every_service_module())
    report["heavy"] = heavy_modules()
    report["refused"] = blocker.refused
    print(json.dumps(report))


if __name__ == "__main__":
    main(sys.argv[1:])
