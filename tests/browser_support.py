"""Browser tests' helpers: Debian's headless Chromium driven by Playwright (no browser
download), screenshots saved as test artifacts, and classes created over HTTP."""

from __future__ import annotations

import os
import re
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import SHOTS_DIR
from tests.serve_support import Server

REPO = Path(__file__).resolve().parents[1]
CHROMIUM = Path(os.environ.get("ALIGNDIFF_TEST_CHROMIUM", "/usr/bin/chromium"))
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--no-first-run",
    "--disable-sync",
]


def artifacts_dir() -> Path:
    """Where screenshots go: `ALIGNDIFF_TEST_ARTIFACTS`, else `<repo>/test-artifacts/`."""
    folder = Path(os.environ.get("ALIGNDIFF_TEST_ARTIFACTS", REPO / "test-artifacts"))
    folder.mkdir(parents=True, exist_ok=True)
    return folder


@contextmanager
def chromium() -> Iterator[Any]:
    """A headless Chromium (Playwright's `Browser`). Fails, never skips, when it is missing:
    CI installs Debian's `chromium` package (.ci/run)."""
    if not CHROMIUM.exists():
        pytest.fail(
            f"Chromium is missing at {CHROMIUM}: install Debian's package "
            "(apt-get install chromium) or set ALIGNDIFF_TEST_CHROMIUM to its path"
        )
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            yield browser
        finally:
            browser.close()


def screenshot(page: Any, name: str) -> Path:
    path = artifacts_dir() / f"{name}.png"
    page.screenshot(path=str(path), full_page=True)
    return path


def create_class(server: Server, *, name: str, num_samples: int) -> dict[str, Any]:
    """POST /v1/classes with the dog shot, as a user of the API would."""
    shot = SHOTS_DIR / "dog"
    response = httpx.post(
        f"{server.url}/v1/classes",
        headers={"Authorization": f"Bearer {server.admin_key}"},
        data={"name": name, "num_samples": str(num_samples)},
        files=[
            ("images", ("1.jpg", (shot / "1.jpg").read_bytes(), "image/jpeg")),
            ("masks", ("1.png", (shot / "1.png").read_bytes(), "image/png")),
        ],
        timeout=30,
    )
    assert response.status_code == 202, response.text
    return response.json()  # type: ignore[no-any-return]


def wait_for_status(server: Server, class_id: str, statuses: set[str], timeout: float) -> str:
    """Poll the class over HTTP until its status is one of `statuses`."""
    deadline = time.monotonic() + timeout
    found: dict[str, Any] = {}
    while time.monotonic() < deadline:
        found = httpx.get(
            f"{server.url}/v1/classes/{class_id}",
            headers={"Authorization": f"Bearer {server.admin_key}"},
            timeout=10,
        ).json()
        if found["status"] in statuses:
            return str(found["status"])
        time.sleep(0.5)
    tail = "".join(line for line in list(server.output)[-60:] if "GET /v1/classes" not in line)
    raise AssertionError(f"class still not {statuses} after {timeout}s: {found}\n{tail}")


def sign_in(page: Any, server: Server, key: str) -> None:
    """Open the dashboard, get sent to the sign-in form, and sign in with `key`."""
    page.goto(f"{server.url}/admin")
    assert re.search(r"/admin/sign-in", page.url), page.url
    page.fill("#key", key)
    page.click("button[type=submit]")
