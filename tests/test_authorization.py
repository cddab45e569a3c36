"""Authorization over every route the app has, found by walking `app.routes`: a route added
later is covered without editing this file. Another owner's ids answer 404 (the same 404 as an
id that does not exist), every admin route refuses a user key with 403, fields a client must
not set are refused rather than ignored, and no key is stored in plaintext anywhere.
"""

from __future__ import annotations

import json
import re
import uuid
from typing import Any

import pytest
from fastapi.routing import APIRoute, iter_route_contexts
from sqlalchemy import select

from service.auth import create_key, key_of
from service.models import Base, Job, Shot, Training
from service.storage import shot_key
from tests.api_support import (
    Api,
    add_class,
    add_embedding,
    add_sample,
    box_mask,
    class_form,
    encode,
    pair,
    photo,
)

pytest_plugins = ["tests.api_support"]

# Public by design: the sign-in page, where a browser exchanges an admin key for a session (it
# refuses a user key in its own way, tested with the dashboard), and the stylesheets and
# scripts that page loads before anyone has signed in.
PUBLIC_ADMIN_PATHS = {"/admin/sign-in", "/admin/static/{name}"}
PATH_PARAMETER = re.compile(r"\{(\w+)(?::\w+)?\}")


def add_training(api: Api, *, owner_id: uuid.UUID, class_id: uuid.UUID) -> uuid.UUID:
    """A failed training and its job, inserted directly, as a worker leaves one."""
    training_id = uuid.uuid4()
    with api.session() as session:
        job = Job(kind="training", owner_id=owner_id, target_id=training_id, status="failed")
        session.add(job)
        session.flush()
        session.add(
            Training(
                id=training_id,
                owner_id=owner_id,
                class_ids=[str(class_id)],
                architecture="deeplabv3",
                steps=10,
                batch_size=2,
                use_synthetic=True,
                copy_paste=True,
                compare_baseline=False,
                job_id=job.id,
            )
        )
        session.commit()
    return training_id


def add_shot(api: Api, class_id: uuid.UUID) -> uuid.UUID:
    """A class's first shot with its blobs, as an upload stores it."""
    keys = {name: shot_key(class_id, 0, name) for name in ("image.png", "mask.png")}
    api.storage.put(keys["image.png"], encode(photo()), content_type="image/png")
    api.storage.put(keys["mask.png"], encode(box_mask()), content_type="image/png")
    with api.session() as session:
        shot = Shot(
            class_id=class_id,
            position=0,
            filename="dog.jpg",
            width=24,
            height=16,
            original_key=keys["image.png"],
            original_mask_key=keys["mask.png"],
            image_key=keys["image.png"],
            mask_key=keys["mask.png"],
        )
        session.add(shot)
        session.commit()
        return shot.id


def add_key(api: Api, *, owner_id: uuid.UUID) -> uuid.UUID:
    """Another key of the owner's (not the one its client uses: a route may revoke it)."""
    with api.session() as session:
        key = key_of(session, create_key(session, name="spare", admin=False, owner_id=owner_id))
        assert key is not None
        session.commit()
        return key.id


@pytest.fixture
def alices_ids(api: Api) -> dict[str, uuid.UUID]:
    """An id of alice's for every kind of `{…_id}` path parameter the routes use."""
    class_id, job_id = add_class(api, owner_id=api.alice_id, status="succeeded")
    add_embedding(api, class_id, b"embedding")
    sample_id = add_sample(api, class_id, 0)
    return {
        "class_id": class_id,
        "job_id": job_id,
        "sample_id": sample_id,
        "shot_id": add_shot(api, class_id),
        "training_id": add_training(api, owner_id=api.alice_id, class_id=class_id),
        "key_id": add_key(api, owner_id=api.alice_id),
    }


