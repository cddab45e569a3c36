"""Per-owner quotas: queued + running jobs (creates and retries, race-free) answer 429 with
Retry-After; samples per class and stored upload bytes, which waiting cannot lift, answer 422
without one; admins have none."""

from __future__ import annotations

import threading
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from sqlalchemy import func, select

from aligndiff_client import Client, OverQuota
from service.contexts.quotas import OVER_LASTING_QUOTA
from service.models import Job, SegClass, Training
from tests.api_support import (
    Api,
    ApiFactory,
    add_class,
    class_form,
    encode,
    pair,
    photo,
    set_job,
)

pytest_plugins = ["tests.api_support"]

# Rate limits out of the way: these tests are about quotas.
NO_RATE_LIMITS = {"rate_limit_per_second": 0, "job_rate_limit_per_minute": 0}


def assert_over_quota(response: httpx.Response, *, retry_after: int = 30) -> dict[str, object]:
    """A refusal that lifts as jobs finish: 429, with the Retry-After the quota sets."""
    assert response.status_code == 429, response.text
    assert response.headers["content-type"] == "application/problem+json"
    assert response.headers["retry-after"] == str(retry_after)
    body: dict[str, object] = response.json()
    assert body["status"] == 429 and "quota" in str(body["detail"])
    return body


def assert_over_lasting_quota(response: httpx.Response) -> dict[str, object]:
    """A refusal that waiting cannot lift: 422 without Retry-After (API.md), of its own type."""
    assert response.status_code == 422, response.text
    assert response.headers["content-type"] == "application/problem+json"
    assert "retry-after" not in response.headers
    body: dict[str, object] = response.json()
    assert body["status"] == 422 and "quota" in str(body["detail"])
    assert body["type"] == OVER_LASTING_QUOTA
    return body


def count(api: Api, model: type[Job] | type[SegClass] | type[Training]) -> int:
    with api.session() as session:
        return session.execute(select(func.count()).select_from(model)).scalar_one()


def upload_bytes(files: list[tuple[str, tuple[str, bytes, str]]]) -> int:
    return sum(len(content) for _, (_, content, _) in files)


# --- concurrent jobs ------------------------------------------------------------------------


def test_twenty_concurrent_creates_against_a_quota_of_two_queue_exactly_two(
    make_api: ApiFactory,
) -> None:
    # given: a quota of 2 queued + running jobs, and 20 creates released at once
    api = make_api(quota_concurrent_jobs=2, **NO_RATE_LIMITS)
    start = threading.Barrier(20)

    def create(_: int) -> httpx.Response:
        start.wait(timeout=30)
        return api.alice.post("/v1/classes", files=pair(), data=class_form())

    # when
    with ThreadPoolExecutor(max_workers=20) as pool:
        responses = list(pool.map(create, range(20)))

    # then: exactly two are accepted and queued; every other one is a 429 that left nothing
    statuses = sorted(response.status_code for response in responses)
    assert statuses == [202] * 2 + [429] * 18, statuses
    for refused in (r for r in responses if r.status_code == 429):
        assert_over_quota(refused)
    assert count(api, Job) == 2 and count(api, SegClass) == 2
    assert len(api.queue.sent) == 2
    accepted = {r.json()["id"] for r in responses if r.status_code == 202}
    assert {key.split("/")[1] for key in api.blobs("classes/")} == accepted


def test_a_finished_job_frees_its_place(make_api: ApiFactory) -> None:
    api = make_api(quota_concurrent_jobs=1, **NO_RATE_LIMITS)
    first = api.alice.post("/v1/classes", files=pair(), data=class_form()).json()
    assert_over_quota(api.alice.post("/v1/classes", files=pair(), data=class_form()))

    set_job(api, uuid.UUID(first["job_id"]), status="succeeded")

    assert api.alice.post("/v1/classes", files=pair(), data=class_form()).status_code == 202


