"""Samples: listing a class's finished samples with filters and cursors, and fetching each
sample's image and mask."""

from __future__ import annotations

import uuid
from typing import Any

import pytest

from service.pagination import encode_cursor
from service.schemas import SamplePublic
from tests.api_support import Api, ApiFactory, PresigningStorage, add_class, add_sample

pytest_plugins = ["tests.api_support"]

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@pytest.fixture
def finished_class(api: Api) -> uuid.UUID:
    """Alice's class with six finished samples (even indices accepted, CLIP score 10·index)
    and one still being worked on."""
    class_id, _ = add_class(api, owner_id=api.alice_id, status="running")
    for index in range(6):
        add_sample(api, class_id, index, accepted=index % 2 == 0, clip_score=10.0 * index)
    add_sample(api, class_id, 6, finalized=False)
    return class_id


def indices(api: Api, class_id: uuid.UUID, **params: Any) -> list[int]:
    response = api.alice.get(f"/v1/classes/{class_id}/samples", params=params)
    assert response.status_code == 200, response.text
    return [sample["index"] for sample in response.json()["items"]]


def test_only_finished_samples_are_listed_in_index_order(
    api: Api, finished_class: uuid.UUID
) -> None:
    assert indices(api, finished_class) == [0, 1, 2, 3, 4, 5]


def test_a_sample_s_fields_come_in_the_schema_s_order(api: Api, finished_class: uuid.UUID) -> None:
    listed = api.alice.get(f"/v1/classes/{finished_class}/samples", params={"limit": 1})
    (item,) = listed.json()["items"]

    assert list(item) == list(SamplePublic.model_fields)


@pytest.mark.parametrize(
    ("params", "expected"),
    [
        ({"accepted": "true"}, [0, 2, 4]),
        ({"accepted": "false"}, [1, 3, 5]),
        ({"min_clip_score": 25}, [3, 4, 5]),
        ({"accepted": "true", "min_clip_score": 15}, [2, 4]),
        ({"min_clip_score": 99}, []),
    ],
)
def test_samples_are_filtered(
    api: Api, finished_class: uuid.UUID, params: dict[str, Any], expected: list[int]
) -> None:
    assert indices(api, finished_class, **params) == expected


def test_a_cursor_walk_covers_each_filtered_sample_once(
    api: Api, finished_class: uuid.UUID
) -> None:
    seen, cursor = [], None
    while True:
        params: dict[str, Any] = {"limit": 2, "accepted": "false"}
        if cursor:
            params["cursor"] = cursor
        page = api.alice.get(f"/v1/classes/{finished_class}/samples", params=params).json()
        seen += [sample["index"] for sample in page["items"]]
        cursor = page["next_cursor"]
        if cursor is None:
            break

    assert seen == [1, 3, 5]


def test_a_sample_lists_its_fields_and_urls_of_its_pngs(
    api: Api, finished_class: uuid.UUID
) -> None:
    page = api.alice.get(f"/v1/classes/{finished_class}/samples", params={"limit": 1}).json()
    sample = page["items"][0]

    assert sample["class_id"] == str(finished_class)
    assert sample["prompt_kind"] == "inversion" and sample["mask_source"] == "consensus"
    assert sample["accepted"] is True and (sample["width"], sample["height"]) == (8, 8)
    assert sample["image_url"] == f"http://testserver/v1/samples/{sample['id']}/image"
    assert sample["mask_url"] == f"http://testserver/v1/samples/{sample['id']}/mask"
    for url in (sample["image_url"], sample["mask_url"]):
        blob = api.alice.get(url)
        assert blob.status_code == 200
        assert blob.headers["content-type"] == "image/png"
        assert blob.content.startswith(PNG_SIGNATURE)


def test_an_unfinished_sample_has_no_image_yet(api: Api) -> None:
    class_id, _ = add_class(api, owner_id=api.alice_id, status="running")
    sample_id = add_sample(api, class_id, 0, finalized=False)

    assert api.alice.get(f"/v1/samples/{sample_id}/image").status_code == 404


def test_sample_blobs_redirect_to_presigned_urls_when_the_store_offers_them(
    make_api: ApiFactory, tmp_path: Any
) -> None:
    api = make_api(storage=PresigningStorage(tmp_path / "presigning"))
    class_id, _ = add_class(api, owner_id=api.alice_id)
    sample_id = add_sample(api, class_id, 3)

    response = api.alice.get(f"/v1/samples/{sample_id}/mask", follow_redirects=False)

    assert response.status_code == 307
    assert response.headers["location"] == (
        f"https://blobs.example/classes/{class_id}/samples/00003/mask.png?expires=900"
    )


@pytest.mark.parametrize(
    "params",
    [
        {"cursor": "%%%"},
        {"cursor": encode_cursor(["three"])},
        {"cursor": encode_cursor([1, 2])},
    ],
)
def test_a_malformed_sample_cursor_is_refused(
    api: Api, finished_class: uuid.UUID, params: dict[str, str]
) -> None:
    response = api.alice.get(f"/v1/classes/{finished_class}/samples", params=params)

    assert response.status_code == 400


@pytest.mark.parametrize(
    "params", [{"limit": 0}, {"limit": 201}, {"min_clip_score": -1}, {"min_clip_score": "nan"}]
)
def test_bad_sample_filters_are_refused(
    api: Api, finished_class: uuid.UUID, params: dict[str, Any]
) -> None:
    response = api.alice.get(f"/v1/classes/{finished_class}/samples", params=params)

    assert response.status_code == 422
    assert response.json()["errors"][0]["field"] == next(iter(params))


def test_samples_of_an_unknown_class_are_not_found(api: Api) -> None:
    response = api.alice.get(f"/v1/classes/{uuid.uuid4()}/samples")

    assert response.status_code == 404
