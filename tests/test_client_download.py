"""The SDK's dataset download against a mock service that honours Range and If-Range:
streamed to `.incomplete`, resumed after a cut, restarted when the archive changed; one class's
or several classes' as one archive, from the SDK and the command line."""

from __future__ import annotations

import os
import re
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from aligndiff_client import NotFound
from aligndiff_client.cli import main
from tests.client_support import Handler, mock_client, problem

ETAG = '"dataset-v1"'


class Body(httpx.SyncByteStream):
    """A body sent in 16 KiB chunks, whose connection drops after `cut` bytes if given."""

    def __init__(self, body: bytes, cut: int | None = None) -> None:
        self.body, self.cut = body, cut

    def __iter__(self) -> Iterator[bytes]:
        end = len(self.body) if self.cut is None else self.cut
        for start in range(0, end, 16384):
            yield self.body[start : min(start + 16384, end)]
        if self.cut is not None:
            raise httpx.ReadError("connection reset by peer")


def archive_server(
    body: bytes,
    *,
    etag: str | None = ETAG,
    cut_first_at: int | None = None,
    whole_length: bool = True,
) -> Handler:
    """A dataset route serving `body`, resuming ranges under `etag`; the first answer's
    connection drops after `cut_first_at` bytes. Without `whole_length`, a whole answer has
    no Content-Length (as the service's first download of an archive)."""
    served = 0

    def handle(request: httpx.Request) -> httpx.Response:
        nonlocal served
        served += 1
        headers = {"ETag": etag} if etag else {}
        wanted = re.fullmatch(r"bytes=(\d+)-", request.headers.get("Range", ""))
        if wanted and etag and request.headers.get("If-Range") == etag:
            start = int(wanted[1])
            headers["Content-Range"] = f"bytes {start}-{len(body) - 1}/{len(body)}"
            headers["Content-Length"] = str(len(body) - start)
            return httpx.Response(206, headers=headers, stream=Body(body[start:]))
        if whole_length:
            headers["Content-Length"] = str(len(body))
        cut = cut_first_at if served == 1 else None
        return httpx.Response(200, headers=headers, stream=Body(body, cut))

    return handle


@pytest.fixture
def body() -> bytes:
    return os.urandom(200_000)


def leftovers(dest: Path) -> list[str]:
    return sorted(p.name for p in dest.parent.iterdir() if p.name != dest.name)


def test_a_download_cut_off_midway_resumes_from_where_it_stopped(
    body: bytes, tmp_path: Path
) -> None:
    # given: the connection drops after 70 000 bytes
    dest = tmp_path / "dog-voc.zip"
    with mock_client(archive_server(body, cut_first_at=70_000)) as (client, recorder):
        # when
        path = client.download_dataset(uuid.uuid4(), "voc", dest, progress=False)

    # then: the rest was asked for, under the first answer's ETag, and the file is whole
    assert path == dest and dest.read_bytes() == body
    assert leftovers(dest) == []
    first, second = recorder.requests
    assert "Range" not in first.headers
    assert first.url.params["format"] == "voc" and first.url.params["accepted_only"] == "true"
    assert second.headers["Range"] == "bytes=70000-"
    assert second.headers["If-Range"] == ETAG
    assert recorder.sleeps == [0.5]


def test_a_download_stopped_by_the_caller_resumes_on_the_next_call(
    body: bytes, tmp_path: Path
) -> None:
    # given: a first download the caller stops after 50 000 bytes
    dest = tmp_path / "dog.tar"

    def stop(done: int, total: int | None) -> None:
        assert total == len(body)
        if done >= 50_000:
            raise KeyboardInterrupt

    handler = archive_server(body)
    with mock_client(handler) as (client, _), pytest.raises(KeyboardInterrupt):
        client.download_dataset("c1", "webdataset", dest, progress=False, on_progress=stop)
    saved = (tmp_path / "dog.tar.incomplete").stat().st_size
    assert 50_000 <= saved < len(body) and not dest.exists()

    # when: the same download is asked for again
    with mock_client(handler) as (client, recorder):
        client.download_dataset("c1", "webdataset", dest, accepted_only=False, progress=False)

    # then
    assert recorder.requests[0].headers["Range"] == f"bytes={saved}-"
    assert recorder.requests[0].url.params["accepted_only"] == "false"
    assert dest.read_bytes() == body and leftovers(dest) == []


def test_a_200_to_a_range_request_starts_the_file_over(body: bytes, tmp_path: Path) -> None:
    # given: bytes saved from an archive that has changed since (another ETag)
    dest = tmp_path / "dog-coco.zip"
    (tmp_path / "dog-coco.zip.incomplete").write_bytes(b"stale bytes of the old archive")
    (tmp_path / "dog-coco.zip.incomplete.etag").write_text('"dataset-v0"')

    with mock_client(archive_server(body)) as (client, recorder):
        client.download_dataset("c1", "coco", dest, progress=False)

    # then: resuming was tried, the server sent the new archive whole, and nothing stale is left
    assert recorder.requests[0].headers["If-Range"] == '"dataset-v0"'
    assert dest.read_bytes() == body and leftovers(dest) == []


