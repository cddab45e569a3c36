"""End to end over HTTP: the API on PostgreSQL, a real Celery worker process on Redis."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from service.app import create_app
from service.auth import create_key
from service.db import session_scope
from service.settings import Settings
from tests.conftest import SHOTS_DIR
from tests.worker_support import Service, WorkerProcess, unreadable_log_lines, worker_env


@pytest.fixture
def stack(
    tmp_path: Path, postgres_url: str, redis_url: str, model_cache: Path
) -> Iterator[tuple[TestClient, str, WorkerProcess]]:
    settings = Settings(
        data_dir=tmp_path,
        database_url=postgres_url,
        broker_url=redis_url,
        storage_url=f"file://{tmp_path / 'blobs'}",
        sample_chunk_size=2,
        model_cache_dir=model_cache,
    )
    service = Service.create(settings)
    with session_scope(service.sessions) as session:
        key = create_key(session, name="e2e", admin=False)
    worker = WorkerProcess(
        worker_env(settings, model_cache), tmp_path / "worker.log", pool="solo", concurrency=1
    )
    try:
        with TestClient(create_app(settings)) as client:
            client.headers["Authorization"] = f"Bearer {key}"
            yield client, key, worker
    finally:
        worker.stop()


def test_a_class_posted_over_http_is_synthesized_by_a_worker_on_redis(stack) -> None:
    client, _, worker = stack

    # when: the dog shots are posted for three samples
    files = [
        ("images", ("dog.jpg", (SHOTS_DIR / "dog" / "1.jpg").read_bytes(), "image/jpeg")),
        ("masks", ("dog.png", (SHOTS_DIR / "dog" / "1.png").read_bytes(), "image/png")),
    ]
    created = client.post("/v1/classes", files=files, data={"name": "dog", "num_samples": "3"})
    assert created.status_code == 202, created.text
    class_id = created.json()["id"]

    # then: polling sees it through to success
    deadline = time.monotonic() + 240
    body = created.json()
    while body["status"] not in ("succeeded", "failed", "cancelled"):
        assert time.monotonic() < deadline, worker.log.read_text()[-3000:]
        time.sleep(0.5)
        body = client.get(f"/v1/classes/{class_id}").json()
    assert body["status"] == "succeeded", body["error"]
    assert body["num_samples_done"] == 3 and body["progress"] == 1.0

    # and: paging two at a time yields every sample once, each with its blobs
    seen, cursor = [], None
    while True:
        params = {"limit": 2, **({"cursor": cursor} if cursor else {})}
        page = client.get(f"/v1/classes/{class_id}/samples", params=params).json()
        seen += page["items"]
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert [s["index"] for s in seen] == [0, 1, 2]
    for sample in seen:
        for url in (sample["image_url"], sample["mask_url"]):
            blob = client.get(url)
            assert blob.status_code == 200 and blob.content.startswith(b"\x89PNG")
    job = client.get(f"/v1/jobs/{body['job_id']}").json()
    assert job["status"] == "succeeded" and job["attempts"] == 1
    # and: the worker, which loaded the models, logged what an operator reads: no progress
    # bars (the libraries' "Loading weights") and no payloads
    assert unreadable_log_lines(worker.log.read_text(errors="replace")) == []
