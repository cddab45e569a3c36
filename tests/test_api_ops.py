"""Operations: the service's index, liveness, readiness, Prometheus metrics and the OpenAPI
document."""

from __future__ import annotations

import uuid
from pathlib import Path

import aligndiff
from tests.api_support import Api, ApiFactory, BrokenStorage, add_class

pytest_plugins = ["tests.api_support"]

OPERATION_IDS = {
    "create_class",
    "list_classes",
    "get_class",
    "delete_class",
    "get_class_embedding",
    "get_class_report",
    "list_models",
    "list_samples",
    "get_sample_image",
    "get_sample_mask",
    "review_sample",
    "replace_sample_mask",
    "download_dataset",
    "download_datasets",
    "create_training",
    "list_trainings",
    "get_training",
    "get_training_weights",
    "predict_with_training",
    "list_jobs",
    "get_job",
    "cancel_job",
    "retry_job",
    "create_key",
    "list_keys",
    "revoke_key",
    "service_index",
    "healthz",
    "readyz",
    "metrics",
    "admin_dashboard",
}


def test_the_root_names_the_services_parts_for_an_api_client(api: Api) -> None:
    response = api.anonymous.get("/", headers={"Accept": "application/json"})

    assert response.status_code == 200
    assert response.json() == {
        "name": "AlignDiff",
        "version": aligndiff.__version__,
        "docs": "/docs",
        "openapi": "/openapi.json",
        "dashboard": "/admin",
        "health": "/healthz",
    }
    # and: each part is where the index says
    for part in ("docs", "openapi", "health"):
        assert api.anonymous.get(response.json()[part]).status_code == 200


def test_the_root_sends_a_browser_to_the_dashboard(api: Api) -> None:
    browser_accept = "text/html,application/xhtml+xml,application/xml;q=0.9,*/*;q=0.8"

    response = api.anonymous.get("/", headers={"Accept": browser_accept}, follow_redirects=False)

    assert response.status_code == 307
    assert response.headers["location"] == "/admin"


def test_healthz_answers_without_a_key(api: Api) -> None:
    response = api.anonymous.get("/healthz")

    assert response.status_code == 200
    assert response.json() == {"status": "ok"}


def test_readyz_checks_database_broker_and_storage(api: Api) -> None:
    response = api.anonymous.get("/readyz")

    assert response.status_code == 200
    assert response.json()["checks"] == {"database": "ok", "broker": "ok", "storage": "ok"}


def test_readyz_names_an_unreachable_store(make_api: ApiFactory, tmp_path: Path) -> None:
    api = make_api(storage=BrokenStorage(tmp_path / "broken"))

    response = api.anonymous.get("/readyz")

    assert response.status_code == 503
    assert response.headers["content-type"] == "application/problem+json"
    assert response.json()["errors"] == [
        {"field": "storage", "message": "StorageUnavailable: connection refused"}
    ]


def test_metrics_count_requests_by_route_template_and_jobs_by_status(api: Api) -> None:
    class_id, _ = add_class(api, owner_id=api.alice_id, status="running")
    api.alice.get(f"/v1/classes/{class_id}")
    api.bob.get(f"/v1/classes/{class_id}")

    text = api.anonymous.get("/metrics").text

    labels = 'method="GET",route="/v1/classes/{class_id}"'
    assert f'aligndiff_http_requests_total{{{labels},status="200"}} 1.0' in text
    assert f'aligndiff_http_requests_total{{{labels},status="404"}} 1.0' in text
    assert f"aligndiff_http_request_duration_seconds_count{{{labels}}} 2.0" in text
    assert 'aligndiff_jobs{kind="synthesis",status="running"} 1.0' in text


def test_metrics_label_requests_refused_before_routing_with_their_route(api: Api) -> None:
    # given: a request with a bad key, one over the upload cap, and one to no route at all
    api.anonymous.get(f"/v1/classes/{uuid.uuid4()}", headers={"Authorization": "Bearer nope"})
    too_big = b"x" * (api.settings.max_upload_bytes + 1)
    api.alice.post("/v1/classes", content=too_big, headers={"Content-Type": "multipart/form-data"})
    api.alice.get("/v1/no-such-thing")

    text = api.anonymous.get("/metrics").text

    # then: the refusals count under the routes asked for; only the unknown path is unmatched
    requests = 'aligndiff_http_requests_total{method="%s",route="%s",status="%d"} 1.0'
    assert requests % ("GET", "/v1/classes/{class_id}", 401) in text
    assert requests % ("POST", "/v1/classes", 413) in text
    assert requests % ("GET", "unmatched", 404) in text


def test_two_apps_keep_their_own_metrics(make_api: ApiFactory) -> None:
    first, second = make_api(), make_api()
    first.anonymous.get("/healthz")

    text = second.anonymous.get("/metrics").text

    assert 'route="/healthz"' not in text


def test_openapi_names_every_operation_and_documents_problems(api: Api) -> None:
    schema = api.anonymous.get("/openapi.json").json()

    operations = {
        (path, method): operation
        for path, item in schema["paths"].items()
        for method, operation in item.items()
    }
    assert {op["operationId"] for op in operations.values()} == OPERATION_IDS
    create = operations[("/v1/classes", "post")]["responses"]
    assert set(create) >= {"202", "401", "413", "415", "422"}
    assert create["422"]["content"] == {
        "application/problem+json": {"schema": {"$ref": "#/components/schemas/ProblemDetail"}}
    }
    assert "Location" in create["202"]["headers"]
    assert "HTTPValidationError" not in schema["components"]["schemas"]