def test_without_an_etag_a_cut_download_starts_over(body: bytes, tmp_path: Path) -> None:
    dest = tmp_path / "dog.zip"
    with mock_client(archive_server(body, etag=None, cut_first_at=1000)) as (client, recorder):
        client.download_dataset("c1", "voc", dest, progress=False)

    assert [r.headers.get("Range") for r in recorder.requests] == [None, None]
    assert dest.read_bytes() == body


def test_a_429_during_a_download_is_retried_after_retry_after(body: bytes, tmp_path: Path) -> None:
    serve = archive_server(body)
    answers = iter([httpx.Response(429, headers={"Retry-After": "7"})])

    def handler(request: httpx.Request) -> httpx.Response:
        return next(answers, None) or serve(request)

    dest = tmp_path / "dog.zip"
    with mock_client(handler) as (client, recorder):
        client.download_dataset("c1", "voc", dest, progress=False)

    assert recorder.sleeps == [7.0] and dest.read_bytes() == body


def final_bar(stderr: str) -> str:
    """The progress bar as it was last drawn."""
    return stderr.replace("\r", "\n").strip().splitlines()[-1]


def test_the_progress_bar_shows_the_total_that_content_length_gives(
    body: bytes, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with mock_client(archive_server(body)) as (client, _):
        client.download_dataset("c1", "voc", tmp_path / "dog.zip")

    bar = final_bar(capsys.readouterr().err)
    assert "100%" in bar and "195k/195k" in bar, bar


def test_a_resumed_download_s_bar_shows_the_total_that_content_range_gives(
    body: bytes, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # given: a first answer without a length, cut off midway
    handler = archive_server(body, cut_first_at=70_000, whole_length=False)
    with mock_client(handler) as (client, recorder):
        # when
        client.download_dataset("c1", "voc", tmp_path / "dog.zip")

    # then: the resumed answer's Content-Range gave the bar its total
    assert recorder.requests[1].headers["Range"] == "bytes=70000-"
    bar = final_bar(capsys.readouterr().err)
    assert "100%" in bar and "195k/195k" in bar, bar


def test_without_a_known_size_the_bar_counts_bytes(
    body: bytes, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with mock_client(archive_server(body, whole_length=False)) as (client, _):
        client.download_dataset("c1", "voc", tmp_path / "dog.zip")

    bar = final_bar(capsys.readouterr().err)
    assert "195kB" in bar and "/195k" not in bar and "%" not in bar, bar


def test_an_error_answer_raises_and_leaves_no_file(tmp_path: Path) -> None:
    dest = tmp_path / "dog.zip"
    with (
        mock_client(lambda _: problem(404, "class not found")) as (client, recorder),
        pytest.raises(NotFound, match="class not found"),
    ):
        client.download_dataset("c1", "voc", dest, progress=False)

    assert list(tmp_path.iterdir()) == [] and recorder.sleeps == []


def test_several_classes_download_as_one_archive_resumed_like_one(
    body: bytes, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # given: two classes, and a connection that drops after 70 000 bytes
    monkeypatch.chdir(tmp_path)
    ids = [uuid.uuid4(), uuid.uuid4()]
    with mock_client(archive_server(body, cut_first_at=70_000)) as (client, recorder):
        # when
        path = client.download_dataset(ids, "yolo", progress=False, val="shots")

    # then: both requests ask /v1/datasets for the classes in order, the second for the rest
    assert path.read_bytes() == body
    assert path.name == f"{ids[0]}-and-1-more-yolo.zip"
    first, second = recorder.requests
    for request in (first, second):
        assert request.url.path == "/v1/datasets"
        assert request.url.params["class_ids"] == f"{ids[0]},{ids[1]}"
        assert request.url.params["format"] == "yolo" and request.url.params["val"] == "shots"
    assert second.headers["Range"] == "bytes=70000-" and second.headers["If-Range"] == ETAG


@pytest.mark.parametrize(
    ("ids", "path"),
    [(["c1"], "/v1/classes/c1/dataset"), (["c1", "c2"], "/v1/datasets")],
    ids=["one class", "several classes"],
)
def test_the_cli_downloads_one_class_or_several_with_a_split(
    ids: list[str], path: str, body: bytes, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    recorder: list[httpx.Request] = []
    handler = archive_server(body)

    def record(request: httpx.Request) -> httpx.Response:
        recorder.append(request)
        return handler(request)

    dest = tmp_path / "both.zip"
    options = ["--format", "yolo", "--val", "fraction:0.2", "--out", str(dest)]
    status = main(
        ["download", *ids, *options, "--api-key", "k", "-q"], transport=httpx.MockTransport(record)
    )

    assert status == 0 and capsys.readouterr().out == f"{dest}\n"
    assert dest.read_bytes() == body
    (request,) = recorder
    assert request.url.path == path and request.url.params["val"] == "fraction:0.2"
    assert request.url.params.get("class_ids") == (",".join(ids) if len(ids) > 1 else None)
