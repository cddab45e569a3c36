"""Review: a person's verdict on a finished sample (`PATCH /v1/samples/{id}`) and a mask they
drew (`PUT /v1/samples/{id}/mask`); who may review what, bad requests changing nothing, and
what follows a review: the class's accepted count, its report, its datasets, the dashboard's
thumbnails, the sweeper and the gallery's review buttons (CSRF included)."""

from __future__ import annotations

import io
import os
import tarfile
import threading
import time
import uuid
from datetime import datetime, timedelta
from io import BytesIO
from typing import Any

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from aligndiff.masks import binarize_mask
from service.contexts import sweeper
from service.db import session_scope
from service.models import Sample, SegClass, utcnow
from service.storage import LocalStorage, class_prefix, sample_key
from tests.api_support import (
    Api,
    add_class,
    add_sample,
    box_mask,
    csrf_token_of,
    encode,
    sign_in,
)
from tests.dataset_support import DatasetClass
from tests.review_support import SIZE, finished_class, sample_ids, two_squares

pytest_plugins = ["tests.api_support", "tests.dataset_support"]

HTML = {"Accept": "text/html"}
JSON = {"Accept": "application/json"}
HOUR = 3600


# --- helpers ---------------------------------------------------------------------------------


def row(api: Api, sample_id: uuid.UUID) -> Sample:
    with api.session() as session:
        found = session.get(Sample, sample_id)
        assert found is not None
        return found


def num_accepted(api: Api, class_id: uuid.UUID, who: str = "alice") -> int:
    response = getattr(api, who).get(f"/v1/classes/{class_id}")
    assert response.status_code == 200, response.text
    return int(response.json()["num_accepted"])


def served_mask(api: Api, sample_id: uuid.UUID) -> Any:
    """The pixels of the mask `GET /v1/samples/{id}/mask` serves."""
    response = api.alice.get(f"/v1/samples/{sample_id}/mask")
    assert response.status_code == 200, response.text
    return np.asarray(Image.open(BytesIO(response.content)))


# What the test client answers (Starlette's own copy of httpx's Response).
Answer = Any


def review(client: TestClient, sample_id: uuid.UUID, body: Any) -> Answer:
    return client.patch(f"/v1/samples/{sample_id}", json=body)


def put_mask(
    client: TestClient, sample_id: uuid.UUID, data: bytes, *, name: str = "mask.png"
) -> Answer:
    return client.put(f"/v1/samples/{sample_id}/mask", files={"mask": (name, data, "image/png")})


def stored_state(api: Api, class_id: uuid.UUID) -> tuple[Any, ...]:
    """Everything a refused request must leave as it was: the class's sample rows, its
    `num_accepted` and `updated_at`, and its blobs."""
    with api.session() as session:
        samples = session.execute(
            Sample.__table__.select().where(Sample.class_id == class_id).order_by(Sample.index)
        ).all()
        seg_class = session.get(SegClass, class_id)
        assert seg_class is not None
        return (
            samples,
            seg_class.num_accepted,
            seg_class.updated_at,
            api.blobs(class_prefix(class_id)),
        )


# --- verdicts ----------------------------------------------------------------------------------


def test_a_reviewer_rejects_a_sample_the_filters_accepted(api: Api) -> None:
    # given: a class with 3 of 5 samples accepted by the filters
    class_id = finished_class(api)
    first = sample_ids(api, class_id)[0]
    before = utcnow()

    # when: its owner rejects the first
    response = review(api.alice, first, {"accepted": False})

    # then: the sample says so, and who decided, and when
    assert response.status_code == 200, response.text
    sample = response.json()
    assert (sample["accepted"], sample["accepted_by"], sample["rejected_by"]) == (
        False, "user", "user",
    )  # fmt: skip
    assert sample["id"] == str(first) and sample["image_url"].endswith(f"/v1/samples/{first}/image")
    assert sample["reviewed_at"] is not None and row(api, first).reviewed_at >= before  # type: ignore[operator]
    # and: the class counts one accepted sample fewer, and lists it among the rejected
    assert num_accepted(api, class_id) == 2
    rejected = api.alice.get(f"/v1/classes/{class_id}/samples", params={"accepted": "false"})
    assert [s["index"] for s in rejected.json()["items"]] == [0, 1, 3]


