"""Hostile and awkward uploads: decompression bombs, polyglot files, wrong Content-Types, a
multipart body of thousands of parts, a chunked body over the cap (with the disk it may use
measured) and phone photos rotated by EXIF. Each ends in the documented 4xx or, for a file that
is a good image whatever else it carries, in a re-encoded picture: never a 500, never a long
hang, never the uploaded bytes served back.
"""

from __future__ import annotations

import io
import os
import struct
import tempfile
import time
import uuid
import zipfile
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from tests.api_support import (
    Api,
    ApiFactory,
    box_mask,
    class_form,
    encode,
    multipart,
    pair,
    photo,
    set_job,
)
from tests.conftest import SHOTS_DIR
from tests.fault_support import ServedApi

pytest_plugins = ["tests.api_support"]

DOG = SHOTS_DIR / "dog"


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png_declaring(width: int, height: int) -> bytes:
    """A PNG of a few hundred bytes whose header declares `width` x `height` gray pixels."""
    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + png_chunk(b"IHDR", header)
        + png_chunk(b"IDAT", zlib.compress(b"\0" * 4096))
        + png_chunk(b"IEND", b"")
    )


def assert_refused(api: Api, response: Any, status: int, field: str | None = None) -> None:
    """`response` is the refusal documented for it, and the upload left nothing behind."""
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/problem+json"
    if field is not None:
        assert field in [error["field"] for error in response.json()["errors"]]
    api.assert_nothing_stored()


# --- decompression bombs -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("side", "which"),
    [(60_000, "images"), (60_000, "masks"), (7_000, "images")],
    ids=["over-pillow-limit-image", "over-pillow-limit-mask", "over-service-limit"],
)
def test_a_small_file_declaring_a_huge_picture_is_refused_at_once(
    api: Api, side: int, which: str
) -> None:
    # given: a few hundred bytes that claim 3.6 G (or 49 M) pixels
    bomb = png_declaring(side, side)
    files = pair(image=bomb) if which == "images" else pair(mask=bomb)

    # when
    started = time.monotonic()
    response = api.alice.post("/v1/classes", data=class_form(), files=files)

    # then: refused, naming the file, before any pixel is decoded
    assert time.monotonic() - started < 2
    assert_refused(api, response, 422, f"{which}[0]")


def test_a_real_highly_compressed_picture_over_the_pixel_cap_is_refused(
    make_api: ApiFactory,
) -> None:
    # given: a genuine PNG of 2000 x 2000 black pixels (a few kB), over a 1 Mpx cap
    api = make_api(max_image_pixels=1_000_000)
    bomb = encode(Image.new("L", (2000, 2000)))
    assert len(bomb) < 20_000

    response = api.alice.post("/v1/classes", data=class_form(), files=pair(image=bomb))

    assert_refused(api, response, 422, "images[0]")
    assert "over the limit of 1,000,000" in response.json()["errors"][0]["message"]


# --- polyglots -----------------------------------------------------------------------------

HTML = b"<html><script>alert('polyglot')</script></html>"


def zip_bytes() -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr("evil.html", HTML)
    return buffer.getvalue()


def jpeg_with_comment(comment: bytes) -> bytes:
    """The dog photo with `comment` in a JPEG COM segment, where browsers sniffing for HTML
    would find it."""
    data = (DOG / "1.jpg").read_bytes()
    segment = b"\xff\xfe" + struct.pack(">H", len(comment) + 2) + comment
    return data[:2] + segment + data[2:]


POLYGLOTS = {
    "png+zip": (encode(photo((489, 366))) + zip_bytes(), "PK\x03\x04"),
    "png+html": (encode(photo((489, 366))) + HTML, "<script"),
    "jpeg-com-html+html": (jpeg_with_comment(HTML) + HTML, "<script"),
}


