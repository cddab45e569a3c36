"""The admin dashboard over HTTP: signing in, cookies, CSRF, who may see it, the jobs page's data
(timings, tracebacks, workers online), thumbnails, the gallery with the class's report, and a
training's page."""

from __future__ import annotations

import re
import time
import traceback
import uuid
from collections.abc import Callable
from datetime import datetime, timedelta
from io import BytesIO

import pytest
from fastapi.testclient import TestClient
from PIL import Image
from sqlalchemy import select

from service.api.responses import LastAnswers
from service.api.routes import admin as admin_routes
from service.auth import create_key
from service.models import ApiKey, WorkerHeartbeat, utcnow
from service.storage import class_prefix
from service.web_sessions import SECRET_FILE, SESSION_COOKIE
from tests.api_support import (
    HTML,
    Api,
    ApiFactory,
    add_class,
    add_sample,
    csrf_token_of,
    get_job_row,
    set_job,
    sign_in,
)
from tests.report_support import (
    ACCEPTANCE,
    MIXED_SAMPLES,
    TUNING,
    add_report_class,
    add_samples,
    add_training,
    held_out_metrics,
    training_shots_metrics,
)
from worker import synthesis
from worker.context import WorkerContext
from worker.heartbeat import Heartbeat

pytest_plugins = ["tests.api_support"]

JSON = {"Accept": "application/json"}


def test_without_credentials_a_browser_goes_to_sign_in_and_an_api_client_gets_401(
    api: Api,
) -> None:
    page = api.anonymous.get("/admin/classes?x=1", headers=HTML, follow_redirects=False)
    polled = api.anonymous.get("/admin/api/jobs", headers=JSON)

    assert page.status_code == 303
    assert page.headers["location"] == "/admin/sign-in?next=/admin/classes%3Fx%3D1"
    assert polled.status_code == 401
    assert polled.headers["content-type"] == "application/problem+json"


def test_an_admin_key_signs_in_for_a_strict_http_only_session_cookie(api: Api) -> None:
    browser = sign_in(api, api.keys["admin"])

    cookie = browser.cookies.jar
    session_cookie = next(c for c in cookie if c.name == "aligndiff_session")
    raw = browser.get("/admin/sign-in").headers  # a fresh form response, to read its flags
    assert session_cookie.path == "/admin"
    assert not session_cookie.secure
    assert (
        "httponly" in raw["set-cookie"].lower() and "samesite=strict" in raw["set-cookie"].lower()
    )
    page = browser.get("/admin", headers=HTML)
    assert page.status_code == 200
    assert "Jobs" in page.text and "workers online" in page.text
    assert page.headers["cache-control"] == "no-store"
    assert "frame-ancestors 'none'" in page.headers["content-security-policy"]


def test_the_session_cookie_is_secure_when_the_setting_says_so(make_api: ApiFactory) -> None:
    api = make_api(session_cookie_secure=True)
    browser = TestClient(api.app, base_url="https://testserver")
    form = browser.get("/admin/sign-in")
    token = re.search(r'name="csrf_token" value="([^"]+)"', form.text)
    assert token is not None

    answer = browser.post(
        "/admin/sign-in",
        data={"key": api.keys["admin"], "csrf_token": token.group(1)},
        follow_redirects=False,
    )

    set_cookie = answer.headers["set-cookie"]
    assert "aligndiff_session=" in set_cookie
    for flag in ("secure", "httponly", "samesite=strict", "path=/admin"):
        assert flag in set_cookie.lower()


def test_a_user_key_is_refused_at_sign_in_and_on_every_dashboard_route(api: Api) -> None:
    browser = TestClient(api.app)
    form = browser.get("/admin/sign-in")
    token = re.search(r'name="csrf_token" value="([^"]+)"', form.text)
    assert token is not None

    refused = browser.post(
        "/admin/sign-in",
        data={"key": api.keys["alice"], "csrf_token": token.group(1)},
        follow_redirects=False,
    )

    assert refused.status_code == 403
    assert "not an admin key" in refused.text
    assert "aligndiff_session" not in browser.cookies
    for path in ("/admin", "/admin/api/jobs", "/admin/classes", "/admin/sign-in"):
        answer = api.alice.get(path)
        assert answer.status_code == 403, path
        assert answer.headers["content-type"] == "application/problem+json"


def test_a_wrong_key_at_sign_in_shows_the_form_again(api: Api) -> None:
    browser = TestClient(api.app)
    token = re.search(r'name="csrf_token" value="([^"]+)"', browser.get("/admin/sign-in").text)
    assert token is not None

    answer = browser.post("/admin/sign-in", data={"key": "adk_nope", "csrf_token": token.group(1)})

    assert answer.status_code == 401
    assert "not a valid API key" in answer.text
    assert "aligndiff_session" not in browser.cookies