def test_accepting_a_rejected_sample_clears_why_it_was_rejected(api: Api) -> None:
    class_id = finished_class(api)
    ood = sample_ids(api, class_id)[1]

    response = review(api.alice, ood, {"accepted": True})

    assert response.status_code == 200, response.text
    sample = response.json()
    assert (sample["accepted"], sample["accepted_by"], sample["rejected_by"]) == (
        True, "user", None,
    )  # fmt: skip
    assert num_accepted(api, class_id) == 4
    assert row(api, ood).accepted is True


def test_the_same_verdict_twice_counts_once(api: Api) -> None:
    class_id = finished_class(api)
    first = sample_ids(api, class_id)[0]

    answers = [review(api.alice, first, {"accepted": False}) for _ in range(2)]

    assert [a.status_code for a in answers] == [200, 200]
    assert num_accepted(api, class_id) == 2


def test_the_report_counts_the_reviewers_verdicts_and_masks(api: Api) -> None:
    # given: a class with 3 of 5 samples accepted, each by the filters' consensus mask
    class_id = finished_class(api)
    ids = sample_ids(api, class_id)

    # when: a reviewer rejects two accepted ones, accepts an OOD-rejected one, and draws
    # another's mask
    for sample_id, accepted in ((ids[0], False), (ids[2], False), (ids[1], True)):
        assert review(api.alice, sample_id, {"accepted": accepted}).status_code == 200
    assert put_mask(api.alice, ids[4], encode(box_mask(SIZE))).status_code == 200

    # then: the report counts them as the reviewer's
    counts = api.alice.get(f"/v1/classes/{class_id}/report").json()["counts"]
    assert (counts["samples"], counts["accepted"]) == (5, 2)
    assert counts["rejected_by"] == {"ood": 0, "similarity": 1, "user": 2}
    assert counts["by_mask_source"]["human"] == {"samples": 1, "accepted": 1}
    assert counts["by_mask_source"]["consensus"] == {"samples": 4, "accepted": 1}
    assert num_accepted(api, class_id) == counts["accepted"]


def test_reviews_of_one_class_at_once_are_all_counted(api: Api) -> None:
    # given: a class of 12 accepted samples
    class_id = finished_class(api, verdicts="+" * 12)
    ids = sample_ids(api, class_id)[:12]

    # when: 12 reviewers reject one each, all at once
    def reject(sample_id: uuid.UUID) -> None:
        with TestClient(api.app, headers={"Authorization": f"Bearer {api.keys['alice']}"}) as c:
            answers.append(review(c, sample_id, {"accepted": False}).status_code)

    answers: list[int] = []
    threads = [threading.Thread(target=reject, args=(sample_id,)) for sample_id in ids]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    # then: every verdict is in the class's count (none counted against a stale one)
    assert answers == [200] * 12
    assert num_accepted(api, class_id) == 0


# --- who may review what -----------------------------------------------------------------------


def test_another_owners_sample_is_not_found_and_stays_as_it_was(api: Api) -> None:
    class_id = finished_class(api)
    first = sample_ids(api, class_id)[0]
    before = stored_state(api, class_id)

    verdict = review(api.bob, first, {"accepted": False})
    mask = put_mask(api.bob, first, encode(box_mask(SIZE)))

    assert (verdict.status_code, mask.status_code) == (404, 404)
    assert verdict.headers["content-type"] == "application/problem+json"
    assert stored_state(api, class_id) == before


def test_an_admin_reviews_any_owners_sample(api: Api) -> None:
    class_id = finished_class(api, owner="bob")
    first = sample_ids(api, class_id)[0]

    assert review(api.admin, first, {"accepted": False}).json()["accepted_by"] == "user"
    assert put_mask(api.admin, first, encode(box_mask(SIZE))).json()["mask_source"] == "human"
    assert num_accepted(api, class_id, "bob") == 2


