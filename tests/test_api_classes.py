"""`/v1/classes`: creating a class from uploaded shots, rejecting bad uploads without a
trace, idempotent replays, listing, reading, deleting, and the embedding download."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from datetime import timedelta
from io import BytesIO
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image
from sqlalchemy import select
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import Session

from service.contexts import classes as classes_context
from service.models import Job, Sample, SegClass, Shot
from service.pagination import encode_cursor
from service.storage import class_prefix
from tests.api_support import (
    Api,
    ApiFactory,
    Files,
    add_class,
    add_embedding,
    add_sample,
    box_mask,
    class_form,
    encode,
    get_job_row,
    multipart,
    pair,
    photo,
    set_job,
    shot_files,
)

pytest_plugins = ["tests.api_support"]

SYNTHESIS_TASK = "aligndiff.synthesis.start"


def decoded(data: bytes) -> Image.Image:
    image = Image.open(BytesIO(data))
    image.load()
    return image


# --- creating a class ----------------------------------------------------------------------


def test_create_class_from_real_shots_stores_them_and_queues_synthesis(api: Api) -> None:
    # given: the dog and albatross shots, with a prompt naming the class
    files = shot_files("dog", "albatross")
    form = class_form("dog", num_samples=6, seed="42", prompts=["a dog on a beach"])

    # when
    response = api.alice.post("/v1/classes", files=files, data=form)

    # then: 202 with the class and its Location
    assert response.status_code == 202, response.text
    body = response.json()
    assert response.headers["location"] == f"http://testserver/v1/classes/{body['id']}"
    assert body["name"] == "dog"
    assert body["status"] == "queued" and body["stage"] is None and body["progress"] == 0
    assert body["num_shots"] == 2 and body["num_samples_requested"] == 6
    assert body["num_samples_done"] == 0 and body["error"] is None

    # and: the synthesis job is queued, and its start sent with the job id
    assert api.queue.sent == [(SYNTHESIS_TASK, (body["job_id"],))]
    class_id = uuid.UUID(body["id"])
    with api.session() as session:
        seg_class = session.get(SegClass, class_id)
        assert seg_class is not None and seg_class.owner_id == api.alice_id
        assert seg_class.seed == 42 and seg_class.prompts == ["a dog on a beach"]
        job = session.get(Job, uuid.UUID(body["job_id"]))
        assert job is not None and (job.kind, job.target_id) == ("synthesis", class_id)
        shots = session.execute(select(Shot).order_by(Shot.position)).scalars().all()
    assert [(s.position, s.filename) for s in shots] == [(0, "dog.jpg"), (1, "albatross.jpg")]
    assert [(s.width, s.height) for s in shots] == [(489, 366), (224, 224)]

    # and: originals kept as sent, normalized copies as PNG (RGB image, 0/255 mask)
    albatross = shots[1]
    assert api.storage.get(albatross.original_key) == files[1][1][1]
    assert api.storage.get(albatross.original_mask_key) == files[3][1][1]
    image, mask = (
        decoded(api.storage.get(albatross.image_key)),
        decoded(api.storage.get(albatross.mask_key)),
    )
    assert (image.format, image.mode, image.size) == ("PNG", "RGB", (224, 224))
    assert (mask.format, mask.mode, mask.size) == ("PNG", "L", (224, 224))
    assert set(np.unique(np.asarray(mask))) == {0, 255}
    assert len(api.blobs(class_prefix(class_id))) == 8


def test_a_class_without_a_seed_gets_a_random_one(api: Api) -> None:
    seeds = set()
    for _ in range(2):
        response = api.alice.post("/v1/classes", files=pair(), data=class_form())
        assert response.status_code == 202, response.text
        with api.session() as session:
            seg_class = session.get(SegClass, uuid.UUID(response.json()["id"]))
            assert seg_class is not None
            seeds.add(seg_class.seed)
    assert len(seeds) == 2 and all(0 <= seed < 2**63 for seed in seeds)


@pytest.mark.parametrize(
    ("sent", "bg_lambda", "auto"),
    [({}, 0.6, False), ({"bg_lambda": "1.25"}, 1.25, False), ({"bg_lambda": "auto"}, None, True)],
)
def test_a_class_takes_its_bg_lambda_or_auto(
    api: Api, sent: dict[str, str], bg_lambda: float | None, auto: bool
) -> None:
    response = api.alice.post("/v1/classes", files=pair(), data=class_form(**sent))

    assert response.status_code == 202, response.text
    body = response.json()
    assert (body["bg_lambda"], body["tuning"]) == (bg_lambda, None)
    with api.session() as session:
        seg_class = session.get(SegClass, uuid.UUID(body["id"]))
        assert seg_class is not None
        assert (seg_class.bg_lambda, seg_class.bg_lambda_auto) == (bg_lambda, auto)


def _gif() -> bytes:
    return encode(photo(), "GIF")


BAD_UPLOADS: list[Any] = [
    pytest.param(pair()[:1], class_form(), 422, "masks", id="missing-mask"),
    pytest.param(
        pair(name="a") + pair(name="b")[:1], class_form(), 422, "masks", id="count-mismatch"
    ),
    pytest.param(
        [f for _ in range(11) for f in pair()], class_form(), 422, "images", id="11-images"
    ),
    pytest.param(
        pair(mask=encode(box_mask(fill=0))), class_form(), 422, "masks[0]", id="empty-mask"
    ),
    pytest.param(
        pair(mask=encode(box_mask(fill=255))), class_form(), 422, "masks[0]", id="full-mask"
    ),
    pytest.param(
        pair(mask=encode(box_mask((30, 16)))), class_form(), 422, "masks[0]", id="size-mismatch"
    ),
    pytest.param(
        pair(name="ok") + pair(encode(photo())[:60], name="cut"),
        class_form(),
        422,
        "images[1]",
        id="truncated-second-image",
    ),
    pytest.param(pair(_gif()), class_form(), 415, "images[0]", id="gif-image"),
    pytest.param(pair(b"%PDF-1.7 not a picture"), class_form(), 415, "images[0]", id="not-image"),
    pytest.param(
        pair(mask=encode(box_mask().convert("RGB"), "JPEG")),
        class_form(),
        415,
        "masks[0]",
        id="jpeg-mask",
    ),
    pytest.param(pair(), class_form(name="d" * 65), 422, "name", id="name-too-long"),
    pytest.param(pair(), class_form(name=""), 422, "name", id="name-empty"),
    pytest.param(pair(), class_form(name="   "), 422, "name", id="name-blank"),
    pytest.param(pair(), class_form(name="가" * 64), 422, "name", id="name-over-the-tokens"),
    pytest.param(
        pair(),
        class_form(prompts=["a dog on a beach", "dog " * 76]),
        422,
        "prompts[1]",
        id="prompt-over-the-tokens",
    ),
    pytest.param(pair(), class_form(num_samples=0), 422, "num_samples", id="zero-samples"),
    pytest.param(pair(), class_form(num_samples=1001), 422, "num_samples", id="over-max"),
    pytest.param(
        pair(),
        class_form(prompts=["a dog in snow", "a cat in snow"]),
        422,
        "prompts[1]",
        id="prompt-without-class",
    ),
    pytest.param(pair(), class_form(seed="-1"), 422, "seed", id="negative-seed"),
    pytest.param(pair(), class_form(bg_lambda="2.5"), 422, "bg_lambda", id="bg-lambda-over-2"),
    pytest.param(pair(), class_form(bg_lambda="-0.1"), 422, "bg_lambda", id="bg-lambda-negative"),
    pytest.param(pair(), class_form(bg_lambda="best"), 422, "bg_lambda", id="bg-lambda-word"),
]


@pytest.mark.parametrize(("files", "form", "status", "field"), BAD_UPLOADS)
def test_a_bad_upload_is_refused_and_leaves_nothing_behind(
    api: Api, files: Files, form: dict[str, Any], status: int, field: str
) -> None:
    response = api.alice.post("/v1/classes", files=files, data=form)

    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/problem+json"
    problem = response.json()
    assert problem["status"] == status
    assert field in [error["field"] for error in problem["errors"]], problem
    api.assert_nothing_stored()


# --- prompts: the text encoder's 75 tokens, checked at the door -----------------------------

HANGUL_NAME = "한국" * 32  # 64 characters, the most a name may have
LONG_PROMPT = "a dog " + " ".join(["very"] * 87) + " fluffy"  # 90 tokens on SD 1.5


@pytest.fixture
def sd15_api(make_api: ApiFactory, real_clip_tokenizer_dir: Path) -> Api:
    """The API of a deployment on SD 1.5 (of which the API reads the tokenizer alone)."""
    return make_api(diffusion_model=str(real_clip_tokenizer_dir.parent))


def test_a_name_too_long_for_the_text_encoder_is_refused_with_its_count(sd15_api: Api) -> None:
    # when: a 64-character Hangul name, which SD 1.5's tokenizer spells in 128 tokens
    response = sd15_api.alice.post("/v1/classes", files=pair(), data=class_form(name=HANGUL_NAME))

    # then: 422 on `name`, saying how many tokens its longest prompt takes and the limit
    assert response.status_code == 422, response.text
    [error] = response.json()["errors"]
    assert error["field"] == "name"
    assert "takes 133 tokens" in error["message"] and "at most 75" in error["message"]
    assert f"a photo of a <class> {HANGUL_NAME}" in error["message"]
    sd15_api.assert_nothing_stored()
    assert sd15_api.queue.sent == []


def test_a_user_prompt_too_long_for_the_text_encoder_is_refused_with_its_count(
    sd15_api: Api,
) -> None:
    form = class_form(prompts=["a dog on a beach", LONG_PROMPT])

    response = sd15_api.alice.post("/v1/classes", files=pair(), data=form)

    assert response.status_code == 422, response.text
    assert response.json()["errors"] == [
        {
            "field": "prompts[1]",
            "message": "takes 90 tokens, and the text encoder reads at most 75 (its context "
            "less the start and end of text)",
        }
    ]
    sd15_api.assert_nothing_stored()


def test_prompts_that_fit_exactly_are_accepted(sd15_api: Api) -> None:
    # given: a prompt of exactly 75 tokens on SD 1.5, the name's prompts well within
    fits = "a dog " + " ".join(["very"] * 72) + " fluffy"

    response = sd15_api.alice.post("/v1/classes", files=pair(), data=class_form(prompts=[fits]))

    assert response.status_code == 202, response.text


def test_an_api_that_cannot_read_the_tokenizer_still_creates_classes(
    make_api: ApiFactory, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # given: a model folder without its tokenizer files (as where only the workers mount it)
    model = tmp_path / "workers-only-model"
    (model / "tokenizer").mkdir(parents=True)
    api = make_api(diffusion_model=str(model))

    response = api.alice.post("/v1/classes", files=pair(), data=class_form())

    # then: the class is created, its prompts left to the workers, and the operator warned
    assert response.status_code == 202, response.text
    assert "prompts' tokens not counted" in caplog.text


def test_a_new_class_keeps_the_current_prompt_style(api: Api) -> None:
    response = api.alice.post("/v1/classes", files=pair(), data=class_form(name="albatross"))

    assert response.status_code == 202, response.text
    with api.session() as session:
        seg_class = session.get(SegClass, uuid.UUID(response.json()["id"]))
        assert seg_class is not None and seg_class.prompt_style == "a-or-an"


def test_an_image_over_the_pixel_cap_is_refused(make_api: ApiFactory) -> None:
    api = make_api(max_image_pixels=24 * 16 - 1)

    response = api.alice.post("/v1/classes", files=pair(), data=class_form())

    assert response.status_code == 422
    assert response.json()["errors"][0]["field"] == "images[0]"
    assert "over the limit" in response.json()["errors"][0]["message"]
    api.assert_nothing_stored()


def test_a_body_that_is_not_multipart_is_refused_with_415(api: Api) -> None:
    response = api.alice.post("/v1/classes", json={"name": "dog", "num_samples": 2})

    assert response.status_code == 415
    api.assert_nothing_stored()


def test_a_body_over_the_cap_is_refused_by_its_declared_length(make_api: ApiFactory) -> None:
    api = make_api(max_upload_bytes=40_000)
    files = shot_files("albatross")  # ~93 kB

    response = api.alice.post("/v1/classes", files=files, data=class_form("albatross"))

    assert response.status_code == 413
    assert response.headers["content-type"] == "application/problem+json"
    api.assert_nothing_stored()


def _chunks(body: bytes, size: int = 8192) -> Iterator[bytes]:
    for start in range(0, len(body), size):
        yield body[start : start + size]


def test_a_chunked_body_is_counted_as_it_is_read(make_api: ApiFactory) -> None:
    # given: a cap between the dog upload (~33 kB) and the albatross upload (~93 kB)
    api = make_api(max_upload_bytes=40_000)

    # when: both are sent chunked, without a Content-Length
    results = {}
    for name in ("dog", "albatross"):
        body, content_type = multipart(shot_files(name), class_form(name))
        results[name] = api.alice.post(
            "/v1/classes", content=_chunks(body), headers={"Content-Type": content_type}
        )

    # then: the small one is accepted, the large one refused
    assert results["dog"].status_code == 202, results["dog"].text
    assert results["albatross"].status_code == 413
    assert results["albatross"].json()["status"] == 413
    with api.session() as session:
        names = session.execute(select(SegClass.name)).scalars().all()
    assert names == ["dog"]


# --- idempotency ---------------------------------------------------------------------------


def test_the_same_idempotency_key_and_body_replays_the_first_answer(api: Api) -> None:
    headers = {"Idempotency-Key": "create-dog-1"}
    first = api.alice.post("/v1/classes", files=pair(), data=class_form(), headers=headers)
    again = api.alice.post("/v1/classes", files=pair(), data=class_form(), headers=headers)

    assert first.status_code == again.status_code == 202
    assert again.json() == first.json()
    assert again.headers["location"] == first.headers["location"]
    assert again.headers["idempotent-replayed"] == "true"
    assert api.work_rows()["classes"] == 1
    assert len(api.queue.sent) == 1


def test_an_idempotency_key_reused_for_another_body_is_refused(api: Api) -> None:
    headers = {"Idempotency-Key": "create-1"}
    first = api.alice.post("/v1/classes", files=pair(), data=class_form("dog"), headers=headers)
    other = api.alice.post("/v1/classes", files=pair(), data=class_form("cat"), headers=headers)

    assert first.status_code == 202
    assert other.status_code == 422
    assert other.json()["errors"][0]["field"] == "Idempotency-Key"
    assert api.work_rows()["classes"] == 1


def test_idempotency_keys_belong_to_their_owner(api: Api) -> None:
    headers = {"Idempotency-Key": "same-key"}
    alices = api.alice.post("/v1/classes", files=pair(), data=class_form(), headers=headers)
    bobs = api.bob.post("/v1/classes", files=pair(), data=class_form(), headers=headers)

    assert alices.status_code == bobs.status_code == 202
    assert alices.json()["id"] != bobs.json()["id"]


# --- reading and listing -------------------------------------------------------------------


def test_a_class_shows_the_state_of_its_job(api: Api) -> None:
    class_id, job_id = add_class(api, owner_id=api.alice_id)
    set_job(api, job_id, status="running", stage="sampling", progress=0.25)

    body = api.alice.get(f"/v1/classes/{class_id}").json()

    assert (body["status"], body["stage"], body["progress"]) == ("running", "sampling", 0.25)
    assert body["job_id"] == str(job_id)


def test_listing_walks_every_class_once_newest_first(api: Api) -> None:
    ids = [
        add_class(api, owner_id=api.alice_id, age=timedelta(minutes=minutes))[0]
        for minutes in range(5)
    ]
    add_class(api, owner_id=api.bob_id)

    seen, cursor = [], None
    while True:
        params: dict[str, Any] = {"limit": 2} | ({"cursor": cursor} if cursor else {})
        page = api.alice.get("/v1/classes", params=params).json()
        assert len(page["items"]) <= 2
        seen += [item["id"] for item in page["items"]]
        cursor = page["next_cursor"]
        if cursor is None:
            break

    assert seen == [str(class_id) for class_id in ids]


def test_classes_created_in_the_same_instant_are_all_listed(api: Api) -> None:
    ids = {add_class(api, owner_id=api.alice_id)[0] for _ in range(3)}
    with api.session() as session:
        moment = session.execute(select(SegClass.created_at).limit(1)).scalar_one()
        for seg_class in session.execute(select(SegClass)).scalars():
            seg_class.created_at = moment
        session.commit()

    first = api.alice.get("/v1/classes", params={"limit": 2}).json()
    rest = api.alice.get("/v1/classes", params={"cursor": first["next_cursor"]}).json()

    assert {item["id"] for item in first["items"] + rest["items"]} == {str(i) for i in ids}
    assert len(first["items"] + rest["items"]) == 3


@pytest.mark.parametrize("limit", [0, 201, "many"])
def test_a_limit_out_of_bounds_is_refused(api: Api, limit: Any) -> None:
    response = api.alice.get("/v1/classes", params={"limit": limit})

    assert response.status_code == 422
    assert response.json()["errors"][0]["field"] == "limit"


@pytest.mark.parametrize(
    "cursor", ["not-a-cursor!", encode_cursor([1]), encode_cursor(["yesterday", "x"])]
)
def test_a_malformed_cursor_is_refused(api: Api, cursor: str) -> None:
    response = api.alice.get("/v1/classes", params={"cursor": cursor})

    assert response.status_code == 400
    assert response.json()["errors"] == [{"field": "cursor", "message": "malformed"}]


def test_the_default_page_holds_fifty(api: Api) -> None:
    for _ in range(51):
        add_class(api, owner_id=api.alice_id)

    page = api.alice.get("/v1/classes").json()

    assert len(page["items"]) == 50 and page["next_cursor"] is not None


# --- deleting ------------------------------------------------------------------------------


def test_deleting_a_class_removes_its_rows_and_blobs_and_cancels_its_job(api: Api) -> None:
    # given: a class created through the API, with a finished sample
    created = api.alice.post("/v1/classes", files=pair(), data=class_form()).json()
    class_id, job_id = uuid.UUID(created["id"]), uuid.UUID(created["job_id"])
    add_sample(api, class_id, 0)

    # when
    response = api.alice.delete(f"/v1/classes/{class_id}")

    # then
    assert response.status_code == 204
    assert api.alice.get(f"/v1/classes/{class_id}").status_code == 404
    assert api.blobs() == []
    rows = api.work_rows()
    assert rows["classes"] == rows["shots"] == rows["samples"] == 0
    assert get_job_row(api, job_id).status == "cancelled"
    assert api.alice.delete(f"/v1/classes/{class_id}").status_code == 404


def test_deleting_a_class_asks_its_running_job_to_stop(api: Api) -> None:
    class_id, job_id = add_class(api, owner_id=api.alice_id, status="running")

    assert api.alice.delete(f"/v1/classes/{class_id}").status_code == 204

    job = get_job_row(api, job_id)
    assert job.status == "running" and job.cancel_requested


def test_deleting_a_finished_class_keeps_its_job_as_it_ended(api: Api) -> None:
    class_id, job_id = add_class(api, owner_id=api.alice_id, status="succeeded")

    assert api.alice.delete(f"/v1/classes/{class_id}").status_code == 204

    assert get_job_row(api, job_id).status == "succeeded"
    with api.session() as session:
        assert session.execute(select(Sample)).first() is None


# --- the embedding -------------------------------------------------------------------------


def test_the_embedding_is_a_conflict_until_learned_then_downloads(api: Api) -> None:
    class_id, _ = add_class(api, owner_id=api.alice_id, name="Samarra mosque")

    early = api.alice.get(f"/v1/classes/{class_id}/embedding")
    add_embedding(api, class_id, b"safetensors bytes")
    ready = api.alice.get(f"/v1/classes/{class_id}/embedding")

    assert early.status_code == 409
    assert early.headers["content-type"] == "application/problem+json"
    assert ready.status_code == 200
    assert ready.content == b"safetensors bytes"
    assert ready.headers["content-disposition"] == (
        'attachment; filename="samarra-mosque.safetensors"'
    )


def test_a_failed_commit_deletes_the_blobs_already_written(
    api: Api, monkeypatch: pytest.MonkeyPatch
) -> None:
    # given: a database that refuses the commit (as when it goes away mid-request)
    def refuse(self: Session) -> None:
        raise OperationalError("COMMIT", {}, Exception("server closed the connection"))

    monkeypatch.setattr(Session, "commit", refuse)

    # when
    response = api.alice.post("/v1/classes", files=pair(), data=class_form())
    monkeypatch.undo()

    # then: 503, and neither rows nor blobs are left
    assert response.status_code == 503
    assert response.headers["retry-after"] == "5"
    api.assert_nothing_stored()


def test_a_concurrent_duplicate_gets_the_winners_answer_and_leaves_no_blobs(
    api: Api, monkeypatch: pytest.MonkeyPatch
) -> None:
    # given: a first request with a key has committed...
    headers = {"Idempotency-Key": "raced"}
    first = api.alice.post("/v1/classes", files=pair(), data=class_form(), headers=headers)
    # ...and a second one with the same key missed it when it looked (the two overlapped)
    monkeypatch.setattr(classes_context, "find_answer", lambda session, claim: None)

    # when
    second = api.alice.post("/v1/classes", files=pair(), data=class_form(), headers=headers)

    # then: the second gets the first's answer; its own rows and blobs are gone
    assert second.status_code == 202
    assert second.json() == first.json()
    assert api.work_rows()["classes"] == 1
    assert {key.split("/")[1] for key in api.blobs()} == {first.json()["id"]}
    assert len(api.queue.sent) == 1
