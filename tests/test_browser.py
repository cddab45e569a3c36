"""The dashboard in a real browser (Debian's headless Chromium through Playwright) against a live
`aligndiff serve` on loopback: sign in, watch a job's progress advance without a reload,
cancel it, refuse cross-site posts, sort a class's gallery by score, and read a class's report
and a training's page (their rows seeded into serve's database as a worker leaves them), and
create a key, see it listed, revoke it and see the API refuse it. Screenshots go to
`test-artifacts/` (ALIGNDIFF_TEST_ARTIFACTS)."""

from __future__ import annotations

import re
import threading
import uuid
from collections.abc import Iterator
from datetime import timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy.orm import Session

from service.auth import authenticate
from service.db import make_engine
from service.storage import LocalStorage
from tests.browser_support import (
    chromium,
    create_class,
    screenshot,
    sign_in,
    wait_for_status,
)
from tests.report_support import (
    ACCEPTANCE,
    MIXED_SAMPLES,
    TUNING,
    add_report_class,
    add_samples,
    add_shots,
    add_training,
    held_out_metrics,
    training_shots_metrics,
)
from tests.serve_support import Server, free_port, running_server

# NOTE: about 60 s on an idle 2-core machine; the bounds below leave room for a busy one.
pytestmark = pytest.mark.timeout(600)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, model_cache: Path) -> Iterator[Server]:
    with running_server(tmp_path_factory.mktemp("serve"), model_cache) as server:
        yield server


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    with chromium() as browser:
        yield browser


@pytest.fixture
def page(browser: Any, server: Server) -> Iterator[Any]:
    context = browser.new_context(viewport={"width": 1440, "height": 900})
    page = context.new_page()
    page.set_default_timeout(20_000)
    yield page
    context.close()


def _tile_values(page: Any, name: str) -> list[float]:
    """A data attribute of every sample tile, in the order the page shows them."""
    values = page.eval_on_selector_all(".tile.sample", f"ts => ts.map(t => t.dataset.{name})")
    return [float(value) for value in values]


def _progress(page: Any, job_id: str) -> float:
    return float(page.eval_on_selector(f'tr[data-job-id="{job_id}"] progress', "p => p.value"))


class _CrossSitePage(BaseHTTPRequestHandler):
    """Another site (localhost, not 127.0.0.1) whose page posts a form to the dashboard."""

    target = ""

    def do_GET(self) -> None:
        body = (
            f'<form id="f" method="post" action="{self.target}">'
            '<input name="csrf_token" value="forged"></form>'
            "<script>document.getElementById('f').submit()</script>"
        ).encode()
        self.send_response(200)
        self.send_header("Content-Type", "text/html")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *_: Any) -> None:
        pass


def _cross_site_form_post(page: Any, target: str) -> int:
    """Open a page of another site that posts a form to `target`; the status it got."""
    handler = type("Handler", (_CrossSitePage,), {"target": target})
    port = free_port()
    other_site = ThreadingHTTPServer(("127.0.0.1", port), handler)
    threading.Thread(target=other_site.serve_forever, daemon=True).start()
    try:
        with page.expect_response(lambda response: response.url == target) as answer:
            page.goto(f"http://localhost:{port}/")
        return int(answer.value.status)
    finally:
        other_site.shutdown()
        other_site.server_close()