def test_a_sample_still_being_worked_on_or_unknown_is_not_found(api: Api) -> None:
    class_id = finished_class(api)
    unfinished = sample_ids(api, class_id)[-1]
    before = stored_state(api, class_id)

    for sample_id in (unfinished, uuid.uuid4()):
        assert review(api.alice, sample_id, {"accepted": True}).status_code == 404
        assert put_mask(api.alice, sample_id, encode(box_mask(SIZE))).status_code == 404
    assert stored_state(api, class_id) == before


def test_without_a_key_nothing_is_reviewed(api: Api) -> None:
    class_id = finished_class(api)
    first = sample_ids(api, class_id)[0]
    before = stored_state(api, class_id)

    assert review(api.anonymous, first, {"accepted": False}).status_code == 401
    assert stored_state(api, class_id) == before


# --- bad requests change nothing ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({}, "accepted"),
        ({"accepted": "false"}, "accepted"),
        ({"accepted": 0}, "accepted"),
        ({"accepted": None}, "accepted"),
        ({"accepted": False, "owner_id": "x"}, "owner_id"),
        ({"accepted": False, "mask_source": "human"}, "mask_source"),
        ([False], "body"),
    ],
    ids=["missing", "string", "number", "null", "owner_id", "mask_source", "list"],
)
def test_a_bad_verdict_is_refused_naming_its_field(api: Api, body: Any, field: str) -> None:
    class_id = finished_class(api)
    first = sample_ids(api, class_id)[0]
    before = stored_state(api, class_id)

    response = review(api.alice, first, body)

    assert response.status_code == 422
    assert response.headers["content-type"] == "application/problem+json"
    assert [error["field"] for error in response.json()["errors"]] == [field]
    assert stored_state(api, class_id) == before


def test_a_verdict_that_is_not_json_is_refused(api: Api) -> None:
    class_id = finished_class(api)
    first = sample_ids(api, class_id)[0]
    before = stored_state(api, class_id)

    response = api.alice.patch(
        f"/v1/samples/{first}", content=b"accepted=false", headers={"Content-Type": "text/plain"}
    )

    assert response.status_code == 422
    assert stored_state(api, class_id) == before


# --- a mask drawn by a person ------------------------------------------------------------------


def test_a_replaced_mask_is_stored_binary_under_the_sample_and_counted_again(api: Api) -> None:
    # given: a finished sample whose mask the filters made (one object)
    class_id = finished_class(api)
    third = sample_ids(api, class_id)[2]
    old_key = row(api, third).mask_key
    drawn = two_squares()

    # when: a person uploads a mask of two objects, drawn in gray
    response = put_mask(api.alice, third, encode(drawn))

    # then: the sample's mask is theirs, its objects counted again; its verdict stands
    assert response.status_code == 200, response.text
    sample = response.json()
    assert (sample["mask_source"], sample["instances"], sample["accepted"]) == ("human", 2, True)
    assert sample["reviewed_at"] is not None
    # and: the mask served is the upload binarized as the pipeline stores masks (0/255 PNG)
    pixels = served_mask(api, third)
    assert set(np.unique(pixels)) == {0, 255}
    assert np.array_equal(pixels == 255, binarize_mask(drawn))
    # and: it is a new blob under the sample's own prefix; the old one is still there
    new_key = row(api, third).mask_key
    assert new_key != old_key and new_key is not None
    assert new_key.startswith(sample_key(class_id, 2, ""))
    assert old_key in api.blobs(class_prefix(class_id))


def test_a_mask_can_be_replaced_again(api: Api) -> None:
    class_id = finished_class(api)
    third = sample_ids(api, class_id)[2]

    first = put_mask(api.alice, third, encode(two_squares()))
    second = put_mask(api.alice, third, encode(box_mask(SIZE)))

    assert (first.json()["instances"], second.json()["instances"]) == (2, 1)
    assert np.array_equal(served_mask(api, third) == 255, binarize_mask(box_mask(SIZE)))


def _jpeg_mask() -> bytes:
    return encode(box_mask(SIZE).convert("RGB"), "JPEG")