def test_the_quota_is_per_owner_and_admins_have_none(make_api: ApiFactory) -> None:
    api = make_api(quota_concurrent_jobs=1, **NO_RATE_LIMITS)
    add_class(api, owner_id=api.alice_id, status="running")

    assert_over_quota(api.alice.post("/v1/classes", files=pair(), data=class_form()))
    assert api.bob.post("/v1/classes", files=pair(), data=class_form()).status_code == 202
    admin = [
        api.admin.post("/v1/classes", files=pair(), data=class_form()).status_code for _ in range(3)
    ]
    assert admin == [202] * 3


def test_a_retry_counts_against_the_concurrent_jobs(make_api: ApiFactory) -> None:
    # given: one failed job and one running, with a quota of 1
    api = make_api(quota_concurrent_jobs=1, **NO_RATE_LIMITS)
    _, failed = add_class(api, owner_id=api.alice_id, status="failed")
    _, running = add_class(api, owner_id=api.alice_id, status="running")

    # when / then: the retry would make two
    assert_over_quota(api.alice.post(f"/v1/jobs/{failed}/retry"))
    assert api.queue.sent == []
    with api.session() as session:
        job = session.get(Job, failed)
        assert job is not None and job.status == "failed"

    # once the running one ended, the retry is queued
    set_job(api, running, status="cancelled")
    assert api.alice.post(f"/v1/jobs/{failed}/retry").status_code == 202


def test_a_training_counts_against_the_concurrent_jobs(make_api: ApiFactory) -> None:
    api = make_api(quota_concurrent_jobs=1, **NO_RATE_LIMITS)
    dog, _ = add_class(api, owner_id=api.alice_id, status="succeeded")
    add_class(api, owner_id=api.alice_id, status="queued")
    body = {"class_ids": [str(dog)], "architecture": "deeplabv3"}

    assert_over_quota(api.alice.post("/v1/trainings", json=body))

    assert count(api, Training) == 0
    assert api.admin.post("/v1/trainings", json=body).status_code == 202


# --- samples per class ----------------------------------------------------------------------


def test_more_samples_than_the_owners_quota_or_past_the_server_max_is_422(
    make_api: ApiFactory,
) -> None:
    api = make_api(quota_samples_per_class=10, max_num_samples=100, **NO_RATE_LIMITS)

    over_quota = api.alice.post("/v1/classes", files=pair(), data=class_form(num_samples=11))
    over_max = api.alice.post("/v1/classes", files=pair(), data=class_form(num_samples=101))
    at_quota = api.alice.post("/v1/classes", files=pair(), data=class_form(num_samples=10))
    admin = api.admin.post("/v1/classes", files=pair(), data=class_form(num_samples=50))

    body = assert_over_lasting_quota(over_quota)
    assert body["errors"] == [
        {"field": "num_samples", "message": "must be at most 10 for your key"}
    ]
    assert over_max.status_code == 422
    assert at_quota.status_code == 202 and admin.status_code == 202
    assert count(api, SegClass) == 2


# --- stored upload bytes --------------------------------------------------------------------


