"""The SDK's requests against a mock service: retries and their waits, errors, pagination,
idempotency keys, waiting on a class, trainings (their weights and predictions) and keys."""

from __future__ import annotations

import json
import os
import uuid
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime
from pathlib import Path

import httpx
import pytest

from aligndiff_client import (
    ApiError,
    Conflict,
    ConnectionFailed,
    JobFailed,
    KeyCreated,
    KeyInfo,
    NotFound,
    RateLimited,
    Unauthorized,
    ValidationFailed,
    WaitTimeout,
)
from tests.client_support import (
    NOW,
    answers,
    class_body,
    job_body,
    key_body,
    mock_client,
    problem,
    report_body,
    sample_body,
    training_body,
)
from tests.conftest import SHOTS_DIR

# --- retries -------------------------------------------------------------------------------


def test_a_429_is_retried_after_the_wait_its_retry_after_asks() -> None:
    # given: two 429s, one asking for 3 seconds and one for an HTTP date two minutes ahead
    later = format_datetime(datetime.now(UTC) + timedelta(seconds=120), usegmt=True)
    body = class_body()
    handler = answers(
        httpx.Response(429, headers={"Retry-After": "3"}),
        httpx.Response(429, headers={"Retry-After": later}),
        httpx.Response(200, json=body),
    )
    with mock_client(handler) as (client, recorder):
        # when
        found = client.get_class(body["id"])

    # then: the class comes back after exactly those waits
    assert str(found.id) == body["id"]
    assert len(recorder.requests) == 3
    assert recorder.sleeps[0] == 3
    assert 115 < recorder.sleeps[1] <= 120


def test_a_5xx_is_retried_with_exponential_backoff_until_it_succeeds() -> None:
    body = class_body()
    handler = answers(
        httpx.Response(503),
        httpx.Response(500, text="oops"),
        httpx.Response(502),
        httpx.Response(200, json=body),
    )
    with mock_client(handler) as (client, recorder):
        found = client.get_class(body["id"])

    assert str(found.id) == body["id"]
    assert recorder.sleeps == [0.5, 1.0, 2.0]


def test_connection_errors_are_retried_like_5xx() -> None:
    body = class_body()
    handler = answers(
        httpx.ConnectError("refused"), httpx.ReadTimeout("slow"), httpx.Response(200, json=body)
    )
    with mock_client(handler) as (client, recorder):
        client.get_class(body["id"])

    assert recorder.sleeps == [0.5, 1.0]


def test_retries_stop_after_max_retries_with_the_last_error() -> None:
    with (
        mock_client(lambda _: problem(503, "database down"), max_retries=2) as (client, recorder),
        pytest.raises(ApiError) as raised,
    ):
        client.get_class(uuid.uuid4())

    assert raised.value.status == 503 and raised.value.detail == "database down"
    assert len(recorder.requests) == 3 and len(recorder.sleeps) == 2