@pytest.mark.parametrize(
    ("data", "status", "says"),
    [
        (encode(box_mask((10, 6))), 422, ["10x6", "16x16"]),
        (encode(box_mask(SIZE, fill=0)), 422, ["empty"]),
        (encode(box_mask(SIZE, fill=255)), 422, ["full"]),
        (encode(box_mask(SIZE))[:50], 422, ["corrupt"]),
        (_jpeg_mask(), 415, ["PNG", "JPEG"]),
        (b"not an image at all", 415, ["not an image"]),
    ],
    ids=["other-size", "empty", "full", "truncated", "jpeg", "not-an-image"],
)
def test_a_bad_mask_is_refused_saying_why_and_nothing_is_stored(
    api: Api, data: bytes, status: int, says: list[str]
) -> None:
    class_id = finished_class(api)
    third = sample_ids(api, class_id)[2]
    before = stored_state(api, class_id)

    response = put_mask(api.alice, third, data)

    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/problem+json"
    (error,) = response.json()["errors"]
    assert error["field"] == "mask"
    for words in says:
        assert words in error["message"], error["message"]
    assert stored_state(api, class_id) == before


@pytest.mark.parametrize(
    ("request_kwargs", "status"),
    [
        ({"files": {"image": ("m.png", encode(box_mask(SIZE)), "image/png")}}, 422),
        (
            {
                "files": {"mask": ("m.png", encode(box_mask(SIZE)), "image/png")},
                "data": {"mask_source": "consensus"},
            },
            422,
        ),
        ({"content": encode(box_mask(SIZE)), "headers": {"Content-Type": "image/png"}}, 415),
    ],
    ids=["no-mask-field", "extra-field", "not-multipart"],
)
def test_a_mask_upload_of_the_wrong_shape_is_refused(
    api: Api, request_kwargs: dict[str, Any], status: int
) -> None:
    class_id = finished_class(api)
    third = sample_ids(api, class_id)[2]
    before = stored_state(api, class_id)

    response = api.alice.put(f"/v1/samples/{third}/mask", **request_kwargs)

    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/problem+json"
    assert stored_state(api, class_id) == before


def test_an_upload_over_the_body_limit_is_refused(make_api: Any) -> None:
    api = make_api(max_upload_bytes=2000)
    class_id = finished_class(api)
    third = sample_ids(api, class_id)[2]
    before = stored_state(api, class_id)

    response = put_mask(api.alice, third, b"\x89PNG" + bytes(5000))

    assert response.status_code == 413
    assert stored_state(api, class_id) == before


def test_the_sweeper_keeps_a_replaced_mask_and_the_one_it_replaced(api: Api) -> None:
    # given: a replaced mask, and the sweeper running long after, when every blob is old
    class_id = finished_class(api)
    third = sample_ids(api, class_id)[2]
    assert put_mask(api.alice, third, encode(two_squares())).status_code == 200
    blobs = set(api.blobs())

    def sessions() -> Any:
        return session_scope(api.app.state.session_factory)

    removed = sweeper.remove_orphaned_blobs(
        sessions=sessions,
        storage=api.storage,
        grace_seconds=HOUR,
        now=utcnow().replace(year=utcnow().year + 1),
    )

    # then: nothing of the class's samples is an orphan; the mask is still served
    assert removed == []
    assert set(api.blobs()) == blobs
    assert np.array_equal(served_mask(api, third) == 255, binarize_mask(two_squares()))


