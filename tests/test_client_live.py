"""The SDK and its command line against a live `aligndiff serve` (defaults, tiny models, on
loopback): a class of two samples created, followed, listed and downloaded, a broken download
resumed. One server and one class for the whole module."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tarfile
import uuid
import zipfile
from collections.abc import Iterator
from io import BytesIO
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import webdataset as wds
from PIL import Image

from aligndiff.models.segmenters import load_segmenter
from aligndiff.training import predict
from aligndiff_client import ClassInfo, Client, Unauthorized, shot_files
from aligndiff_client.client import archive_suffix
from tests.conftest import SHOTS_DIR
from tests.serve_support import Server, running_server

JOB_TIMEOUT = 240
DATASET_ROUTE = "/v1/classes/{class_id}/dataset"
CLI = Path(sys.executable).with_name("aligndiff-client")


class Interrupted(Exception):
    """Raised from a progress callback to break a download off, as Ctrl-C would."""


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, model_cache: Path) -> Iterator[Server]:
    with running_server(tmp_path_factory.mktemp("serve"), model_cache) as server:
        yield server


@pytest.fixture(scope="module")
def client(server: Server) -> Iterator[Client]:
    with Client(server.url, server.admin_key) as client:
        yield client


@pytest.fixture(scope="module")
def dog(client: Client) -> ClassInfo:
    """The dog class of two samples, created from the shots folder with bg_lambda chosen by
    trials, and waited for."""
    images, masks = shot_files(SHOTS_DIR / "dog")
    created = client.create_class("dog", images, masks, num_samples=2, seed=3, bg_lambda="auto")
    assert (created.bg_lambda, created.tuning) == (None, None)
    return client.wait(created.id, timeout=JOB_TIMEOUT, poll_interval=0.5, progress=False)


@pytest.fixture(scope="module")
def dataset_formats(server: Server) -> list[str]:
    """The formats the server's dataset route offers (per its OpenAPI schema)."""
    schema = httpx.get(f"{server.url}/openapi.json").json()
    route = schema["paths"].get(DATASET_ROUTE)
    if route is None:
        pytest.skip("the server has no dataset route yet")
    (param,) = (p for p in route["get"]["parameters"] if p["name"] == "format")
    return list(_resolve(schema, param["schema"])["enum"])


def test_a_class_is_created_waited_for_and_its_samples_read(
    client: Client, dog: ClassInfo, tmp_path: Path
) -> None:
    # then: the class succeeded with both samples, seen page by page
    assert dog.status == "succeeded" and dog.num_samples_done == 2 and dog.progress == 1
    samples = list(client.samples(dog.id, page_size=1))
    assert [s.index for s in samples] == [0, 1]
    assert {s.class_id for s in samples} == {dog.id}
    assert client.download_sample_image(samples[0]).startswith(b"\x89PNG")
    assert client.download_sample_mask(samples[1].id, tmp_path / "m.png").startswith(b"\x89PNG")
    assert (tmp_path / "m.png").stat().st_size > 0

    # and: the embedding, the class in the listing and its job
    embedding = client.get_embedding(dog.id, tmp_path / "dog.safetensors")
    assert embedding.stat().st_size > 64
    assert dog.id in {c.id for c in client.list_classes(page_size=1)}
    assert dog.job_id is not None and client.get_job(dog.job_id).status == "succeeded"


def test_an_auto_class_shows_its_trials_and_its_report_counts_its_samples(
    client: Client, dog: ClassInfo
) -> None:
    # then: the class kept the best-scoring of its trials
    assert dog.tuning is not None
    assert [trial.bg_lambda for trial in dog.tuning] == [0.2, 0.6, 1.0]
    assert dog.bg_lambda == max(dog.tuning, key=lambda trial: trial.score or 0.0).bg_lambda
    # and: its report counts the samples the listing shows, each rejection with its reason
    report = client.report(dog.id)
    samples = list(client.samples(dog.id))
    assert report.counts.samples == len(samples) == 2
    assert report.counts.accepted == sum(s.accepted for s in samples) == dog.num_accepted
    assert sum(report.counts.rejected_by.values()) == sum(not s.accepted for s in samples)
    assert all((s.rejected_by is None) == s.accepted for s in samples)
    assert report.bg_lambda == dog.bg_lambda


