"""SDK parity: every public route of the service has a `Client` method, and each method sends
the route it stands for. The routes are found by walking the app's `app.routes`, so a route
added later fails here until the SDK calls it (and this table names the method).

Left out of the SDK, on purpose: the dashboard (`/admin…`, a browser's, behind its own
sign-in), the operations routes (`/healthz`, `/readyz`, `/metrics`: no API key, called by
orchestrators' probes and Prometheus; an SDK call on a service that is down already raises
`ConnectionFailed`, and one that is not ready answers 503, retried like any other), the
service's index `/` (a map of these for people), and the pages outside the OpenAPI schema
(the docs pages).
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi.routing import APIRoute, iter_route_contexts

from aligndiff_client import Client
from tests.api_support import Api
from tests.client_support import API_KEY, BASE_URL

pytest_plugins = ["tests.api_support"]

NOT_FOR_THE_SDK = frozenset({"/", "/healthz", "/readyz", "/metrics"})
DASHBOARD = re.compile(r"/admin(/|$)")

ID = uuid.UUID("6d1f3c1e-0000-4000-8000-000000000000")
PNG = b"\x89PNG\r\n\x1a\n"

Call = Callable[[Client, Path], Any]

# (method, path template) → the SDK method that sends it, and a call of it.
SDK_ROUTES: dict[tuple[str, str], tuple[str, Call]] = {
    ("POST", "/v1/classes"): ("create_class", lambda c, _: c.create_class("dog", [PNG], [PNG])),
    ("GET", "/v1/classes"): ("list_classes", lambda c, _: next(c.list_classes())),
    ("GET", "/v1/classes/{class_id}"): ("get_class", lambda c, _: c.get_class(ID)),
    ("DELETE", "/v1/classes/{class_id}"): ("delete_class", lambda c, _: c.delete_class(ID)),
    ("GET", "/v1/classes/{class_id}/embedding"): (
        "get_embedding",
        lambda c, tmp: c.get_embedding(ID, tmp / "dog.safetensors"),
    ),
    ("GET", "/v1/classes/{class_id}/report"): ("report", lambda c, _: c.report(ID)),
    ("GET", "/v1/classes/{class_id}/samples"): ("samples", lambda c, _: next(c.samples(ID))),
    ("GET", "/v1/classes/{class_id}/dataset"): (
        "download_dataset",
        lambda c, tmp: c.download_dataset(ID, "webdataset", tmp / "dog.tar", progress=False),
    ),
    ("GET", "/v1/datasets"): (
        "download_dataset",
        lambda c, tmp: c.download_dataset([ID, ID], "yolo", tmp / "both.zip", progress=False),
    ),
    ("GET", "/v1/samples/{sample_id}/image"): (
        "download_sample_image",
        lambda c, _: c.download_sample_image(ID),
    ),
    ("GET", "/v1/samples/{sample_id}/mask"): (
        "download_sample_mask",
        lambda c, _: c.download_sample_mask(ID),
    ),
    ("PATCH", "/v1/samples/{sample_id}"): (
        "review_sample",
        lambda c, _: c.review_sample(ID, accepted=False),
    ),
    ("PUT", "/v1/samples/{sample_id}/mask"): (
        "replace_mask",
        lambda c, _: c.replace_mask(ID, PNG),
    ),
    ("POST", "/v1/trainings"): ("train", lambda c, _: c.train([ID])),
    ("GET", "/v1/trainings"): ("list_trainings", lambda c, _: next(c.list_trainings())),
    ("GET", "/v1/trainings/{training_id}"): ("get_training", lambda c, _: c.get_training(ID)),
    ("GET", "/v1/trainings/{training_id}/weights"): (
        "download_weights",
        lambda c, tmp: c.download_weights(ID, tmp / "weights.zip", progress=False),
    ),
    ("POST", "/v1/trainings/{training_id}/predict"): (
        "predict",
        lambda c, _: c.predict(ID, PNG),
    ),
    ("GET", "/v1/jobs"): ("jobs", lambda c, _: next(c.jobs())),
    ("GET", "/v1/jobs/{job_id}"): ("get_job", lambda c, _: c.get_job(ID)),
    ("POST", "/v1/jobs/{job_id}/cancel"): ("cancel_job", lambda c, _: c.cancel_job(ID)),
    ("POST", "/v1/jobs/{job_id}/retry"): ("retry_job", lambda c, _: c.retry_job(ID)),
    ("POST", "/v1/keys"): ("create_key", lambda c, _: c.create_key("ci")),
    ("GET", "/v1/keys"): ("list_keys", lambda c, _: next(c.list_keys())),
    ("DELETE", "/v1/keys/{key_id}"): ("revoke_key", lambda c, _: c.revoke_key(ID)),
    ("GET", "/v1/models"): ("models", lambda c, _: c.models()),
}
# Routes of the contract (API.md) that the SDK may call before this service serves them.
AHEAD_OF_THE_SERVICE: frozenset[tuple[str, str]] = frozenset()


class Sent(Exception):
    """Stands in for the service's answer: the request went out, and that is all we need."""


def public_routes(api: Api) -> set[tuple[str, str]]:
    """(method, path template) of every API route of the app that SDK users call."""
    return {
        (method, context.path)
        for context in iter_route_contexts(api.app.routes)
        if isinstance(context.original_route, APIRoute)
        and context.original_route.include_in_schema
        and context.path not in NOT_FOR_THE_SDK
        and not DASHBOARD.match(context.path)
        for method in context.methods or ()
    }


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_every_public_route_has_an_sdk_method(api: Api) -> None:
    # given: the routes the app serves
    served = public_routes(api)

    # then: each has its SDK method, and the table names no route the app lacks but those
    # the contract has and the service does not serve yet
    missing = sorted(served - SDK_ROUTES.keys())
    assert not missing, (
        f"routes without an SDK method: {missing}; add one to aligndiff_client.Client and "
        "to SDK_ROUTES"
    )
    unknown = sorted(SDK_ROUTES.keys() - served - AHEAD_OF_THE_SERVICE)
    assert not unknown, f"SDK_ROUTES names routes the app does not serve: {unknown}"
    assert served >= {("GET", "/v1/classes"), ("POST", "/v1/trainings/{training_id}/predict")}


@pytest.mark.parametrize(
    "route", sorted(SDK_ROUTES), ids=[f"{m} {p}" for m, p in sorted(SDK_ROUTES)]
)
def test_each_sdk_method_sends_its_route(route: tuple[str, str], tmp_path: Path) -> None:
    # given: a client whose every request is recorded and goes no further
    method, template = route
    name, call = SDK_ROUTES[route]
    sent: list[httpx.Request] = []

    def record(request: httpx.Request) -> httpx.Response:
        sent.append(request)
        raise Sent

    with Client(BASE_URL, API_KEY, transport=httpx.MockTransport(record)) as client:
        assert callable(getattr(client, name, None)), f"Client has no {name}"
        # when
        with pytest.raises(Sent):
            call(client, tmp_path)

    # then: one request, to that route
    (request,) = sent
    assert request.method == method
    assert _path_pattern(template).fullmatch(request.url.path), request.url.path
    assert request.headers["Authorization"] == f"Bearer {API_KEY}"


def _path_pattern(template: str) -> re.Pattern[str]:
    return re.compile(re.sub(r"\\\{\w+\\\}", "[^/]+", re.escape(template)))