def test_an_admin_signs_in_watches_a_job_advance_and_cancels_it(page: Any, server: Server) -> None:
    # given a class big enough to run for minutes (48 samples took under a minute on a quiet
    # machine: the job ended before the test could cancel it); it is cancelled long before
    created = create_class(server, name="busy dog", num_samples=600)
    job_id = created["job_id"]

    # (the page's polls: the ETag each asked with, and the one its answer has)
    polls: list[tuple[str | None, str | None]] = []

    def record_poll(answer: Any) -> None:
        if "/admin/api/jobs" in answer.url:
            held = answer.request.all_headers().get("if-none-match")
            polls.append((held, answer.all_headers().get("etag")))

    page.on("response", record_poll)

    # when the admin signs in through the form
    sign_in(page, server, server.admin_key)
    page.wait_for_url(f"{server.url}/admin")
    row = page.locator(f'tr[data-job-id="{job_id}"]')
    row.wait_for()
    page.evaluate("window.__loadedOnce = true")

    # then the job's progress advances on the page without a reload
    page.wait_for_function(
        f"""() => document.querySelector('tr[data-job-id="{job_id}"] progress').value > 0""",
        timeout=180_000,
    )
    first = _progress(page, job_id)
    page.wait_for_function(
        f"""p => document.querySelector('tr[data-job-id="{job_id}"] progress').value > p""",
        arg=first,
        timeout=180_000,
    )
    assert _progress(page, job_id) > first
    assert page.evaluate("window.__loadedOnce") is True  # the same page, refreshed in place
    assert row.locator('[data-field="status"]').inner_text() == "running"
    # ... and its duration counts up by the second, worded as the server words durations
    counted = row.locator('[data-field="duration"]').inner_text()
    assert re.fullmatch(r"\d+s|\d+m \d\ds", counted), counted
    page.wait_for_function(
        f"""d => document.querySelector('tr[data-job-id="{job_id}"] [data-field="duration"]')
                 .textContent !== d""",
        arg=counted,
        timeout=10_000,
    )
    assert int(page.inner_text("#workers-count")) >= 1  # the embedded worker's heartbeat
    screenshot(page, "02-jobs-running")

    # and posts from another site, or without the session's token, are refused
    cancel_url = f"{server.url}/admin/jobs/{job_id}/cancel"
    token = page.get_attribute('meta[name="csrf-token"]', "content")
    requests = page.context.request
    other_origin = requests.post(
        cancel_url, form={"csrf_token": token}, headers={"Origin": "http://localhost:1"}
    )
    no_token = requests.post(cancel_url, form={}, headers={"Origin": server.url})
    assert (other_origin.status, no_token.status) == (403, 403)
    attacker = page.context.new_page()
    assert _cross_site_form_post(attacker, cancel_url) in (401, 403)
    attacker.close()
    assert (
        httpx.get(
            f"{server.url}/v1/jobs/{job_id}",
            headers={"Authorization": f"Bearer {server.admin_key}"},
        ).json()["status"]
        == "running"
    )

    # when the admin presses cancel
    row.locator('form[data-action="cancel"] button').click()

    # then the job ends cancelled, still on the same page
    row.locator('[data-field="status"]', has_text="cancelled").wait_for(timeout=180_000)
    assert page.evaluate("window.__loadedOnce") is True
    assert row.locator('form[data-action="retry"]').is_visible()
    assert not row.locator('form[data-action="cancel"]').is_visible()
    # ... with its duration, from start to end, no longer counting
    assert row.get_attribute("data-running-since") is None
    ended = row.locator('[data-field="duration"]').inner_text()
    assert re.fullmatch(r"\d+s|\d+m \d\ds", ended), ended
    page.wait_for_timeout(1_500)
    assert row.locator('[data-field="duration"]').inner_text() == ended
    # ... and with nothing changing, the page's polls ask with the ETag of the data it holds
    # (answered 304 Not Modified: tests/test_dashboard.py)
    page.wait_for_timeout(4_500)
    held, answered = polls[-1]
    assert held is not None and held == answered, polls[-3:]
    screenshot(page, "03-jobs-cancelled")