@pytest.mark.parametrize(
    "headers, send_token",
    [
        ({"Origin": "https://evil.example"}, True),
        ({"Origin": "null"}, True),
        ({"Sec-Fetch-Site": "cross-site"}, True),
        ({"Origin": "http://testserver"}, False),
    ],
    ids=["other-origin", "null-origin", "cross-site-fetch", "no-token"],
)
def test_a_cross_site_or_tokenless_post_is_refused(
    api: Api, headers: dict[str, str], send_token: bool
) -> None:
    _, job_id = add_class(api, owner_id=api.alice_id, status="running")
    browser = sign_in(api, api.keys["admin"])
    token = csrf_token_of(browser.get("/admin").text)
    data = {"csrf_token": token} if send_token else {}

    answer = browser.post(f"/admin/jobs/{job_id}/cancel", data=data, headers=headers)

    assert answer.status_code == 403
    assert answer.headers["content-type"] == "application/problem+json"
    assert get_job_row(api, job_id).cancel_requested is False


def test_a_same_site_post_with_the_token_cancels(api: Api) -> None:
    _, job_id = add_class(api, owner_id=api.alice_id, status="running")
    browser = sign_in(api, api.keys["admin"])
    token = csrf_token_of(browser.get("/admin").text)

    answer = browser.post(
        f"/admin/jobs/{job_id}/cancel",
        headers={"Origin": "http://testserver", "X-CSRF-Token": token, **JSON},
    )

    assert answer.status_code == 202
    assert get_job_row(api, job_id).cancel_requested is True


def test_a_cross_site_sign_in_is_refused(api: Api) -> None:
    browser = TestClient(api.app)
    token = re.search(r'name="csrf_token" value="([^"]+)"', browser.get("/admin/sign-in").text)
    assert token is not None

    forged = TestClient(api.app).post(
        "/admin/sign-in", data={"key": api.keys["admin"], "csrf_token": token.group(1)}
    )
    cross_site = browser.post(
        "/admin/sign-in",
        data={"key": api.keys["admin"], "csrf_token": token.group(1)},
        headers={"Origin": "https://evil.example"},
    )

    assert forged.status_code == 403  # no sign-in cookie vouches for the token
    assert cross_site.status_code == 403
    assert "aligndiff_session" not in browser.cookies


def test_a_session_stops_working_when_its_key_is_revoked(api: Api) -> None:
    browser = sign_in(api, api.keys["admin"])
    assert browser.get("/admin/api/jobs").status_code == 200
    with api.session() as session:
        for key in session.query(ApiKey).filter(ApiKey.is_admin.is_(True)):
            key.revoked_at = utcnow()
        session.commit()

    assert browser.get("/admin/api/jobs").status_code == 401
    assert browser.get("/admin", headers=HTML, follow_redirects=False).status_code == 303


def test_signing_out_ends_the_session(api: Api) -> None:
    browser = sign_in(api, api.keys["admin"])
    token = csrf_token_of(browser.get("/admin").text)

    answer = browser.post("/admin/sign-out", data={"csrf_token": token}, follow_redirects=False)

    assert answer.status_code == 303
    assert browser.get("/admin/api/jobs").status_code == 401


def test_a_copy_of_a_signed_out_cookie_is_refused_and_signing_in_again_works(
    api: Api,
) -> None:
    # given: a session whose cookie someone copied, and another admin key's session
    browser = sign_in(api, api.keys["admin"])
    copied = TestClient(api.app, cookies={SESSION_COOKIE: browser.cookies[SESSION_COOKIE]})
    assert copied.get("/admin/api/jobs").status_code == 200
    with api.session() as session:
        other_key = create_key(session, name="ops", admin=True)
        session.commit()
    other = sign_in(api, other_key)

    # when: the browser signs out
    token = csrf_token_of(browser.get("/admin").text)
    assert browser.post("/admin/sign-out", data={"csrf_token": token}).status_code == 200

    # then: the copy is refused too, the other key's session goes on, and the same key can
    # sign in again at once
    assert copied.get("/admin/api/jobs").status_code == 401
    assert other.get("/admin/api/jobs").status_code == 200
    again = sign_in(api, api.keys["admin"])
    assert again.get("/admin/api/jobs").status_code == 200


def test_sessions_survive_a_restart_through_the_secret_file(make_api: ApiFactory) -> None:
    first = make_api()
    browser = sign_in(first, first.keys["admin"])
    secret_file = first.settings.data_dir / SECRET_FILE
    restarted = make_api()  # same data_dir and database: another process of the same service

    browser.app = restarted.app  # type: ignore[assignment]  # the same cookies, the new app

    assert secret_file.stat().st_mode & 0o077 == 0
    assert browser.get("/admin/api/jobs").status_code == 200


