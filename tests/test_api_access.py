"""Who may call what: a key is required; an owner sees only its own classes, samples, blobs
and jobs (another owner's ids answer 404, never 403); an admin key sees everyone's."""

from __future__ import annotations

import uuid

import pytest

from service.models import ApiKey, utcnow
from tests.api_support import Api, add_class, add_embedding, add_sample

pytest_plugins = ["tests.api_support"]


@pytest.fixture
def alices(api: Api) -> dict[str, uuid.UUID]:
    """Alice's class (failed, so both retry and its reads apply), its job and a sample."""
    class_id, job_id = add_class(api, owner_id=api.alice_id, status="failed")
    add_embedding(api, class_id, b"embedding")
    return {"class": class_id, "job": job_id, "sample": add_sample(api, class_id, 0)}


READS = [
    "/v1/classes/{class}",
    "/v1/classes/{class}/samples",
    "/v1/classes/{class}/embedding",
    "/v1/samples/{sample}/image",
    "/v1/samples/{sample}/mask",
    "/v1/jobs/{job}",
]
WRITES = [
    ("POST", "/v1/jobs/{job}/cancel"),
    ("POST", "/v1/jobs/{job}/retry"),
    ("DELETE", "/v1/classes/{class}"),
]


@pytest.mark.parametrize("path", READS)
def test_another_owner_cannot_read_what_is_not_its_own(
    api: Api, alices: dict[str, uuid.UUID], path: str
) -> None:
    url = path.format(**alices)

    assert api.bob.get(url).status_code == 404
    assert api.alice.get(url).status_code == 200
    assert api.admin.get(url).status_code == 200


@pytest.mark.parametrize(("method", "path"), WRITES)
def test_another_owner_cannot_act_on_what_is_not_its_own(
    api: Api, alices: dict[str, uuid.UUID], method: str, path: str
) -> None:
    response = api.bob.request(method, path.format(**alices))

    assert response.status_code == 404
    assert api.alice.get(f"/v1/classes/{alices['class']}").json()["status"] == "failed"


def test_an_admin_can_act_on_any_owners_job(api: Api, alices: dict[str, uuid.UUID]) -> None:
    assert api.admin.post(f"/v1/jobs/{alices['job']}/retry").status_code == 202


def test_another_owners_classes_are_not_listed(api: Api, alices: dict[str, uuid.UUID]) -> None:
    assert api.bob.get("/v1/classes").json()["items"] == []
    assert api.bob.get("/v1/jobs").json()["items"] == []
    assert [c["id"] for c in api.admin.get("/v1/classes").json()["items"]] == [str(alices["class"])]


@pytest.mark.parametrize(
    "authorization", [None, "Bearer adk_0000000000000000", "Basic dXNlcjpwYXNz", "Bearer "]
)
@pytest.mark.parametrize("path", ["/v1/classes", "/v1/jobs", "/admin"])
def test_a_missing_or_bad_key_is_unauthorized(
    api: Api, authorization: str | None, path: str
) -> None:
    headers = {"Authorization": authorization} if authorization else {}

    response = api.anonymous.get(path, headers=headers)

    assert response.status_code == 401
    assert response.headers["content-type"] == "application/problem+json"
    assert response.headers["www-authenticate"] == "Bearer"


def test_a_revoked_key_is_unauthorized(api: Api) -> None:
    with api.session() as session:
        for key in session.query(ApiKey).all():
            key.revoked_at = utcnow()
        session.commit()

    assert api.alice.get("/v1/classes").status_code == 401


def test_an_upload_without_a_key_is_unauthorized_and_stores_nothing(api: Api) -> None:
    from tests.api_support import class_form, pair

    response = api.anonymous.post("/v1/classes", files=pair(), data=class_form())

    assert response.status_code == 401
    api.assert_nothing_stored()


def test_the_admin_page_is_for_admin_keys_only(api: Api) -> None:
    page = api.admin.get("/admin")

    assert api.anonymous.get("/admin").status_code == 401
    assert api.alice.get("/admin").status_code == 403
    assert page.status_code == 200
    assert page.headers["content-type"].startswith("text/html")
    assert "workers online" in page.text
