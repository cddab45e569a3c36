"""Reviewing samples with the SDK (`review_sample`, `replace_mask`) and its command line
(`review`, `replace-mask`), against the real service in process: each request the SDK sends is
handed to the app, and its answer back."""

from __future__ import annotations

import json
import uuid
from io import BytesIO
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from PIL import Image

from aligndiff.masks import binarize_mask
from aligndiff_client import Client, NotFound, ValidationFailed
from aligndiff_client.cli import main
from tests.api_support import Api, box_mask, encode, sqlite_database
from tests.client_support import BASE_URL
from tests.review_support import SIZE, finished_class, sample_ids, two_squares

pytest_plugins = ["tests.api_support"]


def to_the_app(api: Api) -> httpx.MockTransport:
    """A transport that sends each request to the app, in process, and returns its answer."""

    def send(request: httpx.Request) -> httpx.Response:
        answer = api.anonymous.request(
            request.method,
            request.url.path,
            params=request.url.params,
            content=request.read(),
            headers=request.headers,
        )
        return httpx.Response(answer.status_code, headers=answer.headers, content=answer.content)

    return httpx.MockTransport(send)


@pytest.fixture
def database_url(tmp_path: Path, sqlite_template: Path) -> str:
    """SQLite only: the API tests review on both databases; here the SDK is what is tested."""
    return sqlite_database(tmp_path, sqlite_template)


def sdk(api: Api, who: str = "alice") -> Client:
    return Client(BASE_URL, api.keys[who], transport=to_the_app(api))


def mask_of(png: bytes) -> np.ndarray:
    return binarize_mask(Image.open(BytesIO(png)))


def test_the_sdk_rejects_accepts_and_replaces_a_mask(api: Api, tmp_path: Path) -> None:
    # given: alice's finished class (samples 0, 2 and 4 accepted by the filters)
    class_id = finished_class(api)
    ids = sample_ids(api, class_id)

    with sdk(api) as client:
        # when: she rejects sample 0 and accepts the sample the OOD filter rejected
        ood = next(s for s in client.samples(class_id) if s.rejected_by == "ood")
        rejected = client.review_sample(ids[0], accepted=False)
        accepted = client.review_sample(ood, accepted=True)

        # then: each says who decided, and the class counts them
        assert (rejected.accepted, rejected.accepted_by, rejected.rejected_by) == (
            False, "user", "user",
        )  # fmt: skip
        assert (accepted.index, accepted.accepted, accepted.rejected_by) == (1, True, None)
        assert accepted.reviewed_at is not None
        assert client.get_class(class_id).num_accepted == 3

        # when: she replaces masks with a PIL image, a file and PNG bytes
        from_image = client.replace_mask(ids[2], two_squares())
        path = tmp_path / "drawn.png"
        box_mask(SIZE).save(path)
        from_file = client.replace_mask(ids[3], path)
        from_bytes = client.replace_mask(ids[4], encode(two_squares()))

        # then: each sample's mask is hers, its objects counted, and served
        assert [s.mask_source for s in (from_image, from_file, from_bytes)] == ["human"] * 3
        assert [s.instances for s in (from_image, from_file, from_bytes)] == [2, 1, 2]
        served = client.download_sample_mask(ids[2])
        assert np.array_equal(mask_of(served), binarize_mask(two_squares()))
        assert np.array_equal(
            mask_of(client.download_sample_mask(ids[3])), mask_of(encode(box_mask(SIZE)))
        )


def test_the_sdk_raises_what_the_service_refused(api: Api) -> None:
    class_id = finished_class(api)
    ids = sample_ids(api, class_id)

    with sdk(api) as client:
        with pytest.raises(ValidationFailed) as invalid:
            client.replace_mask(ids[0], box_mask((10, 6)))
        with pytest.raises(NotFound):
            client.review_sample(uuid.uuid4(), accepted=True)
    with sdk(api, "bob") as client, pytest.raises(NotFound):
        client.review_sample(ids[0], accepted=False)

    assert [error["field"] for error in invalid.value.errors] == ["mask"]
    assert "10x6" in str(invalid.value) and "16x16" in str(invalid.value)
    with sdk(api) as client:
        assert client.get_class(class_id).num_accepted == 3


def test_the_command_line_reviews_and_replaces_a_mask(
    api: Api, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    class_id = finished_class(api)
    ids = sample_ids(api, class_id)
    options = ["--url", BASE_URL, "--api-key", api.keys["alice"]]
    drawn = tmp_path / "drawn.png"
    two_squares().save(drawn)

    # when: a sample is rejected, another accepted, and a mask replaced, from the shell
    codes = [
        main(["review", str(ids[0]), "--reject", *options], transport=to_the_app(api)),
        main(["review", str(ids[1]), "--accept", *options], transport=to_the_app(api)),
        main(["replace-mask", str(ids[2]), str(drawn), *options], transport=to_the_app(api)),
    ]

    # then: each prints the sample as JSON
    assert codes == [0, 0, 0]
    printed = _json_objects(capsys.readouterr().out)
    assert [(s["index"], s["accepted"], s["accepted_by"]) for s in printed[:2]] == [
        (0, False, "user"), (1, True, "user"),
    ]  # fmt: skip
    assert (printed[2]["mask_source"], printed[2]["instances"]) == ("human", 2)
    with sdk(api) as client:
        assert client.get_class(class_id).num_accepted == 3


def test_a_refused_mask_is_one_error_line(
    api: Api, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    class_id = finished_class(api)
    ids = sample_ids(api, class_id)
    empty = tmp_path / "empty.png"
    box_mask(SIZE, fill=0).save(empty)

    code = main(
        [
            "replace-mask",
            str(ids[0]),
            str(empty),
            "--url",
            BASE_URL,
            "--api-key",
            api.keys["alice"],
        ],
        transport=to_the_app(api),
    )

    assert code == 1
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and "mask is empty" in error


def test_review_needs_a_verdict(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        main(["review", str(uuid.uuid4()), "--api-key", "adk_x"])

    assert exited.value.code == 2
    assert "--accept" in capsys.readouterr().err


@pytest.mark.parametrize("command", ["review", "replace-mask"])
def test_the_review_commands_answer_help_that_reads_at_80_columns(
    command: str, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("COLUMNS", "80")

    with pytest.raises(SystemExit) as exited:
        main([command, "--help"])

    help_text = capsys.readouterr().out
    assert exited.value.code == 0 and help_text.startswith(f"usage: aligndiff-client {command}")
    assert all(len(line) <= 80 for line in help_text.splitlines())


def _json_objects(text: str) -> list[dict[str, Any]]:
    """The JSON objects printed one after another."""
    decoder, found, at = json.JSONDecoder(), [], 0
    while text[at:].strip():
        at += len(text[at:]) - len(text[at:].lstrip())
        value, at = decoder.raw_decode(text, at)
        found.append(value)
    return found