def test_a_mask_a_reviewer_drew_and_replaced_goes_once_the_replacement_is_old(api: Api) -> None:
    # given: a sample whose mask a reviewer replaced twice; every blob written long ago
    class_id = finished_class(api)
    third = sample_ids(api, class_id)[2]
    pipeline_mask = row(api, third).mask_key
    assert put_mask(api.alice, third, encode(two_squares())).status_code == 200
    first_drawn = row(api, third).mask_key
    assert put_mask(api.alice, third, encode(box_mask(SIZE))).status_code == 200
    current = row(api, third).mask_key
    assert isinstance(api.storage, LocalStorage)
    two_hours_ago = time.time() - 2 * HOUR
    for path in api.storage.root.rglob("*"):
        os.utime(path, (two_hours_ago, two_hours_ago))
    blobs = set(api.blobs())

    def sweep(now: datetime | None) -> list[str]:
        return sweeper.remove_orphaned_blobs(
            sessions=lambda: session_scope(api.app.state.session_factory),
            storage=api.storage,
            grace_seconds=HOUR,
            now=now,
        )

    # when: the sweeper runs just after the replacement, and again once it is old
    at_once = sweep(None)
    later = sweep(utcnow() + timedelta(hours=2))

    # then: at once nothing goes (an export may still read the first drawn mask); later the
    # first drawn mask goes, and the pipeline's own mask and the current one stay
    assert at_once == []
    assert later == [first_drawn]
    assert set(api.blobs()) == blobs - {first_drawn}
    assert {pipeline_mask, current} <= set(api.blobs())
    assert np.array_equal(served_mask(api, third) == 255, binarize_mask(box_mask(SIZE)))


# --- what follows a review ---------------------------------------------------------------------


def _webdataset(api: Api, dataset: DatasetClass) -> tuple[str, dict[str, bytes]]:
    """The class's accepted-only webdataset archive: its ETag and its members by name."""
    response = api.alice.get(dataset.url, params={"format": "webdataset", "accepted_only": "true"})
    assert response.status_code == 200, response.text
    with tarfile.open(fileobj=io.BytesIO(response.content)) as archive:
        members = {
            member.name: archive.extractfile(member).read()  # type: ignore[union-attr]
            for member in archive.getmembers()
            if member.isfile()
        }
    return response.headers["etag"], members


def test_a_dataset_follows_the_verdicts_and_the_replaced_masks(
    api: Api, dataset_class: DatasetClass
) -> None:
    # given: a finished class's accepted-only dataset (samples 0, 1, 3 and 4 accepted)
    etag, members = _webdataset(api, dataset_class)
    assert "sample_00000.mask.png" in members and "sample_00002.mask.png" not in members
    ids = sample_ids(api, dataset_class.id)

    # when: a reviewer rejects sample 0
    assert review(api.alice, ids[0], {"accepted": False}).status_code == 200
    rejected_etag, rejected = _webdataset(api, dataset_class)

    # then: the archive changed (a new ETag) and sample 0 is gone from it
    assert rejected_etag != etag
    assert not any(name.startswith("sample_00000.") for name in rejected)
    assert "sample_00001.mask.png" in rejected

    # when: they accept sample 2, which the filters rejected, and draw sample 1's mask
    assert review(api.alice, ids[2], {"accepted": True}).status_code == 200
    drawn = two_squares((32, 32))
    assert put_mask(api.alice, ids[1], encode(drawn)).status_code == 200
    replaced_etag, replaced = _webdataset(api, dataset_class)

    # then: sample 2 is exported, with sample 1's new mask
    assert replaced_etag not in (etag, rejected_etag)
    assert "sample_00002.mask.png" in replaced
    exported = np.asarray(Image.open(BytesIO(replaced["sample_00001.mask.png"])))
    assert np.array_equal(exported > 0, binarize_mask(drawn))


def test_the_gallery_shows_a_replaced_mask_never_its_cached_thumbnail(api: Api) -> None:
    # given: a gray sample whose left half is its mask, its thumbnail drawn and kept
    class_id, _ = add_class(api, owner_id=api.alice_id, status="succeeded")
    left = Image.new("L", (64, 64), 0)
    left.paste(255, (0, 0, 32, 64))
    sample_id = add_sample(
        api, class_id, 0, image=Image.new("RGB", (64, 64), (128, 128, 128)), mask=left
    )
    page = api.admin.get(f"/admin/classes/{class_id}").text
    old_url = f"/admin/samples/{sample_id}/thumbnail?size=128"
    assert f'src="{old_url}"' in page
    assert api.admin.get(old_url).status_code == 200
    kept = api.blobs(f"{class_prefix(class_id)}thumbnails/")

    # when: the mask is replaced by its right half
    right = Image.new("L", (64, 64), 0)
    right.paste(255, (32, 0, 64, 64))
    assert put_mask(api.alice, sample_id, encode(right)).status_code == 200

    # then: the gallery links another thumbnail URL (a browser's cached one is not reused),
    # which shows the new mask; the old thumbnail is no longer kept
    page = api.admin.get(f"/admin/classes/{class_id}").text
    assert f'src="{old_url}"' not in page
    new_url = page.split(f'src="/admin/samples/{sample_id}/thumbnail?size=128', 1)[1].split('"')[0]
    assert new_url.startswith("&amp;mask=")
    drawn = api.admin.get(old_url + new_url.replace("&amp;", "&"))
    with Image.open(BytesIO(drawn.content)) as image:
        tinted_left, tinted_right = image.getpixel((10, 32)), image.getpixel((54, 32))
    assert isinstance(tinted_left, tuple) and isinstance(tinted_right, tuple)
    assert tinted_right[0] > tinted_left[0] + 40
    assert not set(kept) & set(api.blobs(f"{class_prefix(class_id)}thumbnails/"))


