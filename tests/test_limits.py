"""Per-key rate limits (in memory and shared through Redis, failing open when Redis is down),
the API key checked before an upload's body is read, and the metrics token."""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from fastapi.testclient import TestClient
from sqlalchemy import event

from service.app import create_app
from service.queue import RecordingQueue
from service.ratelimit import Bucket, MemoryRateLimiter, RedisRateLimiter
from service.settings import Settings
from tests.api_support import Api, ApiFactory, class_form, pair
from tests.fault_support import PrivateRedis, ServedApi, free_port

pytest_plugins = ["tests.api_support"]


def assert_rate_limited(response: httpx.Response, *, at_most: int) -> int:
    """A 429 problem answer whose Retry-After is whole seconds, 1..`at_most`; returns it."""
    assert response.status_code == 429, response.text
    assert response.headers["content-type"] == "application/problem+json"
    assert response.json()["status"] == 429 and "rate limit" in response.json()["detail"]
    retry_after = response.headers["retry-after"]
    assert retry_after.isdigit() and 1 <= int(retry_after) <= at_most, retry_after
    return int(retry_after)


# --- the bucket ----------------------------------------------------------------------------


def test_a_bucket_lets_a_burst_through_then_refills_at_its_rate() -> None:
    limiter, bucket = MemoryRateLimiter(), Bucket("requests", per_second=2.0, burst=3)

    burst = [limiter.hit_now(bucket, "key", now=100.0).allowed for _ in range(4)]
    refused = limiter.hit_now(bucket, "key", now=100.0)
    other_key = limiter.hit_now(bucket, "other", now=100.0)

    assert burst == [True, True, True, False]
    assert not refused.allowed and refused.retry_after == pytest.approx(0.5)
    assert refused.retry_after_header == "1"
    assert other_key.allowed
    # Half a second later one token is back, and only one.
    assert limiter.hit_now(bucket, "key", now=100.5).allowed
    assert not limiter.hit_now(bucket, "key", now=100.5).allowed
    # Idle long enough, the whole burst is back.
    assert all(limiter.hit_now(bucket, "key", now=110.0).allowed for _ in range(3))


# --- over the API (in memory: no Redis configured) -----------------------------------------


def test_a_key_over_its_rate_gets_429_with_retry_after_and_others_are_not_held(
    make_api: ApiFactory,
) -> None:
    api = make_api(rate_limit_per_second=0.5, rate_limit_burst=3)

    allowed = [api.alice.get("/v1/classes").status_code for _ in range(3)]
    refused = api.alice.get("/v1/classes")

    assert allowed == [200, 200, 200]
    assert_rate_limited(refused, at_most=2)
    # Another key has a bucket of its own; the probes have none.
    assert api.bob.get("/v1/classes").status_code == 200
    assert all(api.anonymous.get("/healthz").status_code == 200 for _ in range(5))
    assert all(api.anonymous.get("/readyz").status_code == 200 for _ in range(5))


def test_posts_that_queue_gpu_work_have_a_stricter_bucket_of_their_own(
    make_api: ApiFactory,
) -> None:
    api = make_api(job_rate_limit_per_minute=1, job_rate_limit_burst=2)

    created = [
        api.alice.post("/v1/classes", files=pair(), data=class_form()).status_code for _ in range(2)
    ]
    third = api.alice.post("/v1/classes", files=pair(), data=class_form())

    assert created == [202, 202]
    assert assert_rate_limited(third, at_most=60) > 50
    assert "queue GPU work" in third.json()["detail"]
    assert len(api.queue.sent) == 2
    # Reading is not held back by it, and nor is another key's work.
    assert api.alice.get("/v1/classes").status_code == 200
    assert api.bob.post("/v1/classes", files=pair(), data=class_form()).status_code == 202


def test_limits_of_zero_turn_rate_limiting_off(make_api: ApiFactory) -> None:
    api = make_api(rate_limit_per_second=0, job_rate_limit_per_minute=0)

    assert all(api.alice.get("/v1/jobs").status_code == 200 for _ in range(150))


# --- shared through Redis ------------------------------------------------------------------


@pytest.fixture
def private_redis(tmp_path: Path) -> Iterator[PrivateRedis]:
    with PrivateRedis.running(tmp_path) as redis:
        yield redis