def test_a_configured_session_secret_writes_no_file(make_api: ApiFactory) -> None:
    api = make_api(session_secret="s" * 40)

    sign_in(api, api.keys["admin"])

    assert not (api.settings.data_dir / SECRET_FILE).exists()


def test_the_jobs_data_shows_every_owner_timings_and_an_admin_only_traceback(api: Api) -> None:
    _, alice_job = add_class(api, owner_id=api.alice_id, status="running", age=timedelta(minutes=2))
    _, bob_job = add_class(api, owner_id=api.bob_id, status="running", name="cat")
    started = utcnow() - timedelta(seconds=75)
    set_job(
        api, alice_job, started_at=started, stage="sampling", progress=0.4, attempts=1,
        worker="host:42",
    )  # fmt: skip
    _, done_job = add_class(
        api, owner_id=api.alice_id, status="succeeded", name="owl", started_at=started,
        finished_at=started + timedelta(seconds=61),
    )  # fmt: skip
    try:
        raise RuntimeError("inversion diverged\nat step 12")
    except RuntimeError as error:
        trace = traceback.format_exc()
        synthesis.record_failure(WorkerContext(api.settings), bob_job, error, trace)

    overview = api.admin.get("/admin/api/jobs").json()
    public = api.bob.get(f"/v1/jobs/{bob_job}").json()
    failed_only = api.admin.get("/admin/api/jobs?status=failed").json()

    jobs = {job["id"]: job for job in overview["jobs"]}
    assert overview["queue"] == {"queued": 0, "running": 1}
    assert jobs[str(alice_job)]["owner"] == "alice"
    assert jobs[str(alice_job)]["progress_text"] == "40%"
    # (a running job's duration is counted by the page from its start)
    running_since = datetime.fromisoformat(jobs[str(alice_job)]["running_since"])
    assert abs(running_since - started) < timedelta(milliseconds=1)
    assert jobs[str(alice_job)]["duration"] == ""
    assert jobs[str(done_job)]["duration"] == "1m 01s"
    assert jobs[str(done_job)]["running_since"] == ""
    assert jobs[str(alice_job)]["can_cancel"] and not jobs[str(alice_job)]["can_retry"]
    failed = jobs[str(bob_job)]
    assert failed["status"] == "failed" and failed["can_retry"]
    assert failed["error"] == "RuntimeError: inversion diverged"
    assert "Traceback (most recent call last)" in failed["traceback"]
    assert "test_dashboard.py" in failed["traceback"]
    assert public["error"] == "RuntimeError: inversion diverged"
    assert "traceback" not in public and "Traceback" not in str(public)
    assert [job["id"] for job in failed_only["jobs"]] == [str(bob_job)]
    page = api.admin.get("/admin?kind=synthesis").text
    assert "Traceback (most recent call last)" in page and "host:42" in page


def test_the_jobs_poll_is_answered_304_until_a_job_or_the_workers_online_change(
    api: Api, monkeypatch: pytest.MonkeyPatch
) -> None:
    # given: a running job, a worker online, and the page's first poll
    _, job_id = add_class(api, owner_id=api.alice_id, status="running", started_at=utcnow())
    beat(api, "host:1")
    first = api.admin.get("/admin/api/jobs")
    etag = first.headers["etag"]
    assert first.headers["cache-control"] == "private, no-cache"

    # when: polled again with the ETag it holds, after a heartbeat (as browsers send it, weak
    # or among others), and by a process that encodes the answer afresh
    beat(api, "host:1")
    again = api.admin.get("/admin/api/jobs", headers={"If-None-Match": etag})
    listed = api.admin.get("/admin/api/jobs", headers={"If-None-Match": f'"x", W/{etag}'})
    monkeypatch.setattr(admin_routes, "_POLLS", LastAnswers(size=8))
    fresh = api.admin.get("/admin/api/jobs", headers={"If-None-Match": etag})

    # then: nothing changed that the page shows: 304, no body, the same ETag
    for answer in (again, listed, fresh):
        assert answer.status_code == 304, answer.text
        assert answer.content == b""
        assert answer.headers["etag"] == etag

    # when: the job advances, then a second worker comes online
    set_job(api, job_id, progress=0.5)
    advanced = api.admin.get("/admin/api/jobs", headers={"If-None-Match": etag})
    beat(api, "host:2")
    joined = api.admin.get("/admin/api/jobs", headers={"If-None-Match": advanced.headers["etag"]})

    # then: each time the new data with a new ETag
    assert advanced.status_code == 200 and advanced.headers["etag"] != etag
    assert advanced.json()["jobs"][0]["progress"] == 0.5
    assert advanced.json()["jobs"][0]["duration"] == ""  # counted by the page: no change
    assert joined.status_code == 200
    assert joined.headers["etag"] not in (etag, advanced.headers["etag"])
    assert [worker["name"] for worker in joined.json()["workers"]] == ["host:1", "host:2"]
    # and: another filter's answer is its own
    failed = api.admin.get("/admin/api/jobs?status=failed", headers={"If-None-Match": etag})
    assert failed.status_code == 200 and failed.json()["jobs"] == []