# --- the gallery's review buttons --------------------------------------------------------------


def signed_in(api: Api) -> tuple[TestClient, str]:
    """A browser-like client signed in with the admin key, and its session's CSRF token."""
    browser = sign_in(api, api.keys["admin"])
    return browser, csrf_token_of(browser.get("/admin").text)


def test_the_gallery_reviews_a_sample_with_the_session_and_its_token(api: Api) -> None:
    class_id = finished_class(api, owner="bob")
    first = sample_ids(api, class_id)[0]
    browser, token = signed_in(api)

    response = browser.post(
        f"/admin/samples/{first}/review",
        data={"accepted": "false"},
        headers={"Origin": "http://testserver", "X-CSRF-Token": token, **JSON},
    )

    assert response.status_code == 200, response.text
    answer = response.json()
    assert answer["num_accepted"] == 2
    assert answer["verdict"] == {
        "accepted": False, "label": "rejected · reviewer", "title": "Rejected by a reviewer",
    }  # fmt: skip
    assert (answer["sample"]["accepted"], answer["sample"]["rejected_by"]) == (False, "user")
    assert api.bob.get(f"/v1/classes/{class_id}").json()["num_accepted"] == 2


def test_the_gallery_review_form_works_without_javascript(api: Api) -> None:
    class_id = finished_class(api)
    ood = sample_ids(api, class_id)[1]
    browser, token = signed_in(api)
    gallery = f"/admin/classes/{class_id}?sort=clip_score"

    response = browser.post(
        f"/admin/samples/{ood}/review",
        data={"accepted": "true", "csrf_token": token, "next": gallery},
        headers={"Origin": "http://testserver"},
        follow_redirects=False,
    )

    assert response.status_code == 303 and response.headers["location"] == gallery
    assert row(api, ood).accepted_by == "user" and num_accepted(api, class_id) == 4
    page = browser.get(gallery, headers=HTML).text
    assert "accepted · reviewer" in page and '<span id="num-accepted">4</span>' in page


@pytest.mark.parametrize(
    ("headers", "send_token"),
    [
        ({"Origin": "https://evil.example"}, True),
        ({"Sec-Fetch-Site": "cross-site"}, True),
        ({"Origin": "http://testserver"}, False),
    ],
    ids=["other-origin", "cross-site-fetch", "no-token"],
)
def test_a_cross_site_or_tokenless_review_is_refused(
    api: Api, headers: dict[str, str], send_token: bool
) -> None:
    class_id = finished_class(api)
    first = sample_ids(api, class_id)[0]
    browser, token = signed_in(api)
    before = stored_state(api, class_id)

    response = browser.post(
        f"/admin/samples/{first}/review",
        data={"accepted": "false", **({"csrf_token": token} if send_token else {})},
        headers=headers,
    )

    assert response.status_code == 403
    assert stored_state(api, class_id) == before


def test_a_user_key_cannot_review_from_the_dashboard(api: Api) -> None:
    class_id = finished_class(api)
    first = sample_ids(api, class_id)[0]
    before = stored_state(api, class_id)

    response = api.alice.post(f"/admin/samples/{first}/review", data={"accepted": "false"})

    assert response.status_code == 403
    assert stored_state(api, class_id) == before