@pytest.mark.parametrize("name", list(POLYGLOTS))
def test_a_polyglot_image_is_used_as_a_picture_and_never_served_as_uploaded(
    api: Api, name: str
) -> None:
    # given: a picture that is also a zip or an HTML page
    data, marker = POLYGLOTS[name]
    mask = (DOG / "1.png").read_bytes()

    # when: uploaded as a shot, and the class's dataset is downloaded
    created = api.alice.post(
        "/v1/classes",
        data=class_form(),
        files=[("images", ("x.html", data, "text/html")), ("masks", ("m.png", mask, ""))],
    )
    assert created.status_code == 202, created.text
    set_job(api, uuid.UUID(created.json()["job_id"]), status="succeeded")
    archive = api.alice.get(f"/v1/classes/{created.json()['id']}/dataset", params={"format": "voc"})
    assert archive.status_code == 200

    # then: what the service keeps to use and to serve is a re-encoded picture, without the
    # payload; only the untouched original keeps it, and it is never served
    served = []
    with zipfile.ZipFile(io.BytesIO(archive.content)) as opened:
        served = [opened.read(entry) for entry in opened.namelist()]
    assert served and all(marker.encode() not in blob for blob in served)
    stored = {key: api.storage.get(key) for key in api.blobs()}
    with_payload = [key for key, blob in stored.items() if marker.encode() in blob]
    assert [key.rsplit("/", 1)[-1] for key in with_payload] == ["original-image"]
    (image_key,) = [key for key in stored if key.endswith("/00/image.png")]
    assert Image.open(io.BytesIO(stored[image_key])).format == "PNG"


# --- wrong Content-Type --------------------------------------------------------------------


@pytest.mark.parametrize(
    "content_type",
    ["application/json", "text/plain", "application/x-www-form-urlencoded", "image/png", None],
)
def test_an_upload_that_is_not_multipart_is_refused_with_415(
    api: Api, content_type: str | None
) -> None:
    body, _ = multipart(pair(), class_form())
    headers = {"Content-Type": content_type} if content_type else {}

    response = api.alice.post("/v1/classes", content=body, headers=headers)

    assert_refused(api, response, 415)


@pytest.mark.parametrize(
    ("image", "mask", "field"),
    [
        (encode(photo(), "GIF"), encode(box_mask()), "images[0]"),
        (encode(photo(), "BMP"), encode(box_mask()), "images[0]"),
        (encode(photo(), "JPEG"), encode(box_mask(), "JPEG"), "masks[0]"),
        (b"%PDF-1.4 not a picture", encode(box_mask()), "images[0]"),
    ],
    ids=["gif", "bmp", "jpeg-mask", "pdf"],
)
def test_a_file_of_another_type_is_refused_with_415_whatever_its_name_says(
    api: Api, image: bytes, mask: bytes, field: str
) -> None:
    files = [("images", ("shot.jpg", image, "image/jpeg")), ("masks", ("m.png", mask, "image/png"))]

    response = api.alice.post("/v1/classes", data=class_form(), files=files)

    assert_refused(api, response, 415, field)


def test_predict_refuses_a_json_body_with_415(api: Api) -> None:
    response = api.alice.post(f"/v1/trainings/{api.alice_id}/predict", json={"image": "x"})

    assert response.status_code == 415


# --- thousands of parts --------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["files", "fields", "prompts"])
def test_five_thousand_parts_are_refused_fast_with_a_clear_message(api: Api, kind: str) -> None:
    # given: 5,000 parts of one kind beside a valid upload
    data: dict[str, object] = dict(class_form())
    files = pair()
    if kind == "files":
        files = files + [("images", (f"{i}.jpg", b"x", "")) for i in range(5000)]
    elif kind == "fields":
        data.update({f"field{i}": "x" for i in range(5000)})
    else:
        data["prompts"] = ["a photo of a dog"] * 5000

    # when
    started = time.monotonic()
    response = api.alice.post("/v1/classes", data=data, files=files)

    # then: a 400 that says what is wrong, in well under a second or two
    assert time.monotonic() - started < 3
    assert_refused(api, response, 400)
    assert "Too many" in response.json()["detail"]


# --- a chunked body over the cap -----------------------------------------------------------


def spooled_bytes(folder: Path) -> int:
    """Bytes held on disk by this process's open files under `folder`, including unlinked
    temporary files (those are invisible in a listing; /proc shows them)."""
    total = 0
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
            if target.startswith(str(folder)):
                total += os.stat(f"/proc/self/fd/{fd}").st_blocks * 512
        except OSError:
            continue
    return total