def test_a_class_gallery_sorts_by_clip_score(page: Any, server: Server) -> None:
    # given a class that succeeded
    created = create_class(server, name="gallery dog", num_samples=4)
    assert wait_for_status(server, created["id"], {"succeeded", "failed"}, 400) == "succeeded"
    sign_in(page, server, server.admin_key)
    screenshot(page, "01-jobs")

    # when the admin opens it from the classes page and sorts by CLIP score
    page.click("nav >> text=Classes")
    screenshot(page, "04-classes")
    page.click("text=gallery dog")
    page.wait_for_url(f"**/admin/classes/{created['id']}")
    page.select_option("#sort", "clip_score")
    page.wait_for_url("**sort=clip_score**")

    # then the samples are shown best first, each thumbnail drawn
    scores = _tile_values(page, "clipScore")
    assert len(scores) == 4
    assert scores == sorted(scores, reverse=True)
    page.wait_for_function(
        "() => [...document.querySelectorAll('.tile img')]"
        ".every(i => i.complete && i.naturalWidth > 0)"
    )

    # and by consensus IoU (tiny models give every sample a CLIP score of 0; this one varies)
    page.select_option("#sort", "consensus_iou")
    page.wait_for_url("**sort=consensus_iou**")
    samples = httpx.get(
        f"{server.url}/v1/classes/{created['id']}/samples",
        headers={"Authorization": f"Bearer {server.admin_key}"},
    ).json()["items"]
    best_first = sorted(samples, key=lambda s: (-s["consensus_iou"], s["index"]))
    assert _tile_values(page, "index") == [float(s["index"]) for s in best_first]
    assert page.locator("#clip-histogram rect.bar").count() >= 1
    screenshot(page, "05-gallery-by-clip-score")

    # and a sample opens large with its prompt, seed and scores
    page.locator(".tile.sample a.open-sample").first.click()
    dialog = page.locator("#sample-dialog")
    dialog.wait_for(state="visible")
    assert "a photo of" in page.inner_text("#dialog-prompt")
    assert page.inner_text("#dialog-seed").isdigit()
    assert float(page.inner_text("#dialog-consensus-iou")) == pytest.approx(
        best_first[0]["consensus_iou"], abs=1e-4
    )
    page.wait_for_function("() => document.getElementById('dialog-image').naturalWidth > 0")
    assert "size=512" in (page.get_attribute("#dialog-image", "src") or "")
    screenshot(page, "06-sample")


def _seed_report(server: Server) -> tuple[uuid.UUID, uuid.UUID]:
    """The admin's class with MIXED_SAMPLES, another class, and three trainings on them:
    held out with a baseline, on the training shots, and held out without a baseline. Returns
    (class, the held-out training with a baseline)."""
    # `aligndiff serve`'s embedded defaults, under the folder it runs in.
    data_dir = server.workdir / "aligndiff-data"
    engine = make_engine(f"sqlite:///{data_dir / 'aligndiff.db'}")
    storage = LocalStorage(data_dir / "blobs")
    try:
        with Session(engine) as session:
            owner_id = authenticate(session, f"Bearer {server.admin_key}").owner_id
            pidan = add_report_class(
                session, owner_id=owner_id, acceptance=ACCEPTANCE, tuning=TUNING
            )
            add_samples(session, storage, pidan, MIXED_SAMPLES)
            add_shots(session, storage, pidan, 3)
            owl = add_report_class(session, owner_id=owner_id, name="owl", bg_lambda=0.6)
            add_training(
                session,
                owner_id=owner_id,
                class_ids=[pidan],
                metrics=training_shots_metrics(["pidan"], miou=0.93),
                age=timedelta(hours=2),
            )
            add_training(
                session,
                owner_id=owner_id,
                class_ids=[pidan, owl],
                metrics=held_out_metrics(["pidan", "owl"], miou=0.64, baseline_miou=None),
                age=timedelta(hours=1),
            )
            held_out = add_training(
                session,
                owner_id=owner_id,
                class_ids=[pidan, owl],
                metrics=held_out_metrics(["pidan", "owl"], miou=0.71, baseline_miou=0.58, folds=3),
            )
            session.commit()
    finally:
        engine.dispose()
    return pidan, held_out


