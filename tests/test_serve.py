"""`aligndiff serve` as a user runs it: nothing but defaults, a real HTTP client on loopback."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import SHOTS_DIR
from tests.serve_support import Server, free_port, running_server

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

        # and: a segmenter trained on it predicts while the worker draws a long synthesis:
        # predictions have a worker of their own
        queued = client.post(
            "/v1/trainings", json={"class_ids": [class_id], "architecture": "deeplabv3", "steps": 4}
        )
        assert queued.status_code == 202, queued.text
        training = wait_for_end(client, f"/v1/trainings/{queued.json()['id']}")
        assert training["status"] == "succeeded", training
        long_job = post_dog(client, num_samples=300).json()
        wait_for_end(client, f"/v1/classes/{long_job['id']}", until=("running",))
        image = (SHOTS_DIR / "dog" / "1.jpg").read_bytes()
        predicted = client.post(
            f"/v1/trainings/{training['id']}/predict", files={"image": ("d.jpg", image)}
        )
        assert predicted.status_code == 200, predicted.text
        assert predicted.content.startswith(b"\x89PNG")
        assert client.get(f"/v1/classes/{long_job['id']}").json()["status"] == "running"
        assert client.post(f"/v1/jobs/{long_job['job_id']}/cancel").status_code == 202

    # and: the data lives under the working folder
    assert (server.workdir / "aligndiff-data").is_dir()


def wait_for_end(
    client: httpx.Client,
    path: str,
    *,
    until: tuple[str, ...] = ("succeeded", "failed", "cancelled"),
) -> dict[str, Any]:
    """Poll `path` until its status is one of `until`; its last body."""
    deadline = time.monotonic() + JOB_TIMEOUT
    body: dict[str, Any] = client.get(path).json()
    while body["status"] not in until and time.monotonic() < deadline:
        time.sleep(0.5)
        body = client.get(path).json()
    return body


def test_serve_runs_a_worker_for_each_model_so_every_models_class_is_drawn(
    tmp_path: Path, model_cache: Path
) -> None:
    # given: serve on a deployment of two models
    models = {"ALIGNDIFF_MODELS": '{"sd15": "tiny", "sdxl": "tiny-sdxl"}'}
    with running_server(tmp_path, model_cache, models) as server:
        assert "  models:     sd15, sdxl (the first is the default)" in [
            line.rstrip("\n") for line in server.output
        ]
        headers = {"Authorization": f"Bearer {server.admin_key}"}
        with httpx.Client(base_url=server.url, headers=headers, timeout=30) as client:
            # when: a class asks for the second model
            files = [
                ("images", ("dog.jpg", (SHOTS_DIR / "dog" / "1.jpg").read_bytes(), "image/jpeg")),
                ("masks", ("dog.png", (SHOTS_DIR / "dog" / "1.png").read_bytes(), "image/png")),
            ]
            data = {"name": "dog", "num_samples": "2", "model": "sdxl"}
            created = client.post("/v1/classes", files=files, data=data)
            assert created.status_code == 202, created.text

            # then: it succeeds, drawn by the worker that serves that model
            body = wait_for_end(client, f"/v1/classes/{created.json()['id']}")
            assert body["status"] == "succeeded" and body["model"] == "sdxl", body
            overview = client.get("/admin/api/jobs").json()
            job = next(job for job in overview["jobs"] if job["id"] == body["job_id"])
            models_of = {worker["name"]: worker["model"] for worker in overview["workers"]}
            assert models_of[job["worker"]] == "sdxl", overview["workers"]
            # and: the dashboard counts one worker per model (the predictions' draws none)
            assert sorted(map(str, models_of.values())) == ["None", "sd15", "sdxl"]
            backlog = {model["name"]: model["workers"] for model in overview["models"]}
            assert backlog == {"sd15": 1, "sdxl": 1}
        arguments = sorted(
            " ".join(a for a in Path(f"/proc/{pid}/cmdline").read_text().split("\0") if "--" in a)
            for pid in worker_children(server.process.pid)
        )
    assert arguments == [
        "--pool --model=sd15 --queues=aligndiff",
        "--pool --model=sd15 --queues=aligndiff.predict",
        "--pool --model=sdxl --queues=aligndiff.synthesis.sdxl",
    ]


def test_serve_says_where_it_is_last_once_it_listens(server: Server) -> None:
    # given: serve answered (the fixture waited for /healthz), and a moment passed for any
    # late output
    time.sleep(1)
    output = [line.rstrip("\n") for line in server.output]

    # then: its URLs and the admin key come last, in one block, after both workers' banners
    # and their "ready" lines; only the fixture's own requests were logged after it
    start = next(i for i, line in enumerate(output) if line.startswith("AlignDiff is serving on"))
    end = output.index(server.admin_key)
    block = output[start : end + 1]
    assert block[0] == f"AlignDiff is serving on {server.url}"
    assert f"  API docs:   {server.url}/docs" in block
    assert f"  dashboard:  {server.url}/admin" in block
    assert block[-2] == "First start: an admin API key was created; it is shown only once:"
    before = "\n".join(output[:start])
    assert before.count("[queues]") == 2 and before.count(" ready.") == 2, before
    # and: as root, one line a worker says so, not Celery's banner of a warning
    assert "SecurityWarning" not in before and "superuser privileges" not in before
    assert before.count("this worker runs as root") == (2 if os.geteuid() == 0 else 0)
    after = output[end + 1 :]
    assert all('"GET /healthz HTTP/1.1" 200' in line for line in after), after


def test_serve_on_a_taken_port_fails_at_once_naming_it(tmp_path: Path) -> None:
    # given: something listens on the port already
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]

        # when: serve is started on it
        started = time.monotonic()
        done = subprocess.run(
            [sys.executable, "-m", "service.cli", "serve", "--port", str(port)],
            cwd=tmp_path,
            env={k: v for k, v in os.environ.items() if not k.startswith("ALIGNDIFF_")},
            capture_output=True,
            text=True,
            timeout=60,
        )

    # then: it stops at once with one line naming the port and how to choose another, and
    # started nothing (no worker, no data folder)
    assert done.returncode != 0
    assert time.monotonic() - started < 15
    assert done.stdout == ""
    assert done.stderr.splitlines() == [
        f"error: port {port} on 127.0.0.1 is already in use (another server, or another "
        f"aligndiff serve?); choose another port with --port, e.g. --port {port + 1}"
    ]
    assert not (tmp_path / "aligndiff-data").exists()


def test_serve_with_a_model_this_machine_lacks_fails_at_once_naming_it(tmp_path: Path) -> None:
    # given: a deployment whose second model is a folder that does not exist
    env = {k: v for k, v in os.environ.items() if not k.startswith("ALIGNDIFF_")}
    env["ALIGNDIFF_MODELS"] = json.dumps({"sd15": "tiny", "xl": str(tmp_path / "sdxl")})

    # when
    done = subprocess.run(
        [sys.executable, "-m", "service.cli", "serve", "--port", str(free_port())],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60,
    )  # fmt: skip

    # then: one line naming the model, its spec and why; nothing started, nothing written
    assert done.returncode == 2 and done.stdout == ""
    (line,) = done.stderr.splitlines()
    assert line.startswith(f"error: model 'xl' ({tmp_path / 'sdxl'}) cannot be read: ")
    assert "no such folder" in line and "ALIGNDIFF_MODELS" in line
    assert not (tmp_path / "aligndiff-data").exists()


def test_stopping_serve_stops_its_embedded_workers(server: Server) -> None:
    # given: serve's embedded workers are running, one for jobs, one for predictions
    children = worker_children(server.process.pid)
    queues = sorted(
        argument
        for pid in children
        for argument in Path(f"/proc/{pid}/cmdline").read_text().split("\0")
        if argument.startswith("--queues=")
    )
    assert queues == ["--queues=aligndiff", "--queues=aligndiff.predict"], children

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