def api_routes(api: Api) -> list[tuple[str, str]]:
    """(method, path) of every route of the app, in or out of the OpenAPI schema, deletes
    last (they end what they name)."""
    found = {
        (method, context.path)
        for context in iter_route_contexts(api.app.routes)
        if isinstance(context.original_route, APIRoute)
        for method in context.methods or ()
    }
    return sorted(found, key=lambda item: (item[0] == "DELETE", item))


def well_formed(api: Api, method: str, path: str) -> dict[str, Any]:
    """Request arguments that pass the route's own validation (required query parameters,
    files), so that what answers is the route's access check and not a 422."""
    operation = api.app.openapi()["paths"].get(path, {}).get(method.lower(), {})
    params = {
        parameter["name"]: _valid_value(parameter.get("schema", {}))
        for parameter in operation.get("parameters", [])
        if parameter["in"] == "query" and parameter.get("required")
    }
    arguments: dict[str, Any] = {"params": params}
    body = operation.get("requestBody", {}).get("content", {})
    if "multipart/form-data" in body:
        arguments["files"] = [
            (name, ("shot.png", encode(box_mask() if "mask" in name else photo()), ""))
            for name in _form_fields(api, body["multipart/form-data"]["schema"])
        ]
    elif "application/json" in body:
        arguments["json"] = _json_body(api, body["application/json"]["schema"])
    return arguments


def _json_body(api: Api, schema: dict[str, Any]) -> dict[str, Any]:
    """A JSON body with a valid value for each required field of the request schema."""
    if "$ref" in schema:
        name = schema["$ref"].rsplit("/", 1)[-1]
        schema = api.app.openapi()["components"]["schemas"][name]
    samples = {"boolean": True, "integer": 1, "number": 1, "string": "x", "array": []}
    properties = schema.get("properties", {})
    return {
        name: samples[properties[name].get("type", "string")] for name in schema.get("required", [])
    }


def _valid_value(schema: dict[str, Any]) -> str:
    return str(schema["enum"][0]) if "enum" in schema else "1"


def _form_fields(api: Api, schema: dict[str, Any]) -> list[str]:
    if "$ref" in schema:
        name = schema["$ref"].rsplit("/", 1)[-1]
        schema = api.app.openapi()["components"]["schemas"][name]
    return list(schema.get("properties", {}))


def fill(path: str, ids: dict[str, uuid.UUID]) -> str:
    names = PATH_PARAMETER.findall(path)
    unknown = [name for name in names if name not in ids]
    assert not unknown, f"{path}: give the test an id for {unknown} (see alices_ids)"
    return PATH_PARAMETER.sub(lambda match: str(ids[match[1]]), path)


# --- another owner's ids -------------------------------------------------------------------


def test_every_route_with_an_id_answers_another_owner_as_if_it_did_not_exist(
    api: Api, alices_ids: dict[str, uuid.UUID]
) -> None:
    # given: every route whose path names a resource by id
    # (admin routes refuse user keys before any lookup: see below)
    routes = [
        (method, path)
        for method, path in api_routes(api)
        if "{" in path and not path.startswith("/admin")
    ]
    assert len(routes) >= 12, routes
    nobodys = {name: uuid.uuid4() for name in alices_ids}

    for method, path in routes:
        arguments = well_formed(api, method, path)

        # when: bob asks for alice's resource, and for one that does not exist
        bobs = api.bob.request(method, fill(path, alices_ids), **arguments)
        missing = api.bob.request(method, fill(path, nobodys), **arguments)
        # and alice asks for her own (after bob, so that a delete of hers comes last)
        alices = api.alice.request(method, fill(path, alices_ids), **arguments)

        # then: bob gets the 404 of a missing resource, alice does not
        where = f"{method} {path}"
        assert bobs.status_code == 404, (where, bobs.status_code, bobs.text)
        assert bobs.json() == missing.json(), where
        assert alices.status_code != 404, (where, alices.text)


# --- admin routes --------------------------------------------------------------------------


