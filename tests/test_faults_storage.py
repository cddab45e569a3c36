"""The S3 endpoint goes away: uploads answer 503 and leave no rows; once it is back, uploads
work again by themselves, and the sweeper deletes the blobs a failed upload left behind, and
nothing any row names. The endpoint is moto's S3 server behind a proxy that can cut it off."""

from __future__ import annotations

import time
from collections.abc import Iterator
from datetime import timedelta

import boto3
import pytest

from service.contexts import sweeper
from service.db import session_scope
from service.models import utcnow
from service.queue import RecordingQueue
from service.s3 import S3Storage
from service.storage import StorageUnavailable
from tests.api_support import ApiFactory, class_form, shot_files
from tests.fault_support import AWS_TEST_ENVIRONMENT, CuttableProxy, moto_server

pytest_plugins = ["tests.api_support"]


@pytest.fixture
def s3_behind_proxy(monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[CuttableProxy, S3Storage]]:
    """A bucket on moto, and a store that reaches it through a cuttable proxy."""
    for name, value in AWS_TEST_ENVIRONMENT.items():
        monkeypatch.setenv(name, value)
    with moto_server() as endpoint:
        boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1").create_bucket(
            Bucket="blobs"
        )
        proxy = CuttableProxy(int(endpoint.rsplit(":", 1)[1]))
        try:
            yield (
                proxy,
                S3Storage("blobs", "aligndiff", endpoint_url=f"http://127.0.0.1:{proxy.port}"),
            )
        finally:
            proxy.close()


@pytest.mark.parametrize("database_url", ["postgresql"], indirect=True)
def test_uploads_fail_cleanly_while_s3_is_down_and_the_sweeper_removes_what_they_left(
    make_api: ApiFactory, s3_behind_proxy: tuple[CuttableProxy, S3Storage]
) -> None:
    proxy, storage = s3_behind_proxy
    api = make_api(storage=storage, rate_limit_per_second=0, job_rate_limit_per_minute=0)
    upload = {"data": class_form("dog", num_samples=2), "files": shot_files("dog", "albatross")}
    # NOTE: the session's PostgreSQL database may hold other tests' rows: compare, not count
    rows_before = api.work_rows()

    # given: the S3 endpoint is unreachable
    proxy.cut()
    # when: a class is uploaded
    began = time.monotonic()
    answer = api.alice.post("/v1/classes", **upload)  # type: ignore[arg-type]
    # then: 503 (problem+json, Retry-After), soon, and nothing is kept or queued
    assert answer.status_code == 503, answer.text
    assert time.monotonic() - began < 20
    assert answer.headers["content-type"].startswith("application/problem+json")
    assert answer.headers["retry-after"]
    assert api.work_rows() == rows_before
    assert api.queue.sent == []
    assert api.anonymous.get("/readyz").status_code == 503
    # ... and a sweep meanwhile fails without touching anything
    with pytest.raises(StorageUnavailable):
        sweeper.remove_orphaned_blobs(
            sessions=lambda: session_scope(api.app.state.session_factory),
            storage=storage,
            grace_seconds=0,
        )

    # given: the endpoint is back, and goes away again in the middle of an upload (after its
    # first 3 blobs are written)
    proxy.restore()
    proxy.cut_after(3, b"PUT ")
    answer = api.alice.post("/v1/classes", **upload)  # type: ignore[arg-type]
    # then: 503 again, still no rows; the blobs written before the cut stay (the upload could
    # not delete them either)
    assert answer.status_code == 503, answer.text
    assert api.work_rows() == rows_before
    proxy.restore()
    left_behind = api.blobs()
    assert len(left_behind) == 3, left_behind

    # when: the endpoint is back for good, and a class is uploaded
    answer = api.alice.post("/v1/classes", **upload)  # type: ignore[arg-type]
    # then: it is accepted, with no restart of anything
    assert answer.status_code == 202, answer.text
    class_id = answer.json()["id"]
    kept = sorted(set(api.blobs()) - set(left_behind))
    assert kept and all(key.startswith(f"classes/{class_id}/") for key in kept)

    # when: the sweeper runs, first while every blob is young (any could be in flight), then
    # once the grace period has passed
    def sweep(**when: object) -> sweeper.SweepReport:
        return sweeper.sweep(
            sessions=lambda: session_scope(api.app.state.session_factory),
            storage=storage,
            queue=RecordingQueue(),
            settings=api.settings,
            worker="test",
            **when,  # type: ignore[arg-type]
        )

    assert sweep().orphaned_blobs == []
    report = sweep(now=utcnow() + timedelta(seconds=2 * api.settings.orphan_grace_seconds))

    # then: exactly the failed upload's blobs are gone; the accepted class's all remain
    assert sorted(report.orphaned_blobs or []) == sorted(left_behind)
    assert sorted(api.blobs()) == kept
    assert api.alice.get(f"/v1/classes/{class_id}").status_code == 200