def test_api_processes_on_one_redis_share_each_keys_bucket(
    make_api: ApiFactory, private_redis: PrivateRedis
) -> None:
    # given: two API processes ("replicas") on the same database and Redis
    api = make_api(rate_limit_url=private_redis.url, rate_limit_per_second=0.2, rate_limit_burst=4)
    replica = create_app(api.settings, queue=RecordingQueue())
    other = TestClient(replica, headers={"Authorization": f"Bearer {api.keys['alice']}"})
    assert isinstance(api.app.state.rate_limits.limiter, RedisRateLimiter)
    try:
        # when: alice spends her burst half on each
        spent = [client.get("/v1/classes").status_code for client in (api.alice, other) * 2]

        # then: either one refuses her next request; bob's bucket is whole
        assert spent == [200] * 4
        assert_rate_limited(api.alice.get("/v1/classes"), at_most=5)
        assert_rate_limited(other.get("/v1/classes"), at_most=5)
        assert api.bob.get("/v1/classes").status_code == 200
    finally:
        replica.state.engine.dispose()


def test_the_broker_redis_holds_the_buckets_when_no_rate_limit_url_is_set(
    make_api: ApiFactory, private_redis: PrivateRedis
) -> None:
    api = make_api(broker_url=private_redis.url, rate_limit_burst=2, rate_limit_per_second=0.1)

    assert [api.alice.get("/v1/jobs").status_code for _ in range(2)] == [200, 200]
    assert_rate_limited(api.alice.get("/v1/jobs"), at_most=10)
    assert any(key.startswith(b"aligndiff:ratelimit:") for key in private_redis_keys(private_redis))


def private_redis_keys(redis_server: PrivateRedis) -> list[bytes]:
    import redis

    client = redis.Redis.from_url(redis_server.url)
    try:
        return list(client.keys("*"))
    finally:
        client.close()


def test_a_redis_outage_lets_requests_through_with_a_warning_and_limits_resume_after(
    make_api: ApiFactory, private_redis: PrivateRedis, caplog: pytest.LogCaptureFixture
) -> None:
    # given: a burst of 2 kept in a Redis of the test's own
    api = make_api(rate_limit_url=private_redis.url, rate_limit_per_second=0.1, rate_limit_burst=2)
    limiter = api.app.state.rate_limits.limiter
    limiter.pause_seconds = 0.5  # how long Redis is left alone after it failed to answer
    assert [api.alice.get("/v1/jobs").status_code for _ in range(2)] == [200, 200]
    assert_rate_limited(api.alice.get("/v1/jobs"), at_most=10)

    # when: Redis goes away
    private_redis.stop()
    started = time.monotonic()
    with caplog.at_level(logging.WARNING, logger="service.ratelimit"):
        during = [api.alice.get("/v1/jobs").status_code for _ in range(10)]
    outage_seconds = time.monotonic() - started

    # then: every request is served, promptly, and the outage is logged
    assert during == [200] * 10
    assert outage_seconds < 5, outage_seconds
    assert any("rate limits are off" in r.getMessage() for r in caplog.records)

    # when: Redis is back (empty: it kept nothing), the limit holds again
    private_redis.start()
    time.sleep(limiter.pause_seconds)
    after = [api.alice.get("/v1/jobs").status_code for _ in range(3)]
    assert after == [200, 200, 429]


# --- the key is checked before the body is read ---------------------------------------------

BOUNDARY = "limits-test-boundary"
UPLOAD_BYTES = 48 * 1024 * 1024  # under the 64 MiB upload cap: only the key can refuse it