def test_every_admin_route_refuses_a_user_key(api: Api, alices_ids: dict[str, uuid.UUID]) -> None:
    # given: every route under /admin, whatever the dashboard holds now
    routes = [
        (method, path)
        for method, path in api_routes(api)
        if path.startswith("/admin") and path not in PUBLIC_ADMIN_PATHS
    ]
    assert routes, "the app has no admin route"

    for method, path in routes:
        # when: alice, who holds a user key, calls it
        url = fill(path, alices_ids)
        answer = api.alice.request(method, url, **well_formed(api, method, path))

        # then: forbidden, and an admin key gets past the same check
        where = f"{method} {path}"
        assert answer.status_code == 403, (where, answer.status_code, answer.text[:300])
        assert answer.headers["content-type"] == "application/problem+json", where
        admins = api.admin.request(method, url, **well_formed(api, method, path))
        assert admins.status_code != 403, (where, admins.text[:300])


# --- mass assignment -----------------------------------------------------------------------

SERVER_SET = [
    {"owner_id": "00000000-0000-0000-0000-000000000001"},
    {"status": "succeeded"},
    {"id": "00000000-0000-0000-0000-000000000002"},
]


@pytest.mark.parametrize("extra", SERVER_SET)
def test_a_class_upload_that_sets_server_fields_is_refused(api: Api, extra: dict[str, str]) -> None:
    # when: a valid upload that also tries to set a field the server decides
    response = api.alice.post("/v1/classes", data=class_form(**extra), files=pair())

    # then: refused, naming the field, and nothing is kept
    assert response.status_code == 422, response.text
    assert [error["field"] for error in response.json()["errors"]] == list(extra)
    api.assert_nothing_stored()


@pytest.mark.parametrize("extra", SERVER_SET)
def test_a_training_that_sets_server_fields_is_refused(
    api: Api, alices_ids: dict[str, uuid.UUID], extra: dict[str, str]
) -> None:
    body = {"class_ids": [str(alices_ids["class_id"])], "architecture": "deeplabv3", **extra}
    before = api.work_rows()

    # when: as JSON, and as the multipart variant with the field beside `request`
    as_json = api.alice.post("/v1/trainings", json=body)
    as_form = api.alice.post(
        "/v1/trainings",
        data={"request": json.dumps(body), **extra},
        files=[("val_images", ("v.png", encode(photo()), ""))],
    )

    # then: both refused, naming the field, and nothing is kept
    for response in (as_json, as_form):
        assert response.status_code == 422, response.text
        fields = [error["field"] for error in response.json()["errors"]]
        assert any(field.endswith(next(iter(extra))) for field in fields), fields
    assert api.work_rows() == before
    assert api.queue.sent == []


# --- keys at rest --------------------------------------------------------------------------


def test_no_key_is_stored_in_plaintext(api: Api) -> None:
    # given: keys of two owners and an admin, each used, one with an idempotent upload that
    # stores its answer
    for client in (api.alice, api.bob, api.admin):
        assert client.get("/v1/classes").status_code == 200
    created = api.alice.post(
        "/v1/classes", data=class_form(), files=pair(), headers={"Idempotency-Key": "k1"}
    )
    assert created.status_code == 202
    # and a key created through the API, with an Idempotency-Key as the SDK sends one
    made = api.alice.post("/v1/keys", json={"name": "ci"}, headers={"Idempotency-Key": "k2"})
    assert made.status_code == 201

    # when: every value of every row of every table is read as text
    stored = []
    with api.session() as session:
        for table in Base.metadata.sorted_tables:
            for row in session.execute(select(table)):
                stored.extend(str(value) for value in row)
    everything = "\n".join(stored)

    # then: no key, nor the secret part of one, is among them
    assert len(stored) > 20
    for key in [*api.keys.values(), made.json()["key"]]:
        secret = key.split("_", 1)[1]
        assert key not in everything
        assert secret[len(secret) // 2 :] not in everything