def test_an_unreachable_service_raises_connection_failed_after_the_retries() -> None:
    def refuse(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("connection refused")

    with (
        mock_client(refuse, max_retries=3) as (client, recorder),
        pytest.raises(ConnectionFailed, match="after 4 tries: connection refused"),
    ):
        client.get_class(uuid.uuid4())
    assert len(recorder.requests) == 4


def test_a_retry_after_longer_than_the_limit_is_raised_not_waited_for() -> None:
    quota = problem(429, "daily quota used")
    quota.headers["Retry-After"] = "86400"
    handler = answers(quota)
    with mock_client(handler) as (client, recorder), pytest.raises(RateLimited) as raised:
        client.get_class(uuid.uuid4())

    assert raised.value.retry_after == 86400 and raised.value.detail == "daily quota used"
    assert recorder.sleeps == []


@pytest.mark.parametrize(
    ("status", "error"),
    [
        (400, ApiError),
        (401, Unauthorized),
        (404, NotFound),
        (409, Conflict),
        (422, ValidationFailed),
    ],
)
def test_other_4xx_are_raised_at_once_as_typed_errors(status: int, error: type[ApiError]) -> None:
    with (
        mock_client(answers(problem(status, "no can do"))) as (client, recorder),
        pytest.raises(error) as raised,
    ):
        client.get_class(uuid.uuid4())

    assert raised.value.status == status and raised.value.detail == "no can do"
    assert len(recorder.requests) == 1 and recorder.sleeps == []


def test_a_retried_delete_that_finds_the_class_gone_succeeds() -> None:
    # given: the first DELETE is done but its answer lost; the retry finds nothing
    handler = answers(httpx.ReadTimeout("answer lost"), problem(404, "class not found"))
    with mock_client(handler) as (client, recorder):
        client.delete_class(uuid.uuid4())

    assert [r.method for r in recorder.requests] == ["DELETE", "DELETE"]


def test_a_delete_of_a_missing_class_is_not_found() -> None:
    with (
        mock_client(answers(problem(404, "class not found"))) as (client, _),
        pytest.raises(NotFound),
    ):
        client.delete_class(uuid.uuid4())


# --- errors --------------------------------------------------------------------------------


def test_a_validation_problem_carries_each_field_and_message() -> None:
    errors = [{"field": "masks[0]", "message": "has no foreground pixel"}]
    handler = answers(problem(422, "the uploaded shots are not valid", errors=errors))
    with mock_client(handler) as (client, _), pytest.raises(ValidationFailed) as raised:
        client.create_class("dog", [b"img"], [b"mask"])

    assert raised.value.errors == errors
    assert raised.value.title == "Unprocessable Content"
    assert str(raised.value) == (
        "422 Unprocessable Content: the uploaded shots are not valid "
        "(masks[0]: has no foreground pixel)"
    )


def test_an_error_body_that_is_not_json_still_raises_with_its_text() -> None:
    page = "<html><body><h1>502 Bad Gateway</h1>\n nginx</body></html>"
    with (
        mock_client(answers(httpx.Response(404, text=page))) as (client, _),
        pytest.raises(NotFound) as raised,
    ):
        client.get_class(uuid.uuid4())

    assert raised.value.title == "Not Found"
    assert "502 Bad Gateway" in raised.value.detail


# --- idempotency ---------------------------------------------------------------------------


def test_create_class_sends_one_idempotency_key_on_every_retry_of_its_post() -> None:
    # given: the first POST times out, the second meets a 503
    created = class_body(status="queued")
    handler = answers(
        httpx.ReadTimeout("slow"), httpx.Response(503), httpx.Response(202, json=created)
    )
    image, mask = SHOTS_DIR / "dog" / "1.jpg", SHOTS_DIR / "dog" / "1.png"
    with mock_client(handler) as (client, recorder):
        # when
        answer = client.create_class(
            "dog", [image], [mask], prompts=["a dog on grass"], num_samples=2, seed=3
        )

    # then: the same generated key went with all three, with the same body
    assert str(answer.id) == created["id"] and answer.status == "queued"
    keys = {r.headers["Idempotency-Key"] for r in recorder.requests}
    assert len(keys) == 1 and uuid.UUID(keys.pop())
    first = recorder.requests[0]
    assert first.method == "POST" and first.url.path == "/v1/classes"
    assert first.headers["Authorization"] == "Bearer adk_test"
    assert first.headers["Content-Type"].startswith("multipart/form-data")
    body = first.content
    assert image.read_bytes() in body and mask.read_bytes() in body
    for part in (
        b'name="images"; filename="1.jpg"',
        b'name="masks"; filename="1.png"',
        b"a dog on grass",
        b'name="num_samples"\r\n\r\n2',
        b'name="seed"\r\n\r\n3',
    ):
        assert part in body


def test_a_given_idempotency_key_is_sent_and_each_call_gets_its_own_otherwise() -> None:
    job = job_body(status="cancelled")
    handler = answers(*(httpx.Response(202, json=job) for _ in range(3)))
    with mock_client(handler) as (client, recorder):
        client.cancel_job(job["id"], idempotency_key="cancel-1")
        client.cancel_job(job["id"])
        client.retry_job(job["id"])

    keys = [r.headers["Idempotency-Key"] for r in recorder.requests]
    assert keys[0] == "cancel-1" and len(set(keys)) == 3
    assert [r.url.path for r in recorder.requests] == [
        f"/v1/jobs/{job['id']}/cancel",
        f"/v1/jobs/{job['id']}/cancel",
        f"/v1/jobs/{job['id']}/retry",
    ]


# --- pagination ----------------------------------------------------------------------------


def test_samples_iterates_every_page_exactly_once() -> None:
    # given: five samples served two per page
    bodies = [sample_body(i) for i in range(5)]
    class_id = uuid.uuid4()

    def pages(request: httpx.Request) -> httpx.Response:
        start = int(request.url.params.get("cursor", "0"))
        limit = int(request.url.params["limit"])
        end = start + limit
        cursor = str(end) if end < len(bodies) else None
        return httpx.Response(200, json={"items": bodies[start:end], "next_cursor": cursor})

    with mock_client(pages) as (client, recorder):
        # when
        found = list(client.samples(class_id, accepted=True, min_clip_score=20, page_size=2))

    # then
    assert [s.index for s in found] == [0, 1, 2, 3, 4]
    assert [r.url.params.get("cursor") for r in recorder.requests] == [None, "2", "4"]
    for request in recorder.requests:
        assert request.url.path == f"/v1/classes/{class_id}/samples"
        assert request.url.params["accepted"] == "true"
        assert request.url.params["min_clip_score"] == "20"


def test_lists_fetch_pages_only_as_they_are_consumed() -> None:
    first = {"items": [job_body(), job_body()], "next_cursor": "next"}
    with mock_client(answers(httpx.Response(200, json=first))) as (client, recorder):
        jobs = client.jobs(status="running", kind="synthesis")
        assert recorder.requests == []
        next(jobs)

    assert len(recorder.requests) == 1
    assert dict(recorder.requests[0].url.params) == {
        "limit": "50",
        "status": "running",
        "kind": "synthesis",
    }


# --- models --------------------------------------------------------------------------------


def test_fields_and_values_a_newer_server_adds_do_not_break_the_client() -> None:
    body = class_body(status="paused", stage="upscaling", priority=3)
    with mock_client(answers(httpx.Response(200, json=body))) as (client, _):
        found = client.get_class(body["id"])

    assert found.status == "paused" and found.stage == "upscaling"
    assert found.model_extra == {"priority": 3}


def test_report_reads_the_class_s_counts_histograms_and_trainings() -> None:
    # given: a report with a field and a histogram this client does not know of
    body = report_body()
    body["histograms"]["hue_shift"] = {"edges": [0, 1], "counts": [4]}
    body["coverage"] = 0.5
    with mock_client(answers(httpx.Response(200, json=body))) as (client, recorder):
        # when
        report = client.report(body["class_id"])

    # then
    assert recorder.requests[0].url.path == f"/v1/classes/{body['class_id']}/report"
    assert str(report.class_id) == body["class_id"]
    assert report.counts.by_prompt_kind["inversion"].share == 0.8
    assert report.counts.by_mask_source["human"].share is None
    assert report.counts.rejected_by == {"ood": 2, "similarity": 1, "user": 1}
    assert report.histograms["clip_score"].total == 10
    assert report.histograms["hue_shift"].counts == [4]
    assert report.acceptance is not None and report.acceptance.shot_similarity == 0.61
    assert report.tuning is not None and [t.bg_lambda for t in report.tuning] == [0.3, 0.6]
    assert [t.optimistic for t in report.trainings] == [False, True]
    assert report.trainings[0].baseline_miou == 0.58
    assert report.model_extra == {"coverage": 0.5}


# --- waiting -------------------------------------------------------------------------------


def test_wait_polls_until_the_class_succeeds() -> None:
    states = [
        class_body(status="queued"),
        class_body(status="running", stage="sampling", progress=0.4),
        class_body(status="succeeded", progress=1.0, num_samples_done=2),
    ]
    with mock_client(answers(*(httpx.Response(200, json=s) for s in states))) as (client, rec):
        final = client.wait(uuid.uuid4(), poll_interval=0.25, progress=False)

    assert final.status == "succeeded" and final.num_samples_done == 2
    assert rec.sleeps == [0.25, 0.25]


def test_wait_raises_the_services_error_when_the_class_fails() -> None:
    failed = class_body(status="failed", error="inversion diverged")
    with (
        mock_client(answers(httpx.Response(200, json=failed))) as (client, _),
        pytest.raises(JobFailed, match="failed: inversion diverged") as raised,
    ):
        client.wait(failed["id"], progress=False)

    assert raised.value.error == "inversion diverged"
    assert str(raised.value.resource.id) == failed["id"]


def test_wait_raises_when_the_class_is_cancelled() -> None:
    cancelled = class_body(status="cancelled")
    with (
        mock_client(answers(httpx.Response(200, json=cancelled))) as (client, _),
        pytest.raises(JobFailed, match="cancelled"),
    ):
        client.wait(cancelled["id"], progress=False)


def test_wait_gives_up_after_its_timeout() -> None:
    running = class_body(status="running", progress=0.5)
    with (
        mock_client(answers(httpx.Response(200, json=running))) as (client, _),
        pytest.raises(WaitTimeout, match="still running"),
    ):
        client.wait(running["id"], timeout=0, progress=False)


# --- trainings -----------------------------------------------------------------------------


def test_train_posts_the_training_and_get_training_reads_its_metrics() -> None:
    class_ids = [uuid.uuid4(), uuid.uuid4()]
    queued = training_body(class_ids=[str(c) for c in class_ids], architecture="segformer")
    done = {
        **queued,
        "status": "succeeded",
        "progress": 1.0,
        "metrics": {
            "per_class_iou": {"dog": 0.61},
            "miou": 0.61,
            "eval_set": "validation",
            "baseline": {"per_class_iou": {"dog": 0.42}, "miou": 0.42},
        },
    }
    handler = answers(
        httpx.Response(503), httpx.Response(202, json=queued), httpx.Response(200, json=done)
    )
    with mock_client(handler) as (client, recorder):
        training = client.train(
            class_ids, architecture="segformer", steps=200, batch_size=4, compare_baseline=True
        )
        finished = client.get_training(training.id)

    post = recorder.requests[0]
    assert post.method == "POST" and post.url.path == "/v1/trainings"
    assert post.headers["Idempotency-Key"] == recorder.requests[1].headers["Idempotency-Key"]
    assert httpx.Response(200, content=post.content).json() == {
        "class_ids": [str(c) for c in class_ids],
        "architecture": "segformer",
        "steps": 200,
        "batch_size": 4,
        "use_synthetic": True,
        "copy_paste": True,
        "compare_baseline": True,
    }
    assert training.status == "queued"
    assert recorder.requests[2].url.path == f"/v1/trainings/{training.id}"
    assert finished.metrics is not None and finished.metrics.miou == 0.61
    assert finished.metrics.baseline is not None and finished.metrics.baseline.miou == 0.42


def test_train_with_a_validation_set_posts_it_as_multipart() -> None:
    class_id = uuid.uuid4()
    queued = training_body(class_ids=[str(class_id)])
    handler = answers(httpx.Response(503), httpx.Response(202, json=queued))
    image, labels = SHOTS_DIR / "dog" / "1.jpg", b"\x89PNG label map"
    with mock_client(handler) as (client, recorder):
        training = client.train(
            [class_id], steps=10, validation_images=[image], validation_masks=[labels]
        )

    assert training.status == "queued"
    first, second = recorder.requests
    assert first.headers["Idempotency-Key"] == second.headers["Idempotency-Key"]
    assert first.url.path == "/v1/trainings"
    assert first.headers["Content-Type"].startswith("multipart/form-data")
    request = {
        "class_ids": [str(class_id)],
        "architecture": "deeplabv3",
        "use_synthetic": True,
        "copy_paste": True,
        "compare_baseline": False,
        "steps": 10,
    }
    for part in (
        b'name="request"\r\n\r\n' + json.dumps(request).encode(),
        b'name="val_images"; filename="1.jpg"',
        image.read_bytes(),
        b'name="val_masks"; filename="mask-0.png"',
        labels,
    ):
        assert part in first.content


def test_list_trainings_iterates_every_page() -> None:
    bodies = [training_body(), training_body(), training_body()]
    handler = answers(
        httpx.Response(200, json={"items": bodies[:2], "next_cursor": "c2"}),
        httpx.Response(200, json={"items": bodies[2:], "next_cursor": None}),
    )
    with mock_client(handler) as (client, recorder):
        found = list(client.list_trainings(page_size=2))

    assert [str(t.id) for t in found] == [b["id"] for b in bodies]
    assert [r.url.path for r in recorder.requests] == ["/v1/trainings"] * 2
    assert [r.url.params.get("cursor") for r in recorder.requests] == [None, "c2"]


def test_predict_uploads_the_image_and_returns_the_label_mask(tmp_path: Path) -> None:
    # given: a service busy once (503, Retry-After), then answering the mask
    training_id = uuid.uuid4()
    mask = b"\x89PNG label mask"
    handler = answers(
        httpx.Response(503, headers={"Retry-After": "2"}),
        httpx.Response(200, content=mask, headers={"Content-Type": "image/png"}),
    )
    image = SHOTS_DIR / "dog" / "1.jpg"
    with mock_client(handler) as (client, recorder):
        # when
        found = client.predict(training_id, image, tmp_path / "out" / "mask.png")

    # then: the image went as the multipart field `image`, the mask came back and was saved
    assert found == mask and (tmp_path / "out" / "mask.png").read_bytes() == mask
    post = recorder.requests[-1]
    assert post.method == "POST" and post.url.path == f"/v1/trainings/{training_id}/predict"
    assert b'name="image"; filename="1.jpg"' in post.content
    assert image.read_bytes() in post.content
    assert recorder.sleeps == [2.0]


def test_download_weights_streams_the_zip_to_a_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # given: a training's weights, and no destination named
    monkeypatch.chdir(tmp_path)
    training_id = uuid.uuid4()
    weights = b"PK" + bytes(50_000)
    handler = answers(httpx.Response(200, content=weights))
    with mock_client(handler) as (client, recorder):
        # when
        path = client.download_weights(training_id, progress=False)

    # then: the file named after the training, nothing left beside it
    assert path == Path(f"{training_id}-weights.zip")
    assert path.read_bytes() == weights and sorted(os.listdir(tmp_path)) == [path.name]
    assert recorder.requests[0].url.path == f"/v1/trainings/{training_id}/weights"


def test_download_weights_of_an_unfinished_training_is_a_conflict(tmp_path: Path) -> None:
    handler = answers(problem(409, "the training is running"))
    with mock_client(handler) as (client, _), pytest.raises(Conflict, match="running"):
        client.download_weights(uuid.uuid4(), tmp_path / "w.zip", progress=False)

    assert list(tmp_path.iterdir()) == []


# --- keys ----------------------------------------------------------------------------------


def test_create_key_posts_it_and_returns_its_secret() -> None:
    # given: a first try over the rate limit, then the key created
    owner_id = uuid.uuid4()
    created = {**key_body(name="ci", admin=True, owner_id=str(owner_id)), "key": "adk_secret"}
    del created["last_used_at"], created["revoked_at"]
    handler = answers(
        httpx.Response(429, headers={"Retry-After": "1"}), httpx.Response(201, json=created)
    )
    with mock_client(handler) as (client, recorder):
        # when
        key = client.create_key("ci", admin=True, owner_id=owner_id)

    # then: the same body both times, and the secret in the answer
    first, second = recorder.requests
    assert first.method == "POST" and first.url.path == "/v1/keys"
    assert json.loads(first.content) == {"name": "ci", "admin": True, "owner_id": str(owner_id)}
    assert second.content == first.content and recorder.sleeps == [1.0]
    assert isinstance(key, KeyCreated)
    assert key.key == "adk_secret" and key.owner_id == owner_id and key.admin


def test_list_keys_reads_every_page_without_secrets() -> None:
    used = key_body(last_used_at=NOW)
    revoked = key_body(name="old", revoked_at=NOW)
    handler = answers(
        httpx.Response(200, json={"items": [used], "next_cursor": "k"}),
        httpx.Response(200, json={"items": [revoked], "next_cursor": None}),
    )
    with mock_client(handler) as (client, recorder):
        keys = list(client.list_keys())

    assert [type(k) for k in keys] == [KeyInfo, KeyInfo]
    assert keys[0].last_used_at is not None and keys[0].revoked_at is None
    assert keys[1].name == "old" and keys[1].revoked_at is not None
    assert [r.url.path for r in recorder.requests] == ["/v1/keys"] * 2


def test_revoke_key_deletes_it_and_a_retry_that_finds_it_gone_succeeds() -> None:
    key_id = uuid.uuid4()
    handler = answers(httpx.ReadError("reset"), problem(404, "key not found"))
    with mock_client(handler) as (client, recorder):
        client.revoke_key(key_id)

    assert [(r.method, r.url.path) for r in recorder.requests] == [
        ("DELETE", f"/v1/keys/{key_id}")
    ] * 2
