"""The hot reads answered before FastAPI (`service.api.fast_reads`): the same answers as the
FastAPI routes give, in every parameter form, on SQLite and PostgreSQL, through the worker
thread and through the async pool; what they keep (metrics, owner isolation, cursors)."""

from __future__ import annotations

import uuid
from datetime import timedelta
from typing import Any

import pytest
from fastapi.testclient import TestClient
from pydantic import BaseModel
from sqlalchemy import update

from service.api.routes.admin_access import api_access
from service.models import SegClass
from service.pagination import encode_cursor
from service.schemas import ClassPublic, JobPublic, Page, SamplePublic
from tests.api_support import Api, add_class, add_sample, sign_in

pytest_plugins = ["tests.api_support"]


@pytest.fixture
def world(api: Api) -> dict[str, Any]:
    """Two of Alice's classes (one with samples, tuned, one still queued) and one of Bob's."""
    dog, dog_job = add_class(api, owner_id=api.alice_id, status="running", age=timedelta(5))
    cat, _ = add_class(api, owner_id=api.alice_id, name="cat")
    bobs, _ = add_class(api, owner_id=api.bob_id, name="bird", status="succeeded")
    for index in range(7):
        add_sample(api, dog, index, accepted=index % 3 != 0, clip_score=4.5 * index)
    add_sample(api, dog, 7, finalized=False)
    trial = {"bg_lambda": 0.5, "score": 0.7, "prototype_similarity": 0.6,
             "shot_similarity": 0.8, "steps": 40, "loss": None}  # fmt: skip
    with api.session() as session:
        session.execute(
            update(SegClass).where(SegClass.id == dog).values(tuning=[trial], bg_lambda=0.5)
        )
        session.commit()
    return {"dog": dog, "dog_job": dog_job, "cat": cat, "bobs": bobs}


def _paths(world: dict[str, Any]) -> list[tuple[str, type[BaseModel]]]:
    dog, cat, bobs = world["dog"], world["cat"], world["bobs"]
    samples = f"/v1/classes/{dog}/samples"
    return [
        (samples, Page[SamplePublic]),
        (f"{samples}?limit=3", Page[SamplePublic]),
        (f"{samples}?limit=2&cursor={encode_cursor([2])}", Page[SamplePublic]),
        (f"{samples}?accepted=true&min_clip_score=9", Page[SamplePublic]),
        (f"{samples}?accepted=false", Page[SamplePublic]),
        (f"{samples}?min_clip_score=13.5&limit=200", Page[SamplePublic]),
        (f"/v1/classes/{cat}/samples", Page[SamplePublic]),  # no samples: still 200
        (f"/v1/classes/{bobs}/samples", Page[SamplePublic]),  # another owner's: 404
        (f"/v1/classes/{uuid.uuid4()}/samples", Page[SamplePublic]),
        (f"{samples}?cursor=not-a-cursor", Page[SamplePublic]),  # 400
        (f"{samples}?cursor={encode_cursor(['x'])}", Page[SamplePublic]),
        (f"/v1/classes/{dog}", ClassPublic),
        (f"/v1/classes/{cat}", ClassPublic),
        (f"/v1/classes/{bobs}", ClassPublic),
        ("/v1/classes", Page[ClassPublic]),
        ("/v1/classes?limit=1", Page[ClassPublic]),
        ("/v1/jobs", Page[JobPublic]),
        ("/v1/jobs?status=running&kind=synthesis", Page[JobPublic]),
        ("/v1/jobs?status=failed", Page[JobPublic]),
        ("/v1/jobs?limit=1", Page[JobPublic]),
        (f"/v1/jobs/{world['dog_job']}", JobPublic),
        (f"/v1/jobs/{uuid.uuid4()}", JobPublic),
    ]


def _both_ways(
    api: Api, client: TestClient, path: str, *, headers: dict[str, str] | None = None
) -> tuple[Any, Any]:
    """The answer to `path` from the fast path, then from FastAPI's route alone."""
    fast = client.get(path, headers=headers)
    api.app.state.fast_reads = False
    try:
        routed = client.get(path, headers=headers)
    finally:
        api.app.state.fast_reads = True
    return fast, routed