def beat(api: Api, name: str) -> None:
    """A worker's heartbeat, as `worker.heartbeat` records it."""
    with api.session() as session:
        row = session.get(WorkerHeartbeat, name)
        if row is None:
            host, pid = name.split(":")
            row = WorkerHeartbeat(name=name, hostname=host, pid=int(pid))
            session.add(row)
        row.last_seen_at = utcnow()
        session.commit()


def test_a_dashboard_session_records_its_key_s_use_once_a_minute_not_per_poll(
    api: Api,
) -> None:
    # given: a browser signed in with the admin key, which was last used long ago
    browser = sign_in(api, api.keys["admin"])
    long_ago = utcnow() - timedelta(hours=1)
    with api.session() as session:
        key = session.execute(select(ApiKey).where(ApiKey.is_admin)).scalar_one()
        key.last_used_at = long_ago
        session.commit()
        key_id = key.id

    def last_used() -> datetime | None:
        with api.session() as session:
            return session.get(ApiKey, key_id).last_used_at  # type: ignore[union-attr]

    # when: the page polls, then polls again
    assert browser.get("/admin/api/jobs").status_code == 200
    recorded = last_used()
    assert browser.get("/admin/api/jobs").status_code == 200

    # then: the first poll recorded the use, the second wrote nothing
    assert recorded is not None and recorded > long_ago + timedelta(minutes=59)
    assert last_used() == recorded


def test_retrying_from_the_dashboard_queues_the_job_again(api: Api) -> None:
    _, job_id = add_class(api, owner_id=api.bob_id, status="failed", error="boom")

    answer = api.admin.post(f"/admin/jobs/{job_id}/retry", headers=JSON)

    assert answer.status_code == 202
    assert answer.json()["status"] == "queued"
    assert api.queue.sent == [("aligndiff.synthesis.start", (str(job_id),))]


def test_workers_online_come_from_their_heartbeats(api: Api) -> None:
    with api.session() as session:
        session.add(
            WorkerHeartbeat(
                name="gone:1",
                hostname="gone",
                pid=1,
                last_seen_at=utcnow() - timedelta(minutes=5),
            )
        )
        session.commit()
    _, job_id = add_class(api, owner_id=api.alice_id, status="running")
    heartbeat = Heartbeat(WorkerContext(api.settings), interval=0.1)
    heartbeat.start()
    try:
        heartbeat.set_job(job_id)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            workers = api.admin.get("/admin/api/jobs").json()["workers"]
            if workers and workers[0]["current_job_id"] == str(job_id):
                break
            time.sleep(0.05)
        assert [w["name"] for w in workers] == [heartbeat.name]
        assert workers[0]["current_job_id"] == str(job_id)
    finally:
        heartbeat.stop()

    assert api.admin.get("/admin/api/jobs").json()["workers"] == []


def test_a_heartbeat_writes_a_job_taken_or_finished_at_once(api: Api) -> None:
    # given: a heartbeat whose next regular beat is a minute away
    _, job_id = add_class(api, owner_id=api.alice_id, status="running")
    heartbeat = Heartbeat(WorkerContext(api.settings), interval=60)
    heartbeat.start()

    def row_names(job: uuid.UUID | None) -> bool:
        with api.session() as session:
            row = session.get(WorkerHeartbeat, heartbeat.name)
            return row is not None and row.current_job_id == job

    def soon(check: Callable[[], bool]) -> bool:
        deadline = time.monotonic() + 10
        while not check() and time.monotonic() < deadline:
            time.sleep(0.05)
        return check()

    try:
        assert soon(lambda: row_names(None))
        # when: a task of the job starts, then ends
        heartbeat.set_job(job_id)
        taken = soon(lambda: row_names(job_id))
        heartbeat.set_job(None)
        finished = soon(lambda: row_names(None))
    finally:
        heartbeat.stop()

    # then: the row said so each time well before the next beat (a worker dying now names no
    # job for the sweep to take over)
    assert taken and finished


def _jpeg_size(data: bytes) -> tuple[int, int]:
    with Image.open(BytesIO(data)) as image:
        assert image.format == "JPEG"
        return image.size