def test_an_admin_reads_a_class_report_and_opens_a_training_from_the_jobs_page(
    page: Any, server: Server
) -> None:
    # given: a finished class with samples of every verdict and trainings on it
    class_id, training_id = _seed_report(server)

    # when: the admin signs in and opens the class's page
    sign_in(page, server, server.admin_key)
    page.wait_for_url(f"{server.url}/admin")
    page.goto(f"{server.url}/admin/classes/{class_id}")

    # then: every signal's histogram counts the finished samples that have it
    counts = page.eval_on_selector_all(
        "#histogram-clip_score rect.bar", "bars => bars.map(b => Number(b.dataset.count))"
    )
    assert len(counts) == 20 and sum(counts) == 9
    assert page.locator("#histogram-shot_similarity line.marker").count() == 1
    for signal in ("prototype_similarity", "ood_iou", "consensus_iou"):
        assert page.locator(f"#histogram-{signal} rect.bar").count() > 0, signal
    # and the rejections by reason, the accepted shares, the chosen bg_lambda
    rejections = {
        reason: page.inner_text(f'#rejections tr[data-reason="{reason}"] [data-field="count"]')
        for reason in ("ood", "similarity", "user")
    }
    assert rejections == {"ood": "2", "similarity": "1", "user": "1"}
    assert "4 / 5 accepted (80%)" in page.inner_text("#by-prompt-kind")
    assert page.inner_text("#tuning tr.chosen td:first-child") == "0.60"
    assert page.locator("#trainings-chart g.group").count() == 3
    assert page.locator("#trainings-chart g.optimistic").count() == 1
    page.wait_for_function(
        "() => [...document.querySelectorAll('.tile img')]"
        ".every(i => i.complete && i.naturalWidth > 0)"
    )
    screenshot(page, "07-class-report")

    # when: the admin opens the training from its job's link on the jobs page
    page.click("nav >> text=Jobs")
    page.wait_for_url(f"{server.url}/admin")
    page.click(f'a[href="/admin/trainings/{training_id}"]')
    page.wait_for_url(f"**/admin/trainings/{training_id}")

    # then: its evaluation per class and per fold, and the comparison with its baseline
    assert page.inner_text("#eval-set") == "held_out_shots"
    assert page.inner_text("#miou") == "0.710"
    assert page.inner_text("#difference") == "+0.130"
    assert page.locator("#folds tbody tr").count() == 3
    assert page.locator("#per-class tbody tr").count() == 2
    assert page.locator("#per-class-chart rect.bar-baseline").count() == 2 + 1  # + the legend
    screenshot(page, "08-training")


def test_an_admin_creates_a_key_sees_it_listed_and_revokes_it(page: Any, server: Server) -> None:
    # given: the admin signed in, on the keys page
    sign_in(page, server, server.admin_key)
    page.wait_for_url(f"{server.url}/admin")
    page.click("nav >> text=Keys")
    page.wait_for_url(f"{server.url}/admin/keys")

    # when: the admin creates a user key for a new owner
    page.fill("#key-name", "browser ci")
    page.click("#create-key button[type=submit]")

    # then: the key is shown once, and listed (without its secret); it works
    key = page.inner_text("#new-key-value").strip()
    assert key.startswith("adk_")
    row = page.locator(
        "#keys tr.key", has=page.locator('[data-field="name"]', has_text="browser ci")
    )
    assert row.locator('[data-field="kind"]').inner_text() == "user"
    screenshot(page, "09-key-created")
    api = httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {key}"})
    assert api.get("/v1/jobs").status_code == 200
    page.goto(f"{server.url}/admin/keys")
    assert key not in page.content()

    # when: the admin revokes it, confirming the question the page asks
    questions: list[str] = []

    def confirm(dialog: Any) -> None:
        questions.append(dialog.message)
        dialog.accept()

    page.on("dialog", confirm)
    row.locator("form.revoke-key button").click()
    row.locator('[data-field="revoked_at"]', has_text=":").wait_for()

    # then: it is marked revoked, and the API refuses it at once
    assert questions and "browser ci" in questions[0]
    assert row.locator("form.revoke-key").count() == 0
    assert "revoked" in (row.get_attribute("class") or "")
    refused = api.get("/v1/jobs")
    assert refused.status_code == 401
    assert refused.headers["content-type"] == "application/problem+json"
    api.close()
    screenshot(page, "10-key-revoked")
