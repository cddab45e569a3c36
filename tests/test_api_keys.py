"""`/v1/keys`: the lifecycle of API keys. A key is created with its secret shown once, listed
without it, and revoked: refused at once by the process that revoked it and by every other
within the auth cache's time. A user key manages its own owner's keys; an admin key everyone's.
`last_used_at` is kept without a write per request.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import timedelta
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import event, update

from service.app import create_app
from service.auth import LAST_USED_GRANULARITY_SECONDS
from service.models import ApiKey, utcnow
from service.queue import RecordingQueue
from tests.api_support import Api, ApiFactory

pytest_plugins = ["tests.api_support"]


def create(client: TestClient, **body: Any) -> dict[str, Any]:
    """A key made through the API (named "ci" unless told), as its creator gets it."""
    response = client.post("/v1/keys", json={"name": "ci", **body})
    assert response.status_code == 201, response.text
    return response.json()  # type: ignore[no-any-return]


def bearer(api: Api, key: str) -> TestClient:
    return TestClient(api.app, headers={"Authorization": f"Bearer {key}"})


def listed(client: TestClient, **params: Any) -> list[dict[str, Any]]:
    response = client.get("/v1/keys", params=params)
    assert response.status_code == 200, response.text
    return response.json()["items"]  # type: ignore[no-any-return]


def key_row(api: Api, key_id: str) -> ApiKey:
    with api.session() as session:
        row = session.get(ApiKey, uuid.UUID(key_id))
        assert row is not None
        return row


# --- creating --------------------------------------------------------------------------------


def test_a_user_creates_a_key_of_its_own_owner_and_sees_the_secret_once(api: Api) -> None:
    # when: alice creates a key
    response = api.alice.post("/v1/keys", json={"name": "  laptop "})

    # then: it is hers, a user key, and its secret works at once
    assert response.status_code == 201, response.text
    assert response.headers["cache-control"] == "no-store"
    created = response.json()
    assert set(created) == {"id", "name", "admin", "owner_id", "key", "created_at"}
    assert created["name"] == "laptop"
    assert created["admin"] is False
    assert created["owner_id"] == str(api.alice_id)
    assert bearer(api, created["key"]).get("/v1/classes").status_code == 200
    # and it is listed, never with its secret, nor is the secret stored
    mine = next(key for key in listed(api.alice) if key["id"] == created["id"])
    assert set(mine) == {
        "id",
        "name",
        "admin",
        "owner_id",
        "created_at",
        "last_used_at",
        "revoked_at",
    }
    assert key_row(api, created["id"]).key_hash != created["key"]


def test_a_user_key_creates_neither_admin_keys_nor_keys_of_other_owners(api: Api) -> None:
    before = listed(api.admin)

    as_admin = api.alice.post("/v1/keys", json={"name": "sudo", "admin": True})
    for_bob = api.alice.post("/v1/keys", json={"name": "x", "owner_id": str(api.bob_id)})
    for_nobody = api.alice.post("/v1/keys", json={"name": "x", "owner_id": str(uuid.uuid4())})
    for_herself = api.alice.post("/v1/keys", json={"name": "x", "owner_id": str(api.alice_id)})

    for refused in (as_admin, for_bob, for_nobody):
        assert refused.status_code == 403, refused.text
        assert refused.headers["content-type"] == "application/problem+json"
    # whether the other owner exists or not, the answer is the same: it reveals nothing
    assert for_bob.json() == for_nobody.json()
    assert for_herself.status_code == 201
    assert len(listed(api.admin)) == len(before) + 1


def test_an_admin_creates_keys_of_any_owner_of_a_new_owner_and_admin_keys(api: Api) -> None:
    # when: the admin creates a key for bob, one for a new owner, and an admin key
    bobs = create(api.admin, name="bob's ci", owner_id=str(api.bob_id))
    newcomers = create(api.admin, name="carol")
    second_admin = create(api.admin, name="ops", admin=True)

    # then: bob's is bob's, carol's has an owner of its own, and the admin key sees everyone
    assert bobs["owner_id"] == str(api.bob_id)
    assert bobs["id"] in {key["id"] for key in listed(api.bob)}
    assert newcomers["owner_id"] not in {str(api.alice_id), str(api.bob_id)}
    assert listed(bearer(api, newcomers["key"])) == [
        key for key in listed(api.admin) if key["id"] == newcomers["id"]
    ]
    assert second_admin["admin"] is True
    everyone = {key["owner_id"] for key in listed(bearer(api, second_admin["key"]))}
    assert {str(api.alice_id), str(api.bob_id), newcomers["owner_id"]} <= everyone


def test_an_admin_naming_an_unknown_owner_is_refused_on_that_field(api: Api) -> None:
    before = listed(api.admin)

    response = api.admin.post("/v1/keys", json={"name": "x", "owner_id": str(uuid.uuid4())})

    assert response.status_code == 422
    assert [error["field"] for error in response.json()["errors"]] == ["owner_id"]
    assert listed(api.admin) == before


@pytest.mark.parametrize(
    "body",
    [
        {},
        {"name": ""},
        {"name": "   "},
        {"name": "a\x00b"},
        {"name": "x" * 129},
        {"name": "x", "admin": "maybe"},
        {"name": "x", "owner_id": "alice"},
        {"name": "x", "key": "adk_mine"},
        {"name": "x", "id": str(uuid.uuid4())},
    ],
    ids=[
        "no-name",
        "empty",
        "blank",
        "nul",
        "too-long",
        "admin-not-bool",
        "owner-not-uuid",
        "key",
        "id",
    ],
)
def test_an_invalid_key_request_is_refused(api: Api, body: dict[str, Any]) -> None:
    before = listed(api.admin)

    response = api.admin.post("/v1/keys", json=body)

    assert response.status_code == 422, response.text
    assert response.json()["errors"]
    assert listed(api.admin) == before


# --- listing ---------------------------------------------------------------------------------


def test_a_user_lists_its_owners_keys_newest_first_and_an_admin_everyones(api: Api) -> None:
    first = create(api.alice, name="first")
    second = create(api.alice, name="second")
    bobs = create(api.bob, name="bob's")

    alices = [key["id"] for key in listed(api.alice)]
    everyone = {key["id"] for key in listed(api.admin)}

    assert alices[:2] == [second["id"], first["id"]]
    assert len(alices) == 3  # and the key of the api fixture
    assert bobs["id"] not in alices
    assert {first["id"], second["id"], bobs["id"]} <= everyone


def test_a_cursor_walk_lists_every_key_once(api: Api) -> None:
    made = [create(api.alice, name=f"k{i}")["id"] for i in range(5)]

    seen, cursor = [], None
    while True:
        params: dict[str, Any] = {"limit": 2} | ({"cursor": cursor} if cursor else {})
        page = api.alice.get("/v1/keys", params=params).json()
        seen += [key["id"] for key in page["items"]]
        if (cursor := page["next_cursor"]) is None:
            break

    assert seen[:5] == made[::-1]
    assert len(seen) == len(set(seen)) == 6


def test_a_forged_cursor_is_the_clients_error(api: Api) -> None:
    response = api.alice.get("/v1/keys", params={"cursor": "not-a-cursor"})

    assert response.status_code == 400
    assert response.headers["content-type"] == "application/problem+json"


# --- revoking --------------------------------------------------------------------------------


def test_a_revoked_key_is_refused_at_once_and_revoking_it_again_changes_nothing(
    api: Api,
) -> None:
    # given: a key of alice's, in use (so this process has it cached)
    created = create(api.alice, name="ci")
    ci = bearer(api, created["key"])
    assert ci.get("/v1/jobs").status_code == 200

    # when: alice revokes it, twice
    first = api.alice.delete(f"/v1/keys/{created['id']}")
    revoked_at = key_row(api, created["id"]).revoked_at
    again = api.alice.delete(f"/v1/keys/{created['id']}")

    # then: both answer 204, the key is refused, and it is listed as revoked when first revoked
    assert (first.status_code, again.status_code) == (204, 204)
    assert first.content == b""
    refused = ci.get("/v1/jobs")
    assert refused.status_code == 401
    assert refused.headers["content-type"] == "application/problem+json"
    assert revoked_at is not None
    assert key_row(api, created["id"]).revoked_at == revoked_at
    mine = next(key for key in listed(api.alice) if key["id"] == created["id"])
    assert mine["revoked_at"] is not None
    assert api.alice.get("/v1/jobs").status_code == 200  # her other key goes on


def test_a_key_may_revoke_itself(api: Api) -> None:
    created = create(api.alice, name="leaked")
    leaked = bearer(api, created["key"])

    assert leaked.delete(f"/v1/keys/{created['id']}").status_code == 204
    assert leaked.get("/v1/keys").status_code == 401


def test_another_owners_key_answers_404_and_an_admin_revokes_anyones(api: Api) -> None:
    alices = create(api.alice, name="ci")

    bobs_try = api.bob.delete(f"/v1/keys/{alices['id']}")
    missing = api.bob.delete(f"/v1/keys/{uuid.uuid4()}")

    assert bobs_try.status_code == 404
    assert bobs_try.json() == missing.json()
    assert bearer(api, alices["key"]).get("/v1/jobs").status_code == 200
    assert api.admin.delete(f"/v1/keys/{alices['id']}").status_code == 204
    assert bearer(api, alices["key"]).get("/v1/jobs").status_code == 401


def test_another_process_refuses_a_revoked_key_within_the_cache_time(
    make_api: ApiFactory,
) -> None:
    # given: two API processes on one database, each trusting a verified key for 1 s, and a
    # key both have just verified
    api = make_api(auth_cache_seconds=1.0)
    other = create_app(api.settings, queue=RecordingQueue())
    try:
        created = create(api.alice, name="ci")
        headers = {"Authorization": f"Bearer {created['key']}"}
        here, there = TestClient(api.app, headers=headers), TestClient(other, headers=headers)
        assert here.get("/v1/jobs").status_code == 200
        assert there.get("/v1/jobs").status_code == 200

        # when: it is revoked through the first
        assert api.alice.delete(f"/v1/keys/{created['id']}").status_code == 204
        revoked = time.monotonic()

        # then: the first refuses it at once, and the other within the cache's time
        assert here.get("/v1/jobs").status_code == 401
        while there.get("/v1/jobs").status_code != 401:
            assert time.monotonic() - revoked < api.settings.auth_cache_seconds + 1.0
            time.sleep(0.05)
    finally:
        other.state.engine.dispose()


# --- last used ---------------------------------------------------------------------------------


@contextmanager
def key_updates(api: Api) -> Iterator[list[str]]:
    """The UPDATE statements on `api_keys` the app sends while the block runs."""
    statements: list[str] = []

    def before(_conn: Any, _cursor: Any, statement: str, *_: Any) -> None:
        if statement.lstrip().upper().startswith("UPDATE API_KEYS"):
            statements.append(statement)

    event.listen(api.app.state.engine, "before_cursor_execute", before)
    try:
        yield statements
    finally:
        event.remove(api.app.state.engine, "before_cursor_execute", before)


@pytest.mark.parametrize("cache_seconds", [10.0, 0.0], ids=["cached", "uncached"])
def test_last_used_is_recorded_without_a_write_per_request(
    make_api: ApiFactory, cache_seconds: float
) -> None:
    # given: a new key, never used; with or without the auth cache (every request then
    # verifies the key against the database)
    api = make_api(auth_cache_seconds=cache_seconds)
    created = create(api.alice, name="busy")
    busy = bearer(api, created["key"])
    assert key_row(api, created["id"]).last_used_at is None

    # when: it makes 20 requests
    started = utcnow()
    with key_updates(api) as written:
        for _ in range(20):
            assert busy.get("/v1/jobs").status_code == 200

    # then: its use was recorded once, not 20 times
    assert len(written) == 1, written
    last_used = key_row(api, created["id"]).last_used_at
    assert last_used is not None and last_used >= started - timedelta(seconds=1)
    mine = next(key for key in listed(api.alice) if key["id"] == created["id"])
    assert mine["last_used_at"] is not None


def test_last_used_is_written_again_once_it_is_older_than_its_granularity(
    make_api: ApiFactory,
) -> None:
    # given: a key last used longer ago than the granularity, in a process without a cache
    api = make_api(auth_cache_seconds=0.0)
    created = create(api.alice, name="weekly")
    long_ago = utcnow() - timedelta(seconds=LAST_USED_GRANULARITY_SECONDS + 5)
    with api.session() as session:
        session.execute(
            update(ApiKey)
            .where(ApiKey.id == uuid.UUID(created["id"]))
            .values(last_used_at=long_ago)
        )
        session.commit()

    # when: it is used
    assert bearer(api, created["key"]).get("/v1/jobs").status_code == 200

    # then: the time is brought up to date
    last_used = key_row(api, created["id"]).last_used_at
    assert last_used is not None and last_used > long_ago + timedelta(seconds=5)
