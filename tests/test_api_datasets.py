"""`GET /v1/classes/{id}/dataset`: who may download, when, the answer's headers, and resuming
a broken download with Range and If-Range (also over a real HTTP connection, with curl and with
the SDK)."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from sqlalchemy import select

from aligndiff_client import Client
from service.export import FORMATS
from service.models import Sample, utcnow
from tests.api_support import Api, add_class, set_job
from tests.dataset_support import DatasetClass, create_finished_class, download, serving

pytest_plugins = ["tests.api_support", "tests.dataset_support"]


# --- who and when -------------------------------------------------------------------------


def test_another_owners_class_is_not_found(api: Api, dataset_class: DatasetClass) -> None:
    response = api.bob.get(dataset_class.url, params={"format": "voc"})

    assert response.status_code == 404
    assert response.headers["content-type"] == "application/problem+json"


def test_an_admin_may_download_any_class(api: Api, dataset_class: DatasetClass) -> None:
    response = api.admin.get(dataset_class.url, params={"format": "coco"})

    assert response.status_code == 200
    assert response.content == download(api, dataset_class, "coco")


@pytest.mark.parametrize("status", ["queued", "running", "failed", "cancelled"])
def test_a_class_whose_job_has_not_succeeded_answers_409(api: Api, status: str) -> None:
    class_id, _ = add_class(api, owner_id=api.alice_id, status=status)

    response = api.alice.get(f"/v1/classes/{class_id}/dataset", params={"format": "voc"})

    assert response.status_code == 409
    assert status in response.json()["detail"]


def test_the_dataset_is_available_once_the_job_has_succeeded(api: Api) -> None:
    class_id, job_id = add_class(api, owner_id=api.alice_id, status="running")
    url = f"/v1/classes/{class_id}/dataset"
    assert api.alice.get(url, params={"format": "voc"}).status_code == 409

    set_job(api, job_id, status="succeeded")

    assert api.alice.get(url, params={"format": "voc"}).status_code == 200


def test_val_shots_with_nothing_left_to_train_on_answers_409_saying_what_would(api: Api) -> None:
    # given: a class whose one finished sample the filters rejected
    dog = create_finished_class(api, num_samples=1, rejected_every=1)
    params = {"format": "yolo", "val": "shots"}

    # when: its accepted samples are asked for as train, its shots as validation
    refused = api.alice.get(dog.url, params=params)
    several = api.alice.get("/v1/datasets", params={**params, "class_ids": str(dog.id)})

    # then: 409 saying why and what to ask for; the rejected sample can still make the train
    assert refused.status_code == several.status_code == 409, refused.text
    detail = refused.json()["detail"]
    assert "no accepted samples" in detail and "accepted_only=false" in detail
    assert several.json()["detail"] == detail
    assert api.alice.get(dog.url, params={**params, "accepted_only": "false"}).status_code == 200


@pytest.mark.parametrize(
    ("params", "field"),
    [
        ({"format": "pascal"}, "format"),
        ({}, "format"),
        ({"format": "voc", "accepted_only": "maybe"}, "accepted_only"),
        ({"format": "voc", "val": "test"}, "val"),
        ({"format": "voc", "val": "fraction:0"}, "val"),
        ({"format": "voc", "val": "fraction:1"}, "val"),
        ({"format": "voc", "val": "fraction:1.5"}, "val"),
        ({"format": "voc", "val": "fraction:-0.2"}, "val"),
        ({"format": "voc", "val": "fraction:"}, "val"),
    ],
)
def test_a_bad_format_or_flag_is_refused(
    api: Api, dataset_class: DatasetClass, params: dict[str, str], field: str
) -> None:
    response = api.alice.get(dataset_class.url, params=params)

    assert response.status_code == 422
    assert response.headers["content-type"] == "application/problem+json"
    assert [error["field"] for error in response.json()["errors"]] == [field]
    if field == "val":
        assert "none, shots or fraction:<f>" in response.json()["detail"]


def test_anonymous_callers_are_refused(api: Api, dataset_class: DatasetClass) -> None:
    assert api.anonymous.get(dataset_class.url, params={"format": "voc"}).status_code == 401


# --- the answer ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("export_format", "media_type", "filename"),
    [
        ("voc", "application/zip", "dog-voc.zip"),
        ("coco", "application/zip", "dog-coco.zip"),
        ("hf", "application/zip", "dog-hf.zip"),
        ("webdataset", "application/x-tar", "dog-webdataset.tar"),
        ("yolo", "application/zip", "dog-yolo.zip"),
    ],
)
def test_the_archive_is_an_attachment_with_a_strong_etag(
    api: Api, dataset_class: DatasetClass, export_format: str, media_type: str, filename: str
) -> None:
    response = api.alice.get(dataset_class.url, params={"format": export_format})

    assert response.status_code == 200
    assert response.headers["content-type"] == media_type
    assert response.headers["content-disposition"] == f'attachment; filename="{filename}"'
    assert response.headers["accept-ranges"] == "bytes"
    etag = response.headers["etag"]
    assert etag.startswith('"') and etag.endswith('"') and not etag.startswith("W/")


def test_the_etag_names_one_archive(api: Api, dataset_class: DatasetClass) -> None:
    def etag(**params: str) -> str:
        return api.alice.get(dataset_class.url, params=params).headers["etag"]

    assert etag(format="voc") == etag(format="voc")
    assert len({etag(format=f) for f in FORMATS}) == len(FORMATS)
    assert etag(format="voc") != etag(format="voc", accepted_only="false")
    splits = {etag(format="voc", val=v) for v in ("none", "shots", "fraction:0.2", "fraction:.3")}
    assert len(splits) == 4
    assert etag(format="voc") == etag(format="voc", val="none")


@pytest.mark.parametrize(
    ("change", "accepted_only"),
    [
        ({"accepted": False, "accepted_by": "user", "rejected_by": "user"}, "true"),
        ({"accepted": True, "accepted_by": "user", "rejected_by": None}, "false"),
        ({"mask_source": "human"}, "true"),
    ],
)
def test_a_reviewer_s_change_gives_a_new_archive_and_etag(
    api: Api, dataset_class: DatasetClass, change: dict[str, object], accepted_only: str
) -> None:
    # given: a downloaded archive
    params = {"format": "coco", "accepted_only": accepted_only}
    before = api.alice.get(dataset_class.url, params=params)

    # when: a reviewer changes a sample's verdict, or its mask, as review does (the sample's
    # `reviewed_at` stamped)
    with api.session() as session:
        sample = session.execute(
            select(Sample).where(Sample.class_id == dataset_class.id, Sample.index == 0)
        ).scalar_one()
        for name, value in {**change, "reviewed_at": utcnow()}.items():
            setattr(sample, name, value)
        session.commit()

    # then: a new ETag, and resuming the old download gets the whole new archive
    response = api.alice.get(
        dataset_class.url,
        params=params,
        headers={"Range": "bytes=100-", "If-Range": before.headers["etag"]},
    )
    assert response.status_code == 200
    assert response.headers["etag"] != before.headers["etag"]
    assert response.content != before.content


def test_the_length_is_sent_once_the_archive_has_been_generated(
    api: Api, dataset_class: DatasetClass
) -> None:
    first = api.alice.get(dataset_class.url, params={"format": "hf"})
    second = api.alice.get(dataset_class.url, params={"format": "hf"})

    assert "content-length" not in first.headers  # streamed before its size was known
    assert second.headers["content-length"] == str(len(first.content))
    assert second.content == first.content


def test_the_openapi_schema_documents_the_route(api: Api) -> None:
    schema = api.anonymous.get("/openapi.json").json()
    operation = schema["paths"]["/v1/classes/{class_id}/dataset"]["get"]

    assert operation["operationId"] == "download_dataset"
    (format_param,) = (p for p in operation["parameters"] if p["name"] == "format")
    assert format_param["required"] is True
    assert format_param["schema"]["enum"] == list(FORMATS)
    assert "yolo" in format_param["schema"]["enum"]
    (val_param,) = (p for p in operation["parameters"] if p["name"] == "val")
    assert val_param["schema"]["default"] == "none"
    assert re.fullmatch(val_param["schema"]["pattern"], "fraction:0.25")
    assert not re.fullmatch(val_param["schema"]["pattern"], "fraction:1")
    assert {"200", "206", "404", "409", "416", "422"} <= set(operation["responses"])
    assert "succeeded" in operation["description"]


# --- resuming: Range and If-Range ---------------------------------------------------------


@dataclass(frozen=True)
class Whole:
    content: bytes
    etag: str


@pytest.fixture
def whole(api: Api, dataset_class: DatasetClass) -> Whole:
    """A complete VOC download: its bytes and ETag."""
    response = api.alice.get(dataset_class.url, params={"format": "voc"})
    assert response.status_code == 200
    return Whole(response.content, response.headers["etag"])


@pytest.mark.parametrize("download_first", [True, False])
def test_a_range_resumes_the_archive_where_it_broke_off(
    api: Api, dataset_class: DatasetClass, download_first: bool
) -> None:
    # given: the archive's bytes and ETag, and (or not) its length remembered by the server
    response = api.alice.get(dataset_class.url, params={"format": "voc"})
    body, etag = response.content, response.headers["etag"]
    if not download_first:
        # as if the first download had broken off: the server has to measure the archive
        for key in api.blobs(f"classes/{dataset_class.id}/exports/"):
            api.storage.put(key, b"", content_type="text/plain")
    offset = len(body) // 3

    # when
    response = api.alice.get(
        dataset_class.url,
        params={"format": "voc"},
        headers={"Range": f"bytes={offset}-", "If-Range": etag},
    )

    # then: the rest, and where it lies in the whole
    assert response.status_code == 206
    assert response.headers["content-range"] == f"bytes {offset}-{len(body) - 1}/{len(body)}"
    assert response.headers["content-length"] == str(len(body) - offset)
    assert response.headers["etag"] == etag
    assert body[:offset] + response.content == body


def test_a_range_without_if_range_is_honoured(
    api: Api, dataset_class: DatasetClass, whole: Whole
) -> None:
    # as `curl -C -` asks
    response = api.alice.get(
        dataset_class.url, params={"format": "voc"}, headers={"Range": "bytes=100-"}
    )

    assert response.status_code == 206
    assert response.content == whole.content[100:]


@pytest.mark.parametrize(
    ("header", "span"),
    [("bytes=10-19", (10, 19)), ("bytes=-16", (-16, -1)), ("bytes=0-", (0, -1))],
)
def test_closed_and_suffix_ranges_are_sent_as_asked(
    api: Api,
    dataset_class: DatasetClass,
    whole: Whole,
    header: str,
    span: tuple[int, int],
) -> None:
    size = len(whole.content)
    first, last = (n % size for n in span)

    response = api.alice.get(dataset_class.url, params={"format": "voc"}, headers={"Range": header})

    assert response.status_code == 206
    assert response.headers["content-range"] == f"bytes {first}-{last}/{size}"
    assert response.content == whole.content[first : last + 1]


def test_a_stale_if_range_gets_the_whole_new_archive(
    api: Api, dataset_class: DatasetClass, whole: Whole
) -> None:
    response = api.alice.get(
        dataset_class.url,
        params={"format": "voc"},
        headers={"Range": "bytes=100-", "If-Range": '"an-older-archive"'},
    )

    assert response.status_code == 200
    assert response.content == whole.content


@pytest.mark.parametrize("header", ["bytes=0-1,5-9", "items=0-5", "bytes=9-3", "bytes=x-"])
def test_ranges_it_does_not_serve_get_the_whole_archive(
    api: Api, dataset_class: DatasetClass, whole: Whole, header: str
) -> None:
    response = api.alice.get(dataset_class.url, params={"format": "voc"}, headers={"Range": header})

    assert response.status_code == 200
    assert response.content == whole.content


def test_a_range_past_the_end_answers_416_with_the_length(
    api: Api, dataset_class: DatasetClass, whole: Whole
) -> None:
    size = len(whole.content)

    response = api.alice.get(
        dataset_class.url,
        params={"format": "voc"},
        headers={"Range": f"bytes={size}-", "If-Range": whole.etag},
    )

    assert response.status_code == 416
    assert response.headers["content-range"] == f"bytes */{size}"
    assert response.headers["content-type"] == "application/problem+json"


# --- over a real connection ---------------------------------------------------------------


def test_a_download_cut_off_mid_stream_resumes_to_the_same_bytes(
    api: Api, dataset_class: DatasetClass
) -> None:
    headers = {"Authorization": f"Bearer {api.keys['alice']}"}
    params = {"format": "webdataset"}
    with serving(api) as base, httpx.Client(base_url=base, headers=headers) as http:
        whole = http.get(dataset_class.url, params=params).content

        # given: a download that broke off after its first chunk (the connection closed)
        with http.stream("GET", dataset_class.url, params=params) as response:
            assert response.status_code == 200
            etag = response.headers["etag"]
            saved = next(response.iter_raw(4096))

        # when: the rest is asked for, as the SDK asks
        rest = http.get(
            dataset_class.url,
            params=params,
            headers={"Range": f"bytes={len(saved)}-", "If-Range": etag},
        )

    # then
    assert 0 < len(saved) < len(whole)
    assert rest.status_code == 206
    assert saved + rest.content == whole


def test_curl_resumes_a_partial_file(api: Api, dataset_class: DatasetClass, tmp_path: Path) -> None:
    if shutil.which("curl") is None:
        pytest.skip("no curl here")
    body = download(api, dataset_class, "coco")
    partial = tmp_path / "dog-coco.zip"
    partial.write_bytes(body[: len(body) // 2])

    with serving(api) as base:
        result = subprocess.run(
            [
                "curl", "--silent", "--show-error", "--fail", "--continue-at", "-",
                "--header", f"Authorization: Bearer {api.keys['alice']}",
                "--output", str(partial), f"{base}{dataset_class.url}?format=coco",
            ],
            capture_output=True, text=True, timeout=60,
        )  # fmt: skip

    assert result.returncode == 0, result.stderr
    assert partial.read_bytes() == body


class RecordingTransport(httpx.HTTPTransport):
    """A real HTTP transport that notes the status of every answer."""

    def __init__(self) -> None:
        super().__init__()
        self.statuses: list[int] = []

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        response = super().handle_request(request)
        self.statuses.append(response.status_code)
        return response


class Interrupted(Exception):
    """Raised from a progress callback to break a download off, as Ctrl-C would."""


# NOTE: the contract's call, `WebDataset(path)`, on purpose: webdataset warns that it was not told
# whether to shuffle shards (one file: nothing to shuffle).
@pytest.mark.filterwarnings("ignore:WebDataset\\(shardshuffle")
def test_the_sdk_resumes_a_webdataset_tar_that_webdataset_reads_record_by_record(
    api: Api, dataset_class: DatasetClass, tmp_path: Path
) -> None:
    import webdataset as wds

    whole = download(api, dataset_class, "webdataset")
    dest, folder = tmp_path / "dog.tar", tmp_path / "dog"
    transport = RecordingTransport()
    with (
        serving(api) as base,
        Client(base, api.keys["alice"], transport=transport) as client,
    ):
        # given: an SDK download broken off, half of what it saved left (as after a crash)
        def interrupt(done: int, total: int | None) -> None:
            raise Interrupted

        with pytest.raises(Interrupted):
            client.download_dataset(
                dataset_class.id, "webdataset", dest, progress=False, on_progress=interrupt
            )
        partial = dest.with_name(dest.name + ".incomplete")
        with partial.open("r+b") as file:
            file.truncate(partial.stat().st_size // 2)

        # when: the same download is asked for again, and unpacked
        client.download_dataset(
            dataset_class.id, "webdataset", dest, progress=False, extract=folder
        )

    # then: the rest came as a range, and the file is the archive
    assert transport.statuses == [200, 206]
    assert dest.read_bytes() == whole and not partial.exists()
    # and: WebDataset reads the file as it is, one record per shot and accepted sample
    records = list(wds.WebDataset(str(dest)))
    expected = [item.name for item in dataset_class.exported()]
    assert [r["__key__"] for r in records] == expected
    for record in records:
        assert {"jpg", "mask.png", "json"} <= set(record)
        assert json.loads(record["json"])["name"] == record["__key__"]
    # and: the SDK unpacks it: the records' files, and the metadata WebDataset skipped
    assert (folder / "__meta__" / "metadata.json").is_file()
    assert sorted(p.name for p in folder.glob("shot_*")) == [
        f"shot_0{n}.{ext}" for n in (0, 1) for ext in ("jpg", "json", "mask.png")
    ]