def test_a_chunked_body_over_the_cap_is_refused_with_bounded_disk_use(
    make_api: ApiFactory, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # given: a 4 MB cap, the multipart parser's temporary files in a folder of the test's own,
    # and an upload of 40 MB sent chunked (no Content-Length) over a real connection
    cap = 4 * 1024 * 1024
    api = make_api(max_upload_bytes=cap)
    spool = tmp_path / "spool"
    spool.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(spool))
    big = np.random.default_rng(0).integers(0, 256, 40 * 1024 * 1024, dtype=np.uint8).tobytes()
    body, content_type = multipart([("images", ("big.jpg", big, "image/jpeg"))], class_form())
    peak = 0

    def chunks() -> Iterator[bytes]:
        nonlocal peak
        for start in range(0, len(body), 256 * 1024):
            peak = max(peak, spooled_bytes(spool))
            yield body[start : start + 256 * 1024]

    # when
    with ServedApi.serving(api.app) as served, served.client(api.keys["alice"]) as client:
        started = time.monotonic()
        try:
            response = client.post(
                "/v1/classes", content=chunks(), headers={"Content-Type": content_type}
            )
        except Exception as error:  # the server may close the connection after answering
            pytest.fail(f"no answer: {error!r}")
        elapsed = time.monotonic() - started

    # then: 413, the disk the parser used stayed within the cap, and none of it is left
    assert response.status_code == 413, response.text
    assert response.headers["content-type"] == "application/problem+json"
    assert peak <= cap + 1024 * 1024, f"{peak:,} bytes spooled"
    assert spooled_bytes(spool) == 0 and list(spool.iterdir()) == []
    assert elapsed < 20
    api.assert_nothing_stored()


# --- EXIF orientation ----------------------------------------------------------------------

ORIENTATION = 0x0112
ROTATED_90_CW = 6  # "turn the stored picture 90° clockwise to show it"


def phone_photo() -> bytes:
    """The dog photo as a phone stores it when held upright: the sensor's pixels turned on
    their side, with EXIF Orientation 6 telling viewers to turn it back."""
    upright = Image.open(DOG / "1.jpg")
    stored = upright.transpose(Image.Transpose.ROTATE_90)  # 90° counter-clockwise
    exif = Image.Exif()
    exif[ORIENTATION] = ROTATED_90_CW
    buffer = io.BytesIO()
    stored.save(buffer, "JPEG", quality=95, exif=exif)
    return buffer.getvalue()


def test_an_exif_rotated_photo_is_used_as_viewers_show_it_with_its_upright_mask(api: Api) -> None:
    # given: a phone photo stored on its side, and the dog's mask drawn on the upright picture
    photo_bytes = phone_photo()
    assert Image.open(io.BytesIO(photo_bytes)).size == (366, 489)
    mask = (DOG / "1.png").read_bytes()

    # when
    created = api.alice.post(
        "/v1/classes",
        data=class_form(),
        files=[("images", ("phone.jpg", photo_bytes, "")), ("masks", ("m.png", mask, ""))],
    )

    # then: accepted; the picture kept is upright, the size of its mask, and looks like the dog
    assert created.status_code == 202, created.text
    (image_key,) = [key for key in api.blobs() if key.endswith("/00/image.png")]
    kept = Image.open(io.BytesIO(api.storage.get(image_key))).convert("RGB")
    original = Image.open(DOG / "1.jpg").convert("RGB")
    assert kept.size == original.size == (489, 366)
    difference = np.abs(np.asarray(kept, float) - np.asarray(original, float)).mean()
    assert difference < 6, difference


def test_a_mask_drawn_on_the_sideways_pixels_of_a_rotated_photo_is_refused(api: Api) -> None:
    # given: the mask turned like the stored pixels, not like the picture viewers show
    sideways = Image.open(DOG / "1.png").transpose(Image.Transpose.ROTATE_90)

    response = api.alice.post(
        "/v1/classes",
        data=class_form(),
        files=[
            ("images", ("phone.jpg", phone_photo(), "")),
            ("masks", ("m.png", encode(sideways), "")),
        ],
    )

    assert_refused(api, response, 422, "masks[0]")
    assert "after the image's EXIF orientation" in response.json()["errors"][0]["message"]