class StreamedUpload:
    """A multipart body of one huge image, sent chunked; counts the bytes handed to the
    client (what the server has read, plus at most what the sockets buffer)."""

    def __init__(self, size: int = UPLOAD_BYTES, chunk: int = 64 * 1024) -> None:
        self.size, self.chunk, self.yielded = size, chunk, 0

    def __iter__(self) -> Iterator[bytes]:
        head = (
            f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="images"; '
            'filename="big.jpg"\r\nContent-Type: image/jpeg\r\n\r\n'
        ).encode()
        for part in self._parts(head):
            self.yielded += len(part)
            yield part

    def _parts(self, head: bytes) -> Iterator[bytes]:
        yield head
        block = b"\xff" * self.chunk
        for _ in range(self.size // self.chunk):
            yield block
        yield f"\r\n--{BOUNDARY}--\r\n".encode()

    @property
    def headers(self) -> dict[str, str]:
        return {"Content-Type": f"multipart/form-data; boundary={BOUNDARY}"}


@pytest.mark.parametrize("authorization", [None, "Bearer adk_0123456789abnotakey"])
def test_an_upload_without_a_valid_key_is_refused_before_its_body_is_read(
    make_api: ApiFactory, authorization: str | None
) -> None:
    api = make_api()
    upload = StreamedUpload()
    headers = upload.headers | ({"Authorization": authorization} if authorization else {})

    with ServedApi.serving(api.app) as served:
        response = httpx.post(
            f"{served.url}/v1/classes", content=upload, headers=headers, timeout=60
        )

    assert response.status_code == 401, response.text
    assert response.headers["content-type"] == "application/problem+json"
    assert response.headers["www-authenticate"] == "Bearer"
    # Most of the body was never sent: the answer came first, and the connection closed.
    assert upload.yielded < UPLOAD_BYTES // 4, upload.yielded
    api.assert_nothing_stored()


def test_a_key_over_its_rate_is_refused_before_its_upload_is_read(make_api: ApiFactory) -> None:
    api = make_api(job_rate_limit_per_minute=1, job_rate_limit_burst=1)
    assert api.alice.post("/v1/classes", files=pair(), data=class_form()).status_code == 202
    upload = StreamedUpload()
    headers = upload.headers | {"Authorization": f"Bearer {api.keys['alice']}"}

    with ServedApi.serving(api.app) as served:
        response = httpx.post(
            f"{served.url}/v1/classes", content=upload, headers=headers, timeout=60
        )

    assert_rate_limited(response, at_most=60)
    assert upload.yielded < UPLOAD_BYTES // 4, upload.yielded


def test_a_key_that_cannot_be_checked_while_the_database_is_down_gets_503(
    tmp_path: Path,
) -> None:
    # given: an app whose database does not answer (nothing listens on its port)
    database_url = f"postgresql+psycopg://postgres@127.0.0.1:{free_port()}/aligndiff"
    app = create_app(Settings(data_dir=tmp_path, database_url=database_url), queue=RecordingQueue())
    try:
        # when: a key it has not verified yet comes with an upload
        response = TestClient(app).post(
            "/v1/classes",
            files=pair(),
            data=class_form(),
            headers={"Authorization": "Bearer adk_0123456789abcdefnotverified"},
        )
    finally:
        app.state.engine.dispose()

    # then: a 503 to retry, not a 500 and not a 401 (the key may well be valid)
    assert response.status_code == 503, response.text
    assert response.headers["content-type"] == "application/problem+json"
    assert response.headers["retry-after"] == "5"


def test_an_upload_with_a_verified_key_costs_no_key_query(api: Api) -> None:
    statements: list[str] = []
    event.listen(
        api.app.state.engine,
        "before_cursor_execute",
        lambda _conn, _cursor, statement, *_: statements.append(statement),
    )

    def key_lookups_of_an_upload() -> int:
        statements.clear()
        response = api.alice.post("/v1/classes", files=pair(), data=class_form())
        assert response.status_code == 202, response.text
        # Lookups only: the key's first use is also recorded (`auth.record_use`), once.
        return sum(
            "api_keys" in statement and statement.lstrip().upper().startswith("SELECT")
            for statement in statements
        )

    # The first request looks the key up once (not once in the middleware and once more in
    # the route); the next ones, within the cache's time, not at all.
    assert key_lookups_of_an_upload() == 1
    assert key_lookups_of_an_upload() == 0
    assert len(api.queue.sent) == 2


def test_the_route_reuses_the_middlewares_principal_for_admin_and_owner_rules(api: Api) -> None:
    created = api.alice.post("/v1/classes", files=pair(), data=class_form()).json()

    assert api.alice.get(f"/v1/classes/{created['id']}").status_code == 200
    assert api.bob.get(f"/v1/classes/{created['id']}").status_code == 404
    assert api.admin.get(f"/v1/classes/{created['id']}").status_code == 200
    assert api.anonymous.get(f"/v1/classes/{created['id']}").status_code == 401


# --- the metrics token ---------------------------------------------------------------------


def test_metrics_need_the_token_when_one_is_set(make_api: ApiFactory) -> None:
    api = make_api(metrics_token="scrape-me")

    missing = api.anonymous.get("/metrics")
    wrong = api.anonymous.get("/metrics", headers={"Authorization": "Bearer nope"})
    api_key = api.admin.get("/metrics")
    right = api.anonymous.get("/metrics", headers={"Authorization": "Bearer scrape-me"})

    for refused in (missing, wrong, api_key):
        assert refused.status_code == 401
        assert refused.headers["content-type"] == "application/problem+json"
        assert "scrape-me" not in refused.text
    assert right.status_code == 200 and "aligndiff_http_requests" in right.text


def test_metrics_are_open_when_no_token_is_set(api: Api) -> None:
    assert api.anonymous.get("/metrics").status_code == 200


def test_retry_after_is_rounded_up_to_whole_seconds() -> None:
    limiter, bucket = MemoryRateLimiter(), Bucket("requests", per_second=0.4, burst=1)
    limiter.hit_now(bucket, "key", now=0.0)

    verdict = limiter.hit_now(bucket, "key", now=0.1)

    assert verdict.retry_after == pytest.approx(2.4)
    assert verdict.retry_after_header == str(math.ceil(2.4))