def _same(fast: Any, routed: Any, model: type[BaseModel]) -> None:
    assert (fast.status_code, fast.headers["content-type"]) == (
        routed.status_code,
        routed.headers["content-type"],
    )
    assert fast.json() == routed.json()
    if fast.status_code == 200:
        # Exactly the model's fields, typed and formatted as the model writes them.
        body = fast.json()
        assert model.model_validate(body).model_dump(mode="json") == body


def test_the_fast_path_answers_as_the_routes_do(api: Api, world: dict[str, Any]) -> None:
    for client in (api.alice, api.admin):
        for path, model in _paths(world):
            fast, routed = _both_ways(api, client, path)
            _same(fast, routed, model)
    page = api.alice.get(f"/v1/classes/{world['dog']}/samples?limit=3").json()
    assert [s["index"] for s in page["items"]] == [0, 1, 2]
    assert page["items"][0]["image_url"] == (
        f"http://testserver/v1/samples/{page['items'][0]['id']}/image"
    )
    assert api.alice.get(f"/v1/classes/{world['bobs']}").status_code == 404
    assert api.bob.get(f"/v1/classes/{world['dog']}/samples").status_code == 404
    assert api.admin.get(f"/v1/classes/{world['bobs']}").status_code == 200
    dog = api.alice.get(f"/v1/classes/{world['dog']}").json()
    assert dog["tuning"][0]["steps"] == 40 and dog["status"] == "running"
    assert api.alice.get(f"/v1/classes/{world['cat']}").json()["status"] == "queued"
    assert {c["name"] for c in api.alice.get("/v1/classes").json()["items"]} == {"dog", "cat"}


@pytest.mark.parametrize(
    "query",
    [
        "limit=050",  # valid, not in the plain form: FastAPI reads it
        "accepted=1",
        "accepted=yes",
        "min_clip_score=1e1",
        "limit=2&limit=3",  # repeated
        "limit=0",  # invalid: FastAPI's 422
        "limit=201",
        "limit=abc",
        "min_clip_score=-1",
        "min_clip_score=nan",
        "accepted=maybe",
        "unknown=1",
    ],
)
def test_other_parameter_forms_get_fastapis_answer(
    api: Api, world: dict[str, Any], query: str
) -> None:
    path = f"/v1/classes/{world['dog']}/samples?{query}"
    fast, routed = _both_ways(api, api.alice, path)
    _same(fast, routed, Page[SamplePublic])
    if query == "limit=0":
        assert fast.status_code == 422
        assert fast.headers["content-type"] == "application/problem+json"
        assert fast.json()["errors"][0]["field"] == "limit"


def test_other_path_and_filter_forms(api: Api, world: dict[str, Any]) -> None:
    dog = str(world["dog"])
    for path in (
        f"/v1/classes/{dog.upper()}",
        f"/v1/classes/{dog.replace('-', '')}",
        "/v1/classes/not-a-uuid",
        f"/v1/classes/{dog}/samples?limit=",
        "/v1/jobs?status=lost",
        "/v1/jobs?kind=",
    ):
        fast, routed = _both_ways(api, api.alice, path)
        _same(fast, routed, ClassPublic if "samples" not in path else Page[SamplePublic])
    assert api.alice.get("/v1/jobs?status=lost").status_code == 422


def test_keys_and_metrics_still_apply(api: Api, world: dict[str, Any]) -> None:
    path = f"/v1/classes/{world['dog']}/samples"
    assert api.anonymous.get(path).status_code == 401
    wrong = api.anonymous.get(path, headers={"Authorization": "Bearer adk_wrong"})
    assert wrong.status_code == 401
    for _ in range(3):
        assert api.alice.get(path).status_code == 200
    api.bob.get(path)
    metrics = api.app.state.metrics.exposition().decode()
    labels = 'method="GET",route="/v1/classes/{class_id}/samples"'
    assert f'aligndiff_http_requests_total{{{labels},status="200"}} 3.0' in metrics
    assert f'aligndiff_http_requests_total{{{labels},status="404"}} 1.0' in metrics
    assert f'aligndiff_http_requests_total{{{labels},status="401"}} 2.0' in metrics


def test_a_rate_limited_key_is_refused_before_the_read(make_api: Any) -> None:
    api = make_api(rate_limit_per_second=0.001, rate_limit_burst=2, rate_limit_url="memory://")
    statuses = [api.alice.get("/v1/classes").status_code for _ in range(3)]
    assert statuses == [200, 200, 429]


