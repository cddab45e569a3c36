"""`aligndiff serve` as a user runs it: nothing but defaults, a real HTTP client on loopback."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.conftest import SHOTS_DIR
from tests.serve_support import Server, running_server

JOB_TIMEOUT = 240


@pytest.fixture
def server(tmp_path: Path, model_cache: Path) -> Iterator[Server]:
    # given: a fresh working folder and no ALIGNDIFF_* setting but the shared model cache
    with running_server(tmp_path, model_cache) as server:
        yield server


def post_dog(client: httpx.Client, num_samples: int) -> httpx.Response:
    files = [
        ("images", ("dog.jpg", (SHOTS_DIR / "dog" / "1.jpg").read_bytes(), "image/jpeg")),
        ("masks", ("dog.png", (SHOTS_DIR / "dog" / "1.png").read_bytes(), "image/png")),
    ]
    data = {"name": "dog", "num_samples": str(num_samples), "seed": "3"}
    return client.post("/v1/classes", files=files, data=data)


def test_serve_runs_a_class_end_to_end_on_defaults(server: Server) -> None:
    headers = {"Authorization": f"Bearer {server.admin_key}"}
    with httpx.Client(base_url=server.url, headers=headers, timeout=30) as client:
        # when: a class of two samples is created
        created = post_dog(client, num_samples=2)
        assert created.status_code == 202, created.text
        class_id = created.json()["id"]
        assert created.headers["location"].endswith(f"/v1/classes/{class_id}")

        # then: it succeeds, with its samples, blobs and embedding
        deadline = time.monotonic() + JOB_TIMEOUT
        status = created.json()["status"]
        while status not in ("succeeded", "failed", "cancelled") and time.monotonic() < deadline:
            time.sleep(1)
            status = client.get(f"/v1/classes/{class_id}").json()["status"]
        body = client.get(f"/v1/classes/{class_id}").json()
        assert status == "succeeded", body
        assert body["num_samples_done"] == 2 and body["progress"] == 1

        page = client.get(f"/v1/classes/{class_id}/samples", params={"limit": 1}).json()
        items = page["items"]
        assert len(items) == 1 and page["next_cursor"]
        items += client.get(
            f"/v1/classes/{class_id}/samples", params={"cursor": page["next_cursor"]}
        ).json()["items"]
        assert [s["index"] for s in items] == [0, 1]
        for sample in items:
            for url in (sample["image_url"], sample["mask_url"]):
                blob = client.get(url)
                assert blob.status_code == 200 and blob.content.startswith(b"\x89PNG")
        embedding = client.get(f"/v1/classes/{class_id}/embedding")
        assert embedding.status_code == 200 and len(embedding.content) > 64

    # and: the data lives under the working folder
    assert (server.workdir / "aligndiff-data").is_dir()


def test_stopping_serve_stops_its_embedded_worker(server: Server) -> None:
    # given: serve's embedded worker is running
    children = worker_children(server.process.pid)
    assert children, "serve started no worker"

    # when: serve is stopped the way a process manager stops it
    server.process.send_signal(signal.SIGTERM)
    server.process.wait(timeout=30)

    # then: no worker is left behind
    deadline = time.monotonic() + 30
    while any(alive(pid) for pid in children) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not any(alive(pid) for pid in children)


def worker_children(parent: int) -> list[int]:
    found = subprocess.run(["pgrep", "-P", str(parent)], capture_output=True, text=True)
    return [int(pid) for pid in found.stdout.split()]


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a zombie has exited; it only waits for its parent to collect it
    status = (
        Path(f"/proc/{pid}/stat").read_text().split()[2] if Path(f"/proc/{pid}").exists() else "Z"
    )
    return status != "Z"