def test_stored_upload_bytes_are_recorded_and_capped_until_classes_are_deleted(
    make_api: ApiFactory,
) -> None:
    # given: a quota that holds one upload but not two
    files = pair()
    size = upload_bytes(files)
    api = make_api(quota_upload_bytes=size * 3 // 2, **NO_RATE_LIMITS)

    # when
    first = api.alice.post("/v1/classes", files=files, data=class_form())
    second = api.alice.post("/v1/classes", files=files, data=class_form())

    # then: the first is recorded with the bytes it keeps, the second refused without a trace
    assert first.status_code == 202
    with api.session() as session:
        seg_class = session.get(SegClass, uuid.UUID(first.json()["id"]))
        assert seg_class is not None and seg_class.upload_bytes == size
    body = assert_over_lasting_quota(second)
    assert f"keep {size:,} bytes" in str(body["detail"])
    assert count(api, SegClass) == 1

    # and: deleting the class frees its bytes
    assert api.alice.delete(f"/v1/classes/{first.json()['id']}").status_code == 204
    assert api.alice.post("/v1/classes", files=files, data=class_form()).status_code == 202


def test_a_trainings_validation_set_counts_as_stored_upload_bytes(make_api: ApiFactory) -> None:
    # given: alice keeps one class's upload already, and a finished class to train on
    files = pair()
    image, mask = encode(photo()), encode(photo().convert("L").point(lambda v: 1 if v > 99 else 0))
    validation = [("val_images", ("v.png", image, "")), ("val_masks", ("v.png", mask, ""))]
    api = make_api(
        quota_upload_bytes=upload_bytes(files) + upload_bytes(validation) - 1, **NO_RATE_LIMITS
    )
    assert api.alice.post("/v1/classes", files=files, data=class_form()).status_code == 202
    dog, _ = add_class(api, owner_id=api.alice_id, status="succeeded")
    request = {"request": f'{{"class_ids": ["{dog}"], "architecture": "deeplabv3"}}'}

    # when: a training would keep a validation set that passes the quota by one byte
    refused = api.alice.post("/v1/trainings", data=request, files=validation)

    # then
    assert_over_lasting_quota(refused)
    assert count(api, Training) == 0
    assert api.blobs("trainings/") == []


@pytest.mark.parametrize("setting", ["quota_concurrent_jobs", "quota_upload_bytes"])
def test_a_quota_of_zero_is_no_quota(make_api: ApiFactory, setting: str) -> None:
    api = make_api(**{setting: 0, "quota_samples_per_class": 0}, **NO_RATE_LIMITS)
    if setting == "quota_concurrent_jobs":
        for _ in range(6):
            add_class(api, owner_id=api.alice_id, status="queued")

    response = api.alice.post("/v1/classes", files=pair(), data=class_form(num_samples=900))

    assert response.status_code == 202, response.text


# --- what the SDK makes of a quota ------------------------------------------------------------


def sdk_for(api: Api, name: str, sleep: Callable[[float], None]) -> Client:
    """The real SDK talking to the app in-process as `name`, waiting through `sleep`."""
    app = api.anonymous

    def handle(request: httpx.Request) -> httpx.Response:
        answer = app.request(
            request.method,
            request.url.raw_path.decode(),
            headers=dict(request.headers),
            content=request.read(),
        )
        return httpx.Response(answer.status_code, headers=answer.headers, content=answer.content)

    return Client(
        "http://testserver", api.keys[name], transport=httpx.MockTransport(handle), sleep=sleep
    )


def test_the_sdk_gives_up_at_once_on_a_quota_that_waiting_cannot_lift(
    make_api: ApiFactory,
) -> None:
    # given: a per-class samples quota of 2
    api = make_api(quota_samples_per_class=2, **NO_RATE_LIMITS)
    sleeps: list[float] = []
    image, mask = pair()[0][1][1], pair()[1][1][1]

    # when: the SDK asks for 3 samples
    with sdk_for(api, "alice", sleeps.append) as client, pytest.raises(OverQuota) as refused:
        client.create_class("dog", [image], [mask], num_samples=3)

    # then: it raises without waiting or trying again
    assert sleeps == []
    assert "quota of 2 per class" in str(refused.value)
    assert count(api, SegClass) == 0


def test_the_sdk_waits_out_the_concurrent_jobs_quota(make_api: ApiFactory) -> None:
    # given: a quota of one running job, taken; it finishes while the SDK waits
    api = make_api(quota_concurrent_jobs=1, **NO_RATE_LIMITS)
    _, running_job = add_class(api, owner_id=api.alice_id, status="running")
    sleeps: list[float] = []

    def finish_the_running_job(seconds: float) -> None:
        sleeps.append(seconds)
        set_job(api, running_job, status="succeeded")

    image, mask = pair()[0][1][1], pair()[1][1][1]
    with sdk_for(api, "alice", finish_the_running_job) as client:
        # when
        created = client.create_class("dog", [image], [mask], num_samples=2)

    # then: one wait of the Retry-After the quota asked for, then the class was created
    assert sleeps == [30]
    assert created.status == "queued"
