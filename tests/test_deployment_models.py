"""A deployment serving several diffusion models at once (ALIGNDIFF_MODELS): the models listed,
a class's `model` checked and recorded, its synthesis sent to its model's queue, the dashboard's
backlog per model, and two real workers on Redis each drawing only its own model's classes."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select

from aligndiff.models.family import default_resolution, model_family
from aligndiff_client import Client
from aligndiff_client.cli import main as client_main
from service.app import create_app
from service.auth import create_key
from service.db import session_scope
from service.models import Job, SegClass, WorkerHeartbeat
from service.queue import RecordingQueue
from service.settings import Settings
from tests.api_support import HTML, Api, ApiFactory, add_class, class_form, pair, sign_in
from tests.client_support import API_KEY, BASE_URL
from tests.conftest import SHOTS_DIR
from tests.worker_support import (
    Service,
    WorkerProcess,
    create_class,
    local_settings,
    private_redis,
    worker_env,
)
from worker import synthesis
from worker.celery_app import make_celery

pytest_plugins = ["tests.api_support"]

TWO_MODELS = {"sd15": "tiny", "xl": "tiny-sdxl"}
START = "aligndiff.synthesis.start"


@pytest.fixture
def two_models(make_api: ApiFactory) -> Api:
    return make_api(models=TWO_MODELS)


def test_the_families_and_resolutions_of_specs_are_read_without_loading_them(
    tmp_path: Path,
) -> None:
    # given: a local SDXL-shaped diffusers folder (configs only)
    folder = tmp_path / "xl"
    (folder / "unet").mkdir(parents=True)
    (folder / "vae").mkdir()
    (folder / "model_index.json").write_text(
        json.dumps({"_class_name": "StableDiffusionXLPipeline"})
    )
    (folder / "unet" / "config.json").write_text(json.dumps({"sample_size": 128}))
    (folder / "vae" / "config.json").write_text(json.dumps({"block_out_channels": [1, 2, 3, 4]}))

    # then
    assert (model_family("tiny"), default_resolution("tiny")) == ("sd", 128)
    assert model_family("tiny-sd2") == "sd" and model_family("tiny-sdxl") == "sdxl"
    assert (model_family(str(folder)), default_resolution(str(folder))) == ("sdxl", 1024)


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_the_models_are_listed_default_first_with_family_and_resolution(two_models: Api) -> None:
    # when
    listed = two_models.alice.get("/v1/models")
    anonymous = two_models.anonymous.get("/v1/models")

    # then
    assert listed.status_code == 200, listed.text
    assert listed.json() == {
        "items": [
            {"name": "sd15", "family": "sd", "default_resolution": 128},
            {"name": "xl", "family": "sdxl", "default_resolution": 128},
        ]
    }
    assert anonymous.status_code == 401


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_without_the_setting_the_one_model_is_the_diffusion_model(api: Api) -> None:
    listed = api.alice.get("/v1/models").json()
    assert listed == {"items": [{"name": "default", "family": "sd", "default_resolution": 128}]}


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_a_class_for_a_model_not_served_is_refused_naming_the_served_ones(two_models: Api) -> None:
    # when
    answer = two_models.alice.post("/v1/classes", files=pair(), data=class_form(model="sd21"))

    # then: 422 on `model`, naming both served models; nothing queued
    assert answer.status_code == 422, answer.text
    (error,) = [e for e in answer.json()["errors"] if e["field"] == "model"]
    assert "sd15" in error["message"] and "xl" in error["message"]
    assert two_models.queue.sent == []


def test_a_class_records_its_model_and_its_start_goes_to_that_models_queue(
    two_models: Api,
) -> None:
    # when: one class names `xl`, another names no model
    chosen = two_models.alice.post("/v1/classes", files=pair(), data=class_form(model="xl"))
    default = two_models.alice.post("/v1/classes", files=pair(), data=class_form(name="cat"))

    # then: each records its model (the default: the first), and reads back with it
    assert chosen.status_code == default.status_code == 202, chosen.text
    assert chosen.json()["model"] == "xl" and default.json()["model"] == "sd15"
    assert two_models.alice.get(f"/v1/classes/{chosen.json()['id']}").json()["model"] == "xl"
    # and: their starts went to their models' synthesis queues
    assert [name for name, _ in two_models.queue.sent] == [START, START]
    assert two_models.queue.queues == ["aligndiff.synthesis.xl", "aligndiff.synthesis.sd15"]


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_a_class_from_before_models_were_named_shows_the_default_model(two_models: Api) -> None:
    class_id, _ = add_class(two_models, owner_id=two_models.alice_id)  # model NULL
    assert two_models.alice.get(f"/v1/classes/{class_id}").json()["model"] == "sd15"


def test_the_jobs_page_shows_the_backlog_per_model_and_a_model_no_live_worker_serves(
    two_models: Api,
) -> None:
    # given: two queued classes of `xl` and one of the default, and one live worker serving
    # the default only
    for _ in range(2):
        class_id, _ = add_class(two_models, owner_id=two_models.alice_id)
        with two_models.session() as session:
            row = session.get(SegClass, class_id)
            assert row is not None
            row.model = "xl"
            session.commit()
    add_class(two_models, owner_id=two_models.alice_id)
    with two_models.session() as session:
        session.add(WorkerHeartbeat(name="gpu0:1", hostname="gpu0", pid=1, model="sd15"))
        # and: a worker of predictions only, which draws no class of any model
        session.add(WorkerHeartbeat(name="gpu1:1", hostname="gpu1", pid=1, model=None))
        session.commit()

    # when
    page = sign_in(two_models, two_models.keys["admin"]).get("/admin", headers=HTML).text
    polled = two_models.admin.get("/admin/api/jobs").json()

    # then: the backlog per model, and the notice for `xl` only
    backlog = {model["name"]: model for model in polled["models"]}
    assert (backlog["sd15"]["queued"], backlog["sd15"]["workers"]) == (1, 1)
    assert {w["name"]: w["model"] for w in polled["workers"]} == {"gpu0:1": "sd15", "gpu1:1": None}
    assert '<code>gpu1:1</code> <span class="muted">predictions</span>' in page
    assert (backlog["xl"]["queued"], backlog["xl"]["workers"]) == (2, 0)
    assert backlog["xl"]["waits_for_a_worker"] and not backlog["sd15"]["waits_for_a_worker"]
    assert 'data-model="xl"' in page and "No live worker serves model <code>xl</code>" in page
    assert "No live worker serves model <code>sd15</code>" not in page


# --- two real workers on Redis -------------------------------------------------------------


@pytest.fixture
def two_workers(
    tmp_path: Path, postgres_url: str, model_cache: Path
) -> Iterator[tuple[TestClient, Service, dict[str, WorkerProcess]]]:
    models = {"a": "tiny", "b": "tiny"}
    with private_redis(tmp_path) as redis_url:
        settings = Settings(
            data_dir=tmp_path,
            database_url=postgres_url,
            broker_url=redis_url,
            storage_url=f"file://{tmp_path / 'blobs'}",
            sample_chunk_size=1,
            model_cache_dir=model_cache,
            models=models,
        )
        service = Service.create(settings)
        with session_scope(service.sessions) as session:
            key = create_key(session, name="models", admin=False)
        env = worker_env(settings, model_cache, ALIGNDIFF_MODELS=json.dumps(models))
        workers = {
            name: WorkerProcess(
                env, tmp_path / f"worker-{name}.log", pool="solo", concurrency=1, model=name
            )
            for name in models
        }
        try:
            with TestClient(create_app(settings)) as client:
                client.headers["Authorization"] = f"Bearer {key}"
                yield client, service, workers
        finally:
            for worker in workers.values():
                worker.stop()


def test_each_class_is_drawn_only_by_the_workers_of_its_model(two_workers) -> None:
    client, service, workers = two_workers
    shots = [
        ("images", ("dog.jpg", (SHOTS_DIR / "dog" / "1.jpg").read_bytes(), "image/jpeg")),
        ("masks", ("dog.png", (SHOTS_DIR / "dog" / "1.png").read_bytes(), "image/png")),
    ]

    # when: two classes of each model are posted
    created: dict[str, list[str]] = {"a": [], "b": []}
    for model in ("a", "b", "a", "b"):
        answer = client.post(
            "/v1/classes", files=shots, data={"name": "dog", "num_samples": "2", "model": model}
        )
        assert answer.status_code == 202, answer.text
        created[model].append(answer.json()["id"])

    # then: all succeed
    deadline = time.monotonic() + 420
    for model, ids in created.items():
        for class_id in ids:
            body = client.get(f"/v1/classes/{class_id}").json()
            while body["status"] not in ("succeeded", "failed", "cancelled"):
                logs = {name: w.log.read_text()[-2000:] for name, w in workers.items()}
                assert time.monotonic() < deadline, logs
                time.sleep(0.5)
                body = client.get(f"/v1/classes/{class_id}").json()
            assert body["status"] == "succeeded", body["error"]
            assert body["model"] == model

    # and: every class's job was run by its model's worker (the process named in the job), and
    # every task of a class (start, sampling chunks, annotation, scoring) was logged by that
    # worker only
    pids = {name: worker.process.pid for name, worker in workers.items()}
    logs = {name: worker.log.read_text() for name, worker in workers.items()}
    with service.session() as session:
        for model, ids in created.items():
            for class_id in ids:
                row = session.get(SegClass, uuid.UUID(class_id))
                assert row is not None and row.model == model
                job = session.scalar(select(Job).where(Job.target_id == row.id))
                assert job is not None and job.worker is not None
                assert job.worker.endswith(f":{pids[model]}"), (job.worker, pids)
                other = "b" if model == "a" else "a"
                assert str(job.id) in logs[model]
                assert str(job.id) not in logs[other]
        # and: each worker's heartbeat names its model
        beats = session.execute(select(WorkerHeartbeat.pid, WorkerHeartbeat.model)).all()
    assert {(pid, model) for pid, model in beats} >= {(pids["a"], "a"), (pids["b"], "b")}


def test_a_task_taken_by_a_worker_of_another_model_is_sent_on_to_its_models_queue(
    tmp_path: Path,
) -> None:
    # given: a worker serving `a`, and a queued class of model `b` whose start reached it (as a
    # start sent to the shared jobs queue before the deployment named its models would)
    settings = local_settings(tmp_path, models={"a": "tiny", "b": "tiny"}, worker_model="a")
    service = Service.create(settings)
    created = create_class(service, SHOTS_DIR / "dog", name="dog", num_samples=2)
    with service.session() as session:
        row = session.get(SegClass, created.class_id)
        assert row is not None and row.model == "a"
        row.model = "b"
    queue = RecordingQueue()
    app = make_celery(settings, queue=queue)
    app.loader.import_default_modules()

    # when
    app.tasks[synthesis.START].apply(args=[str(created.job_id)])

    # then: it is not run here (the job stays queued, unclaimed) but sent on to `b`'s queue
    assert service.job(created.job_id).status == "queued"
    assert queue.sent == [(synthesis.START, (str(created.job_id),))]
    assert queue.queues == ["aligndiff.synthesis.b"]


def test_the_sdk_lists_the_models_and_creates_a_class_for_one(tmp_path: Path) -> None:
    # given: a service that answers the models and records a class's form fields
    forms: list[bytes] = []

    def answer(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/v1/models":
            return httpx.Response(
                200, json={"items": [{"name": "xl", "family": "sdxl", "default_resolution": 1024}]}
            )
        forms.append(request.read())
        return httpx.Response(
            202,
            json={
                "id": str(uuid.uuid4()),
                "name": "dog",
                "status": "queued",
                "num_shots": 1,
                "num_samples_requested": 2,
                "model": "xl",
                "created_at": "2026-12-06T00:00:00Z",
                "updated_at": "2026-12-06T00:00:00Z",
            },
        )

    transport = httpx.MockTransport(answer)
    image, mask = tmp_path / "1.jpg", tmp_path / "1.png"
    image.write_bytes((SHOTS_DIR / "dog" / "1.jpg").read_bytes())
    mask.write_bytes((SHOTS_DIR / "dog" / "1.png").read_bytes())

    # when
    with Client(BASE_URL, API_KEY, transport=transport) as client:
        models = client.models()
        created = client.create_class("dog", [image], [mask], num_samples=2, model="xl")
    status = client_main(
        ["--url", BASE_URL, "--api-key", API_KEY, "-q", "create", "dog", "--images", str(image),
         "--masks", str(mask), "--model", "xl"],
        transport=transport,
    )  # fmt: skip

    # then
    assert [(m.name, m.family, m.default_resolution) for m in models] == [("xl", "sdxl", 1024)]
    assert created.model == "xl" and status == 0
    assert all(b'name="model"\r\n\r\nxl' in form for form in forms) and len(forms) == 2