def test_a_thumbnail_is_drawn_once_kept_under_its_class_and_deleted_with_it(api: Api) -> None:
    class_id, _ = add_class(api, owner_id=api.alice_id, status="succeeded")
    big = Image.new("RGB", (300, 200), (20, 120, 200))
    sample_id = add_sample(api, class_id, 0, image=big)
    url = f"/admin/samples/{sample_id}/thumbnail?size=128"

    first = api.admin.get(url)
    for key in api.blobs(f"{class_prefix(class_id)}samples/"):
        api.storage.delete_prefix(key)  # the sources go: only the kept thumbnail can answer
    second = api.admin.get(url)
    revalidated = api.admin.get(url, headers={"If-None-Match": first.headers["etag"]})

    assert first.status_code == 200 and first.headers["content-type"] == "image/jpeg"
    assert _jpeg_size(first.content) == (128, 85)
    assert "max-age" in first.headers["cache-control"]
    assert first.headers["cache-control"].startswith("private")
    assert second.status_code == 200 and second.content == first.content
    assert revalidated.status_code == 304
    thumbnails = api.blobs(f"{class_prefix(class_id)}thumbnails/")
    assert len(thumbnails) == 1
    assert api.alice.delete(f"/v1/classes/{class_id}").status_code == 204
    assert api.blobs(class_prefix(class_id)) == []
    assert api.admin.get(url).status_code == 404


def test_the_thumbnail_shows_the_mask(api: Api) -> None:
    class_id, _ = add_class(api, owner_id=api.alice_id, status="succeeded")
    gray = Image.new("RGB", (64, 64), (128, 128, 128))
    mask = Image.new("L", (64, 64), 0)
    mask.paste(255, (0, 0, 32, 64))  # the left half is the object
    sample_id = add_sample(api, class_id, 0, image=gray, mask=mask)

    data = api.admin.get(f"/admin/samples/{sample_id}/thumbnail?size=128").content

    with Image.open(BytesIO(data)) as image:
        left, right = image.getpixel((10, 32)), image.getpixel((54, 32))
    assert isinstance(left, tuple) and isinstance(right, tuple)
    assert left[0] > right[0] + 40  # tinted
    assert abs(right[0] - 128) < 10 and abs(right[2] - 128) < 10  # untouched


def test_a_thumbnail_of_an_unknown_sample_or_size_is_refused(api: Api) -> None:
    class_id, _ = add_class(api, owner_id=api.alice_id, status="running")
    unfinished = add_sample(api, class_id, 0, finalized=False)

    assert api.admin.get(f"/admin/samples/{unfinished}/thumbnail").status_code == 404
    assert api.admin.get(f"/admin/samples/{uuid.uuid4()}/thumbnail").status_code == 404
    assert api.admin.get(f"/admin/samples/{unfinished}/thumbnail?size=4000").status_code == 422


def _indices(page: str) -> list[int]:
    return [int(i) for i in re.findall(r'class="tile sample[^"]*" data-sample-id="[^"]+" '
                                       r'data-index="(\d+)"', page)]  # fmt: skip


def test_the_gallery_sorts_by_score_and_filters(api: Api) -> None:
    class_id, _ = add_class(api, owner_id=api.bob_id, status="succeeded")
    scores = {0: 21.0, 1: 35.5, 2: 28.25, 3: 30.0}
    for index, score in scores.items():
        add_sample(api, class_id, index, clip_score=score, accepted=index != 2)

    by_index = api.admin.get(f"/admin/classes/{class_id}").text
    by_score = api.admin.get(f"/admin/classes/{class_id}?sort=clip_score").text
    lowest_first = api.admin.get(f"/admin/classes/{class_id}?sort=clip_score&order=asc").text
    rejected = api.admin.get(f"/admin/classes/{class_id}?accepted=false").text
    text_only = api.admin.get(f"/admin/classes/{class_id}?prompt_kind=text&sort=clip_score").text

    assert _indices(by_index) == [0, 1, 2, 3]
    assert _indices(by_score) == [1, 3, 2, 0]
    assert _indices(lowest_first) == [0, 2, 3, 1]
    assert _indices(rejected) == [2]
    assert _indices(text_only) == [1, 3]  # add_sample: odd indices are text prompts
    clip = element(by_index, "svg", "clip-histogram")
    counts = [int(c) for c in re.findall(r'class="bar"[^>]*data-count="(\d+)"', clip)]
    assert sum(counts) == 4 and counts[0] == 1 and counts[-1] == 1
    assert "bob" in api.admin.get("/admin/classes").text
    assert f"/admin/classes/{class_id}" in api.admin.get("/admin/classes").text


def test_the_gallery_of_an_unknown_class_is_404(api: Api) -> None:
    assert api.admin.get(f"/admin/classes/{uuid.uuid4()}").status_code == 404


def element(page: str, tag: str, id_: str) -> str:
    """The element `<tag id="id_">…</tag>` of a page (no element of the same tag inside)."""
    found = re.search(rf'<{tag}[^>]*\bid="{id_}"[^>]*>.*?</{tag}>', page, re.DOTALL)
    assert found is not None, f"no <{tag} id={id_}>"
    return found.group(0)


