"""Reviewing a class's samples on the dashboard in a real browser (Debian's headless Chromium
through Playwright) against a live `aligndiff serve`: by keyboard (move with j / k and the arrow
keys, a accepts, r rejects, Enter opens a sample large) and by the tiles' buttons, without a page
reload; the tiles and the class's accepted count follow, and the API then reports the verdicts.
Screenshots go to `test-artifacts/` (ALIGNDIFF_TEST_ARTIFACTS)."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy.orm import Session

from service.auth import authenticate
from service.db import make_engine
from service.storage import LocalStorage
from tests.browser_support import chromium, screenshot, sign_in
from tests.report_support import SampleSpec, add_report_class, add_samples, rejected
from tests.serve_support import Server, running_server

pytestmark = pytest.mark.timeout(300)

# Ten finished samples, seven accepted by the filters.
SAMPLES = [
    SampleSpec(), SampleSpec(), rejected("ood", prompt_kind="text", ood_iou=0.2), SampleSpec(),
    SampleSpec(), rejected("similarity", shot_similarity=0.1), SampleSpec(), SampleSpec(),
    rejected("ood", prompt_kind="text", ood_iou=0.1), SampleSpec(),
]  # fmt: skip


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, model_cache: Path) -> Iterator[Server]:
    with running_server(tmp_path_factory.mktemp("serve"), model_cache) as server:
        yield server


@pytest.fixture
def page(server: Server) -> Iterator[Any]:
    with chromium() as browser:
        context = browser.new_context(viewport={"width": 1440, "height": 900})
        page = context.new_page()
        page.set_default_timeout(20_000)
        yield page
        context.close()


def seed_class(server: Server) -> uuid.UUID:
    """The admin's finished class of SAMPLES, written into serve's database and blob folder as
    a worker leaves them."""
    data_dir = server.workdir / "aligndiff-data"
    engine = make_engine(f"sqlite:///{data_dir / 'aligndiff.db'}")
    try:
        with Session(engine) as session:
            owner_id = authenticate(session, f"Bearer {server.admin_key}").owner_id
            class_id = add_report_class(session, owner_id=owner_id, name="phonograph")
            add_samples(session, LocalStorage(data_dir / "blobs"), class_id, SAMPLES)
            session.commit()
    finally:
        engine.dispose()
    return class_id


def api(server: Server, path: str) -> Any:
    response = httpx.get(
        f"{server.url}{path}", headers={"Authorization": f"Bearer {server.admin_key}"}
    )
    assert response.status_code == 200, response.text
    return response.json()


def tile(page: Any, index: int) -> Any:
    return page.locator(f'.tile.sample[data-index="{index}"]')


def focused_index(page: Any) -> int:
    return int(page.evaluate("document.activeElement.closest('.tile.sample').dataset.index"))


def wait_for_verdict(page: Any, index: int, label: str) -> None:
    tile(page, index).locator('[data-field="verdict"]', has_text=label).wait_for()


def test_an_admin_reviews_samples_by_keyboard_and_by_clicks(page: Any, server: Server) -> None:
    # given: a finished class of ten samples, seven accepted by the filters, on its gallery
    class_id = seed_class(server)
    sign_in(page, server, server.admin_key)
    page.wait_for_url(f"{server.url}/admin")
    page.goto(f"{server.url}/admin/classes/{class_id}")
    page.evaluate("window.__loadedOnce = true")
    assert page.inner_text("#num-accepted") == "7"
    assert tile(page, 2).locator('[data-field="verdict"]').inner_text() == "rejected · OOD filter"

    # when: the admin reviews by keyboard: the first key focuses the first sample; r rejects
    # it, a accepts the next two (each verdict moves on), an arrow skips one, r rejects
    page.keyboard.press("j")
    assert focused_index(page) == 0
    for key in ("r", "a", "a", "ArrowRight", "r"):
        page.keyboard.press(key)
    wait_for_verdict(page, 4, "rejected · reviewer")
    # ... k and the left arrow go back; Enter opens a sample large, where r rejects it
    page.keyboard.press("k")
    page.keyboard.press("ArrowLeft")
    assert focused_index(page) == 3
    page.keyboard.press("Enter")
    page.locator("#sample-dialog").wait_for(state="visible")
    assert page.inner_text("#dialog-index") == "#3"
    page.keyboard.press("r")
    page.locator("#sample-dialog").wait_for(state="hidden")
    assert focused_index(page) == 4
    # ... the down arrow goes to the same column of the next row, the up arrow back
    tile(page, 0).focus()
    start = page.evaluate("document.activeElement.getBoundingClientRect().toJSON()")
    page.keyboard.press("ArrowDown")
    below = page.evaluate("document.activeElement.getBoundingClientRect().toJSON()")
    assert below["top"] > start["top"] and below["left"] == pytest.approx(start["left"])
    page.keyboard.press("ArrowUp")
    assert focused_index(page) == 0

    # and by clicks: reject sample 9, accept sample 8 (the OOD filter rejected it)
    tile(page, 9).locator("button.reject").click()
    tile(page, 8).locator("button.accept").click()
    wait_for_verdict(page, 8, "accepted · reviewer")

    # then: each tile shows its verdict and who made it, the count follows, on the same page
    expected = {0: False, 1: True, 2: True, 3: False, 4: False, 8: True, 9: False}
    for index, accepted in expected.items():
        label = "accepted · reviewer" if accepted else "rejected · reviewer"
        wait_for_verdict(page, index, label)
    for index in (5, 6, 7):
        assert "reviewer" not in tile(page, index).inner_text()
    page.locator("#num-accepted", has_text="5").wait_for()
    assert "5 accepted" in page.inner_text("#report-summary")
    assert page.evaluate("window.__loadedOnce") is True
    assert page.locator("#review-error").is_hidden()
    tile(page, 5).focus()
    screenshot(page, "11-gallery-reviewed")

    # and: the API reports those verdicts, by a reviewer, and the class's count
    samples = api(server, f"/v1/classes/{class_id}/samples")["items"]
    reviewed = {s["index"]: s["accepted"] for s in samples if s["accepted_by"] == "user"}
    assert reviewed == expected
    assert all(s["rejected_by"] == "user" for s in samples if s["index"] in (0, 3, 4, 9))
    assert api(server, f"/v1/classes/{class_id}")["num_accepted"] == 5
    report = api(server, f"/v1/classes/{class_id}/report")["counts"]
    assert (report["accepted"], report["rejected_by"]["user"]) == (5, 4)

    # and: a reload shows the same
    page.reload()
    assert page.inner_text("#num-accepted") == "5"
    assert tile(page, 8).locator('[data-field="verdict"]').inner_text() == "accepted · reviewer"
