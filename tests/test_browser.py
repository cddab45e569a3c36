"""The dashboard in a real browser (Debian's headless Chromium through Playwright) against a live
`aligndiff serve` on loopback: sign in, watch a job's progress advance without a reload,
cancel it, refuse cross-site posts, and sort a class's gallery by score. Screenshots go to
`test-artifacts/` (ALIGNDIFF_TEST_ARTIFACTS)."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.browser_support import (
    chromium,
    create_class,
    screenshot,
    sign_in,
    wait_for_status,
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