def _bar_counts(svg: str) -> list[int]:
    return [int(c) for c in re.findall(r'class="bar"[^>]*data-count="(\d+)"', svg)]


@pytest.fixture
def reported_class(api: Api) -> tuple[uuid.UUID, uuid.UUID, uuid.UUID]:
    """Bob's auto-tuned class with MIXED_SAMPLES and two trainings on it: (class, a held-out
    training with a baseline, an older one on the training shots)."""
    with api.session() as session:
        class_id = add_report_class(
            session, owner_id=api.bob_id, acceptance=ACCEPTANCE, tuning=TUNING
        )
        add_samples(session, api.storage, class_id, MIXED_SAMPLES)
        held_out = add_training(
            session,
            owner_id=api.bob_id,
            class_ids=[class_id],
            metrics=held_out_metrics(["pidan"], miou=0.71, baseline_miou=0.58, folds=3),
        )
        optimistic = add_training(
            session,
            owner_id=api.bob_id,
            class_ids=[class_id],
            metrics=training_shots_metrics(["pidan"], miou=0.93),
            age=timedelta(hours=1),
        )
        session.commit()
    return class_id, held_out, optimistic


def test_the_class_page_shows_the_report(
    api: Api, reported_class: tuple[uuid.UUID, uuid.UUID, uuid.UUID]
) -> None:
    class_id, held_out, optimistic = reported_class
    finished = [spec for spec in MIXED_SAMPLES if spec.finalized]

    # when
    page = api.admin.get(f"/admin/classes/{class_id}")

    # then: a histogram per signal, each finished sample with the signal in one bar, and the
    # class's thresholds marked on the similarities'
    assert page.status_code == 200
    assert "10 finished samples, 6 accepted" in page.text
    for signal in ("clip_score", "shot_similarity", "prototype_similarity", "ood_iou",
                   "consensus_iou"):  # fmt: skip
        svg = element(page.text, "svg", f"histogram-{signal}")
        measured = [spec for spec in finished if getattr(spec, signal) is not None]
        assert sum(_bar_counts(svg)) == len(measured), signal
        assert ('class="marker"' in svg) is (signal.endswith("similarity")), signal
    # and the accepted shares, the rejections by reason and the tuning trials, the chosen one
    # marked
    kinds = element(page.text, "table", "by-prompt-kind")
    assert "4 / 5 accepted (80%)" in kinds and "2 / 5 accepted (40%)" in kinds
    assert "4 / 6 accepted (67%)" in element(page.text, "table", "by-mask-source")
    rejections = element(page.text, "table", "rejections")
    found = dict(
        re.findall(r'data-reason="(\w+)">.*?data-field="count">(\d+)<', rejections, re.DOTALL)
    )
    assert found == {"ood": "2", "similarity": "1", "user": "1"}
    tuning = element(page.text, "table", "tuning")
    assert re.findall(r'<tr class="chosen">\s*<td class="num">([\d.]+)</td>', tuning) == ["0.60"]
    assert "shot similarity ≥ <strong>0.610</strong>" in page.text.lower()
    # and the trainings, oldest first on the chart, each linking to its page
    chart = element(page.text, "svg", "trainings-chart")
    groups = re.findall(r'<g class="group( optimistic)?" data-label="(\w+)"', chart)
    assert groups == [(" optimistic", str(optimistic)[:8]), ("", str(held_out)[:8])]
    assert chart.count("optimistic</text>") == 1
    values = re.findall(r'class="bar-(synthetic|baseline)"[^>]*data-value="([\d.]+)"', chart)
    assert values == [("synthetic", "0.9300"), ("synthetic", "0.7100"), ("baseline", "0.5800")]
    table = element(page.text, "table", "trainings")
    assert f'href="/admin/trainings/{held_out}"' in table
    assert f'href="/admin/trainings/{optimistic}"' in table


def test_a_class_without_samples_or_trainings_has_an_empty_report(api: Api) -> None:
    class_id, _ = add_class(api, owner_id=api.alice_id, status="running")

    page = api.admin.get(f"/admin/classes/{class_id}").text

    assert "0 finished samples, 0 accepted" in page
    assert sum(_bar_counts(element(page, "svg", "histogram-clip_score"))) == 0
    assert "No succeeded training includes this class yet." in page
    assert "Not set yet" in page  # the thresholds


def test_a_disabled_similarity_check_marks_no_threshold(api: Api) -> None:
    disabled = {
        "prototype_similarity": -1.0,
        "shot_similarity": -1.0,
        "source": dict.fromkeys(("prototype_similarity", "shot_similarity"), "disabled"),
        "calibration": {"prototype_similarity": [], "shot_similarity": []},
    }
    with api.session() as session:
        class_id = add_report_class(session, owner_id=api.alice_id, acceptance=disabled)
        add_samples(session, api.storage, class_id, MIXED_SAMPLES)
        session.commit()

    page = api.admin.get(f"/admin/classes/{class_id}").text

    assert page.count("not checked (disabled)") == 2
    assert 'class="marker"' not in element(page, "svg", "histogram-shot_similarity")


