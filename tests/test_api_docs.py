"""The service's front door in a real browser (Debian's headless Chromium) that reaches
nothing but loopback, as on a machine without internet: the interactive docs (`/docs`,
`/redoc`) render from the service's own files, and the root sends a browser to the
dashboard."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import uvicorn

from tests.api_support import ApiFactory, sqlite_database
from tests.browser_support import chromium
from tests.serve_support import free_port

pytest_plugins = ["tests.api_support"]

LOOPBACK = {"127.0.0.1", "localhost"}
REDOC_BADGE = "https://cdn.redoc.ly/redoc/logo-mini.svg"


@pytest.fixture
def database_url(tmp_path: Path, sqlite_template: Path) -> str:
    """SQLite only: nothing here depends on the database."""
    return sqlite_database(tmp_path, sqlite_template)


@pytest.fixture
def url(make_api: ApiFactory) -> Iterator[str]:
    """The API on a loopback port, served by uvicorn in a thread."""
    port = free_port()
    server = uvicorn.Server(
        uvicorn.Config(make_api().app, host="127.0.0.1", port=port, log_level="warning")
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.05)
    assert server.started, "the API did not start"
    yield f"http://127.0.0.1:{port}"
    server.should_exit = True
    thread.join(timeout=10)


@pytest.fixture
def offline_page() -> Iterator[tuple[Any, list[str]]]:
    """A page whose every request off loopback is refused, and the list of those refused."""
    refused: list[str] = []

    def loopback_only(route: Any) -> None:
        if urlsplit(route.request.url).hostname in LOOPBACK:
            route.continue_()
        else:
            refused.append(route.request.url)
            route.abort()

    with chromium() as browser:
        page = browser.new_page()
        page.set_default_timeout(20_000)
        page.route("**/*", loopback_only)
        yield page, refused


def test_swagger_ui_renders_every_operation_offline(
    url: str, offline_page: tuple[Any, list[str]]
) -> None:
    page, refused = offline_page

    # when: a user opens the interactive docs
    page.goto(f"{url}/docs")

    # then: Swagger UI lists the operations, and asked nothing of any other host
    page.wait_for_selector(".opblock")
    paths = page.eval_on_selector_all(
        ".opblock-summary-path", "nodes => nodes.map(n => n.dataset.path)"
    )
    assert {"/v1/classes", "/v1/trainings", "/healthz"} <= set(paths)
    assert refused == []


def test_redoc_renders_its_menu_of_operations_offline(
    url: str, offline_page: tuple[Any, list[str]]
) -> None:
    page, refused = offline_page

    page.goto(f"{url}/redoc")

    # then: its menu lists the operations (under collapsed tags) and the page documents them
    item = page.wait_for_selector("li[data-item-id$='operation/create_class']", state="attached")
    assert item is not None and item.get_attribute("aria-label") == "Create Class"
    page.locator("h2", has_text="Create Class").first.wait_for()
    # and: it asked another host for nothing but the badge ReDoc hard-codes (and drops when
    # unreachable)
    assert set(refused) <= {REDOC_BADGE}


def test_a_browser_opening_the_root_lands_on_the_dashboard(
    url: str, offline_page: tuple[Any, list[str]]
) -> None:
    page, _ = offline_page

    page.goto(f"{url}/")

    # then: the dashboard, which asks who is there first
    assert urlsplit(page.url).path == "/admin/sign-in", page.url
    assert page.locator("#key").count() == 1
