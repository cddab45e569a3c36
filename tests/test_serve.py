"""`aligndiff serve` as a user runs it: nothing but defaults, a real HTTP client on loopback."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from tests.conftest import SHOTS_DIR

START_TIMEOUT = 120
JOB_TIMEOUT = 240


@dataclass
class Server:
    url: str
    admin_key: str
    process: subprocess.Popen[str]
    workdir: Path


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture
def server(tmp_path: Path, model_cache: Path) -> Iterator[Server]:
    # given: a fresh working folder and no ALIGNDIFF_* setting but the shared model cache
    env = {k: v for k, v in os.environ.items() if not k.startswith("ALIGNDIFF_")}
    env["ALIGNDIFF_MODEL_CACHE_DIR"] = str(model_cache)
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "service.cli", "serve", "--port", str(port)],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    lines: list[str] = []
    key = None
    deadline = time.monotonic() + START_TIMEOUT
    assert process.stdout is not None
    while key is None and time.monotonic() < deadline:
        line = process.stdout.readline()
        if not line:
            break
        lines.append(line)
        if re.fullmatch(r"adk_\S+\n", line):
            key = line.strip()
    url = f"http://127.0.0.1:{port}"
    try:
        assert key is not None, "serve printed no admin key:\n" + "".join(lines)
        assert any(url in line for line in lines), "serve printed no URL"
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"{url}/healthz", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.3)
        yield Server(url=url, admin_key=key, process=process, workdir=tmp_path)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGTERM)
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()


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