def test_a_server_reads_through_the_async_pool(
    api: Api, world: dict[str, Any], database_url: str
) -> None:
    """Under a server's lifespan (as uvicorn runs it), reads on PostgreSQL go to the async
    pool, and answer as the worker-thread path does."""
    headers = {"Authorization": f"Bearer {api.keys['alice']}"}
    with TestClient(api.app, headers=headers) as served:
        pooled = api.app.state.reads._pool
        assert (pooled is not None) == database_url.startswith("postgresql")
        for path, model in _paths(world):
            fast = served.get(path)
            _same(fast, api.alice.get(path), model)  # the thread path, per-request loops
        if pooled is not None:
            assert pooled.get_stats()["requests_num"] >= len(_paths(world))
    assert api.app.state.reads._pool is None  # closed with the server


def test_sample_blobs_come_the_same_both_ways(api: Api, world: dict[str, Any]) -> None:
    page = api.alice.get(f"/v1/classes/{world['dog']}/samples?limit=1").json()
    sample_id = page["items"][0]["id"]
    for which in ("image", "mask"):
        path = f"/v1/samples/{sample_id}/{which}"
        fast, routed = _both_ways(api, api.alice, path)
        assert fast.status_code == routed.status_code == 200
        assert fast.content == routed.content and fast.content.startswith(b"\x89PNG")
        for header in ("content-type", "content-disposition", "content-length"):
            assert fast.headers[header] == routed.headers[header]
        assert int(fast.headers["content-length"]) == len(fast.content)
        for client in (api.bob, api.anonymous):
            fast, routed = _both_ways(api, client, path)
            assert fast.status_code == routed.status_code == (404 if client is api.bob else 401)
            assert fast.json() == routed.json()
    fast, routed = _both_ways(api, api.alice, f"/v1/samples/{sample_id.upper()}/image")
    assert fast.content == routed.content


DASHBOARD_POLLS = [
    "/admin/api/jobs",
    "/admin/api/jobs?status=running&kind=synthesis",
    "/admin/api/jobs?status=&kind=&limit=1",
    "/admin/api/jobs?limit=1000",
    "/admin/api/jobs?limit=01",  # not in the plain form: FastAPI reads it
    "/admin/api/jobs?status=lost",  # 422
    "/admin/api/jobs?limit=0",
    "/admin/api/jobs?limit=1001",
]


def test_the_dashboard_s_poll_answers_as_its_route_does(
    api: Api, world: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    # given: the page's session, and the ETag of what it shows
    browser = sign_in(api, api.keys["admin"])
    etag = browser.get("/admin/api/jobs").headers["etag"]
    polls = [
        *((path, {}) for path in DASHBOARD_POLLS),
        ("/admin/api/jobs", {"If-None-Match": etag}),
        ("/admin/api/jobs?limit=1", {"If-None-Match": etag}),
    ]

    # then: each poll is answered alike by the fast path and by FastAPI's route
    for path, headers in polls:
        fast, routed = _both_ways(api, browser, path, headers=headers)
        assert (fast.status_code, fast.content) == (routed.status_code, routed.content), path
        for header in ("content-type", "etag", "cache-control"):
            assert fast.headers.get(header) == routed.headers.get(header), (path, header)
    assert browser.get("/admin/api/jobs", headers={"If-None-Match": etag}).status_code == 304
    assert browser.get("/admin/api/jobs?status=lost").status_code == 422

    # and: a Bearer key, no session, a user's key and a revoked key's session are FastAPI's
    # to answer, as before
    answers = {
        "admin key": api.admin.get("/admin/api/jobs"),
        "user key": api.alice.get("/admin/api/jobs"),
        "no session": api.anonymous.get("/admin/api/jobs"),
    }
    assert {name: answer.status_code for name, answer in answers.items()} == {
        "admin key": 200, "user key": 403, "no session": 401,
    }  # fmt: skip

    # and: the session's polls never reached FastAPI's route (it would fail now)
    def unreachable() -> None:
        raise AssertionError("FastAPI's route answered the page's poll")

    api.app.dependency_overrides[api_access] = unreachable
    monkeypatch.setattr(api.app.state, "fast_reads", True)
    try:
        assert browser.get("/admin/api/jobs").status_code == 200
        assert browser.get("/admin/api/jobs", headers={"If-None-Match": etag}).status_code == 304
    finally:
        api.app.dependency_overrides.clear()