def test_a_training_job_links_to_its_page_with_metrics_per_class_and_fold(
    api: Api, reported_class: tuple[uuid.UUID, uuid.UUID, uuid.UUID]
) -> None:
    class_id, held_out, _ = reported_class

    # when: the admin follows the training job's link from the jobs page
    jobs = api.admin.get("/admin/api/jobs?kind=training").json()["jobs"]
    links = {job["target_id"]: job["target_url"] for job in jobs}
    assert f'href="/admin/trainings/{held_out}"' in api.admin.get("/admin?kind=training").text
    page = api.admin.get(links[str(held_out)])

    # then: what it was measured on, its metrics per class and per fold, and the comparison
    assert links[str(held_out)] == f"/admin/trainings/{held_out}"
    assert page.status_code == 200
    assert page.headers["content-security-policy"].startswith("default-src 'self'")
    assert '<span id="eval-set">held_out_shots</span>' in page.text
    assert element(page.text, "span", "miou") == '<span class="value" id="miou">0.710</span>'
    assert ">+0.130<" in element(page.text, "span", "difference")
    assert "larger than" in element(page.text, "p", "verdict")
    per_class = element(page.text, "table", "per-class")
    assert f'href="/admin/classes/{class_id}"' in per_class and "0.580" in per_class
    folds = element(page.text, "table", "folds")
    assert re.findall(r'data-fold="(\d+)"', folds) == ["0", "1", "2"]
    assert "pidan #1" in folds and "0.580" in folds
    assert "data-value" in element(page.text, "svg", "per-class-chart")


def test_a_training_on_the_training_shots_is_marked_optimistic_and_one_running_has_no_metrics(
    api: Api, reported_class: tuple[uuid.UUID, uuid.UUID, uuid.UUID]
) -> None:
    class_id, _, optimistic = reported_class
    with api.session() as session:
        running = add_training(
            session, owner_id=api.alice_id, class_ids=[class_id], metrics=None, status="running"
        )
        session.commit()

    shots = api.admin.get(f"/admin/trainings/{optimistic}").text
    unfinished = api.admin.get(f"/admin/trainings/{running}").text

    assert '<span class="badge status-queued">optimistic</span>' in shots
    assert "Optimistic: measured on the very shots it trained on" in shots
    assert 'id="folds"' not in shots
    assert "No metrics yet" in unfinished and 'id="per-class"' not in unfinished


def test_the_training_page_is_for_admins_only(
    api: Api, reported_class: tuple[uuid.UUID, uuid.UUID, uuid.UUID]
) -> None:
    _, held_out, _ = reported_class
    path = f"/admin/trainings/{held_out}"

    assert api.bob.get(path).status_code == 403  # even the training's owner
    assert api.anonymous.get(path, headers=HTML, follow_redirects=False).status_code == 303
    assert api.anonymous.get(path, headers=JSON).status_code == 401
    assert api.admin.get(f"/admin/trainings/{uuid.uuid4()}").status_code == 404


# --- keys --------------------------------------------------------------------------------------


def _keys_page_token(browser: TestClient) -> str:
    return csrf_token_of(browser.get("/admin/keys", headers=HTML).text)


def _key_row(page: str, name: str) -> str:
    """The keys table's row of the key named `name`."""
    row = r'<tr class="key[^"]*" data-key-id="[^"]+">\s*<td data-field="name">'
    found = re.search(rf"{row}{re.escape(name)}\b.*?</tr>", page, re.S)
    assert found is not None, name
    return found.group(0)


def test_the_keys_page_lists_every_key_with_its_owner_and_a_revoke_button(api: Api) -> None:
    with api.session() as session:
        revoked = ApiKey(
            owner_id=api.bob_id, name="old laptop", prefix="0123456789ab", key_hash="0" * 64
        )
        revoked.revoked_at = utcnow()
        session.add(revoked)
        session.commit()
    browser = sign_in(api, api.keys["admin"])

    page = browser.get("/admin/keys", headers=HTML)

    assert page.status_code == 200
    assert '<a href="/admin/keys" aria-current="page">Keys</a>' in page.text
    alices = _key_row(page.text, "alice")
    assert "user" in alices and 'action="/admin/keys/' in alices and "Revoke" in alices
    assert "admin</span>" in _key_row(page.text, "admin")
    old = _key_row(page.text, "old laptop")
    assert "bob" in old and "Revoke" not in old and 'class="key revoked"' in old
    for key in api.keys.values():
        assert key not in page.text
    assert "'unsafe-inline'" not in page.headers["content-security-policy"]
    assert "<script>" not in page.text and " style=" not in page.text