@pytest.mark.filterwarnings("ignore:WebDataset\\(shardshuffle")  # one file: no shards to shuffle
def test_the_dataset_downloads_in_every_format_as_a_valid_archive(
    client: Client, dog: ClassInfo, dataset_formats: list[str], tmp_path: Path
) -> None:
    for name in dataset_formats:
        dest = tmp_path / f"dog-{name}{archive_suffix(name)}"

        path = client.download_dataset(
            dog.id,
            name,
            dest,
            progress=False,
            extract=tmp_path / name,  # type: ignore[arg-type]
        )

        assert path == dest and not dest.with_name(dest.name + ".incomplete").exists()
        opener = tarfile.is_tarfile if name == "webdataset" else zipfile.is_zipfile
        assert opener(dest), f"{name}: not a valid archive"
        assert any(p.is_file() for p in (tmp_path / name).rglob("*")), f"{name}: empty"

    # and: WebDataset reads the webdataset tar as it was downloaded, a record per image
    records = list(wds.WebDataset(str(tmp_path / "dog-webdataset.tar")))
    assert len(records) == dog.num_shots + dog.num_accepted
    assert all({"jpg", "mask.png", "json"} <= set(record) for record in records)


def test_an_interrupted_download_resumes_to_the_same_bytes(
    server: Server,
    client: Client,
    dog: ClassInfo,
    dataset_formats: list[str],
    tmp_path: Path,
) -> None:
    # given: a clean download, and one broken off with half the bytes saved
    clean = client.download_dataset(dog.id, "voc", tmp_path / "clean.zip", progress=False)
    size = clean.stat().st_size
    dest = tmp_path / "resumed.zip"

    def interrupt(done: int, total: int | None) -> None:
        raise Interrupted

    with pytest.raises(Interrupted):
        client.download_dataset(dog.id, "voc", dest, progress=False, on_progress=interrupt)
    partial = dest.with_name(dest.name + ".incomplete")
    # NOTE: the archive is small enough to arrive in one chunk; cut what was saved to half,
    # as a crash halfway through would have left it.
    with partial.open("r+b") as file:
        file.truncate(size // 2)
    assert not dest.exists()

    # when: the download is asked for again
    client.download_dataset(dog.id, "voc", dest, progress=False)

    # then: the rest was asked for and sent (206), and the file equals the clean download
    assert dest.read_bytes() == clean.read_bytes()
    assert not partial.exists()
    assert any("/dataset?" in line and " 206" in line for line in server.output), (
        "no ranged answer in the server's log"
    )


def test_a_key_is_created_used_listed_and_revoked(server: Server, client: Client) -> None:
    # when: the admin creates a key for a new owner, which then lists its classes
    created = client.create_key("live-test")
    with Client(server.url, created.key) as newcomer:
        classes = list(newcomer.list_classes())

    # then: a user key of its own owner, who has no classes yet
    assert not created.admin and created.key and classes == []
    listed = {key.id: key for key in client.list_keys()}
    assert listed[created.id].revoked_at is None

    # when: it is revoked
    client.revoke_key(created.id)

    # then: it is refused, and listed as revoked
    with Client(server.url, created.key) as newcomer, pytest.raises(Unauthorized):
        newcomer.get_class(uuid.uuid4())
    assert {key.id: key for key in client.list_keys()}[created.id].revoked_at is not None


# NOTE: before the command line's tests: the class one of them creates would keep serve's one
# worker busy while this training waits.
def test_a_trained_segmenter_predicts_on_the_worker_as_its_downloaded_weights_do(
    server: Server, client: Client, dog: ClassInfo, tmp_path: Path
) -> None:
    # when: a segmenter is trained on the class, waited for, an image is sent to predict (the
    # API hands it to serve's embedded worker) and the weights are downloaded
    queued = client.train([dog.id], steps=2, batch_size=2)
    training = client.wait_training(
        queued.id, timeout=JOB_TIMEOUT, poll_interval=0.5, progress=False
    )
    image = SHOTS_DIR / "dog" / "1.jpg"
    predicted = client.predict(training.id, image, tmp_path / "mask.png")
    weights = client.download_weights(training.id, tmp_path / "weights.zip", progress=False)

    # then: the worker's mask is what the downloaded weights predict in this process
    assert training.status == "succeeded", training
    assert (tmp_path / "mask.png").read_bytes() == predicted
    assert training.id in {t.id for t in client.list_trainings()}
    model, config = load_segmenter(weights.read_bytes())
    decoded = np.asarray(Image.open(image).convert("RGB"))
    (expected,) = predict(model, [decoded], resolution=int(config["resolution"]))
    assert np.array_equal(np.asarray(Image.open(BytesIO(predicted))), expected)
    # and: the API process (serve itself, not its worker) has no torch loaded
    assert "libtorch" not in Path(f"/proc/{server.process.pid}/maps").read_text()


def test_the_command_line_creates_and_shows_a_class(server: Server, dog: ClassInfo) -> None:
    # given: the URL and key in the environment only
    env = cli_env(server)

    # when: a class is created from a shots folder (not waited for), and the dog's status read
    created = cli_json(
        env, "create", "dog", "--shots-dir", str(SHOTS_DIR / "dog"), "--num-samples", "1"
    )
    status = cli_json(env, "status", str(dog.id))
    listed = cli(env, "list", "--json")

    # then
    assert created["name"] == "dog" and created["status"] in ("queued", "running")
    assert status["id"] == str(dog.id) and status["status"] == "succeeded"
    assert listed.returncode == 0, listed.stderr
    assert {created["id"], str(dog.id)} <= {
        json.loads(line)["id"] for line in listed.stdout.splitlines()
    }

    # and: an error is one line and a non-zero status
    missing = cli(env, "status", str(uuid.uuid4()))
    assert missing.returncode == 1 and missing.stdout == ""
    assert missing.stderr == "aligndiff-client: error: 404 Not Found: class not found\n"


def test_the_command_line_downloads_and_unpacks_a_dataset(
    server: Server, dog: ClassInfo, dataset_formats: list[str], tmp_path: Path
) -> None:
    out, folder = tmp_path / "dog.zip", tmp_path / "dog"

    run = cli(cli_env(server), "download", str(dog.id), "--out", str(out), "--extract", str(folder))

    assert run.returncode == 0, run.stderr
    assert run.stdout.splitlines() == [str(out), str(folder)]
    assert zipfile.is_zipfile(out) and any(folder.rglob("*.png"))


def cli_env(server: Server) -> dict[str, str]:
    return {**os.environ, "ALIGNDIFF_URL": server.url, "ALIGNDIFF_API_KEY": server.admin_key}


def cli(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([CLI, *args], env=env, capture_output=True, text=True, timeout=60)


def cli_json(env: dict[str, str], *args: str) -> dict[str, Any]:
    run = cli(env, *args)
    assert run.returncode == 0, run.stderr
    return json.loads(run.stdout)  # type: ignore[no-any-return]


def _resolve(schema: dict[str, Any], node: dict[str, Any]) -> dict[str, Any]:
    """`node` with a `$ref` (or an `anyOf`/`allOf` of one) followed."""
    for key in ("anyOf", "allOf"):
        if key in node:
            node = next(n for n in node[key] if n.get("type") != "null")
    if "$ref" in node:
        target = schema
        for part in node["$ref"].removeprefix("#/").split("/"):
            target = target[part]
        return _resolve(schema, target)
    return node