def test_an_admin_creates_a_key_on_the_keys_page_and_sees_it_once(api: Api) -> None:
    browser = sign_in(api, api.keys["admin"])
    token = _keys_page_token(browser)

    # when: the admin creates a user key for bob from the page
    answer = browser.post(
        "/admin/keys",
        data={"name": "bob's ci", "owner_id": str(api.bob_id), "csrf_token": token},
        headers={"Origin": "http://testserver"},
    )

    # then: the page shows the key this once, and it is bob's and works
    assert answer.status_code == 201, answer.text
    shown = re.search(r'<code id="new-key-value">(adk_[^<]+)</code>', answer.text)
    assert shown is not None
    key = shown.group(1)
    owned = TestClient(api.app, headers={"Authorization": f"Bearer {key}"})
    assert owned.get("/v1/keys").json()["items"][0]["owner_id"] == str(api.bob_id)
    assert owned.get("/admin/keys").status_code == 403  # a user key
    assert key not in browser.get("/admin/keys", headers=HTML).text


def test_a_key_the_page_cannot_create_shows_why(api: Api) -> None:
    browser = sign_in(api, api.keys["admin"])
    token = _keys_page_token(browser)
    before = browser.get("/v1/keys", headers={"Authorization": f"Bearer {api.keys['admin']}"})

    blank = browser.post("/admin/keys", data={"name": "  ", "csrf_token": token})
    unknown = browser.post(
        "/admin/keys", data={"name": "x", "owner_id": str(uuid.uuid4()), "csrf_token": token}
    )

    assert blank.status_code == 422 and "check its name" in blank.text
    assert unknown.status_code == 422 and "owner_id: no owner has this id" in unknown.text
    after = api.admin.get("/v1/keys")
    assert len(after.json()["items"]) == len(before.json()["items"])


@pytest.mark.parametrize(
    "headers, send_token",
    [({"Origin": "https://evil.example"}, True), ({"Origin": "http://testserver"}, False)],
    ids=["other-origin", "no-token"],
)
def test_a_cross_site_or_tokenless_key_create_or_revoke_is_refused(
    api: Api, headers: dict[str, str], send_token: bool
) -> None:
    browser = sign_in(api, api.keys["admin"])
    data = {"csrf_token": _keys_page_token(browser)} if send_token else {}
    alices_id = api.alice.get("/v1/keys").json()["items"][0]["id"]
    before = api.admin.get("/v1/keys").json()["items"]

    created = browser.post("/admin/keys", data={"name": "evil", **data}, headers=headers)
    revoked = browser.post(f"/admin/keys/{alices_id}/revoke", data=data, headers=headers)

    assert (created.status_code, revoked.status_code) == (403, 403)
    assert api.admin.get("/v1/keys").json()["items"] == before
    assert api.alice.get("/v1/jobs").status_code == 200


def test_revoking_on_the_keys_page_refuses_the_key_and_ends_its_sessions(api: Api) -> None:
    # given: a second admin key, signed in on another browser and used with Bearer
    ops = api.admin.post("/v1/keys", json={"name": "ops", "admin": True}).json()
    other_browser = sign_in(api, ops["key"])
    bearer = TestClient(api.app, headers={"Authorization": f"Bearer {ops['key']}"})
    assert other_browser.get("/admin/api/jobs").status_code == 200
    assert bearer.get("/v1/jobs").status_code == 200
    browser = sign_in(api, api.keys["admin"])

    # when: the first admin revokes it from the keys page
    answer = browser.post(
        f"/admin/keys/{ops['id']}/revoke",
        data={"csrf_token": _keys_page_token(browser), "next": "/admin/keys"},
        headers={"Origin": "http://testserver"},
        follow_redirects=False,
    )

    # then: back to the keys page, where it is marked revoked; its session and Bearer use end
    assert answer.status_code == 303 and answer.headers["location"] == "/admin/keys"
    assert 'class="key revoked"' in _key_row(browser.get("/admin/keys").text, "ops")
    assert other_browser.get("/admin/api/jobs").status_code == 401
    assert bearer.get("/v1/jobs").status_code == 401
    assert browser.get("/admin/api/jobs").status_code == 200


def test_revoking_a_key_through_the_api_ends_its_dashboard_sessions(api: Api) -> None:
    ops = api.admin.post("/v1/keys", json={"name": "ops", "admin": True}).json()
    browser = sign_in(api, ops["key"])
    assert browser.get("/admin/api/jobs").status_code == 200

    assert api.admin.delete(f"/v1/keys/{ops['id']}").status_code == 204

    assert browser.get("/admin/api/jobs").status_code == 401
    assert browser.get("/admin/keys", headers=HTML, follow_redirects=False).status_code == 303
