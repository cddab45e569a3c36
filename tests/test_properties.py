"""Properties of the validators that untrusted input meets first, checked on inputs hypothesis
generates: masks are binarized by the public rule (API.md, Masks) whatever their mode and
palette; any bytes given as a shot end as a shot or as the documented `ShotError`, never another
exception; and no name a client or an archive controls (a blob key, an archive entry, an upload's
file name) can lead out of its folder.
"""

from __future__ import annotations

import io
import os.path
import tempfile
import zipfile
from pathlib import Path

import numpy as np
import numpy.typing as npt
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays
from PIL import Image

from aligndiff.masks import binarize_mask
from aligndiff.shots import ShotError, decode_image, decode_mask
from aligndiff_client import UnsafeArchive, extract
from service.contexts.uploads import display_name
from service.storage import LocalStorage, validate_key

# Enough examples to find the edges, few enough for a couple of seconds per property.
PROPERTY = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])

Gray = npt.NDArray[np.uint8]

sizes = st.tuples(st.integers(1, 12), st.integers(1, 12))


def gray_arrays(size: tuple[int, int] | None = None) -> st.SearchStrategy[Gray]:
    if size is not None:
        return arrays(np.uint8, (size[1], size[0]))
    return sizes.flatmap(lambda wh: arrays(np.uint8, (wh[1], wh[0])))


def png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    return buffer.getvalue()


# --- the mask rule -------------------------------------------------------------------------


@PROPERTY
@given(gray_arrays())
def test_a_gray_mask_is_foreground_exactly_where_it_is_at_least_128(gray: Gray) -> None:
    assert np.array_equal(binarize_mask(Image.fromarray(gray, "L")), gray >= 128)


@PROPERTY
@given(gray_arrays())
def test_a_gray_mask_stored_as_rgb_reads_as_its_gray(gray: Gray) -> None:
    rgb = Image.fromarray(np.stack([gray] * 3, axis=-1), "RGB")
    assert np.array_equal(binarize_mask(rgb), gray >= 128)


@PROPERTY
@given(gray_arrays(), st.integers(0, 255))
def test_an_rgba_mask_of_one_colour_reads_from_its_alpha(alpha: Gray, colour: int) -> None:
    assume(alpha.min() != alpha.max())
    rgba = np.zeros((*alpha.shape, 4), np.uint8)
    rgba[..., :3] = colour
    rgba[..., 3] = alpha
    assert np.array_equal(binarize_mask(Image.fromarray(rgba, "RGBA")), alpha >= 128)


@PROPERTY
@given(gray_arrays(), st.binary(min_size=768, max_size=768))
def test_a_palette_mask_is_foreground_at_every_index_but_0_and_255(
    index: Gray, palette: bytes
) -> None:
    # given: any indices, under any palette (the colours must not matter)
    image = Image.fromarray(index, "P")
    image.putpalette(palette)

    # then: through a PNG round trip, as an upload arrives
    decoded = Image.open(io.BytesIO(png(image)))
    assert decoded.mode == "P"
    assert np.array_equal(binarize_mask(decoded), (index != 0) & (index != 255))


@PROPERTY
@given(gray_arrays(), sizes)
def test_a_mask_upload_is_accepted_by_the_rule_or_refused_for_a_documented_reason(
    gray: Gray, image_size: tuple[int, int]
) -> None:
    mask_size = (gray.shape[1], gray.shape[0])
    try:
        mask = decode_mask(png(Image.fromarray(gray, "L")), source="m", size=image_size)
    except ShotError as error:
        # then: refused only for its size, or for holding no foreground or no background
        expected = gray >= 128
        if mask_size != image_size:
            assert "its image is" in error.detail
        elif not expected.any():
            assert "mask is empty" in error.detail
        else:
            assert expected.all() and "mask is full" in error.detail
        return
    assert mask_size == image_size
    assert np.array_equal(mask, gray >= 128)
    assert mask.any() and not mask.all()


# --- any bytes as a shot -------------------------------------------------------------------

VALID_IMAGE = png(Image.fromarray(np.arange(48, dtype=np.uint8).reshape(6, 8), "L"))
VALID_MASK = png(Image.fromarray(((np.arange(48) % 3 == 0) * 255).astype(np.uint8).reshape(6, 8)))


@st.composite
def damaged(draw: st.DrawFn, original: bytes) -> bytes:
    """`original` with some bytes overwritten, cut short or extended."""
    data = bytearray(original)
    for _ in range(draw(st.integers(1, 8))):
        position = draw(st.integers(0, len(data) - 1))
        data[position] = draw(st.integers(0, 255))
    cut = draw(st.integers(1, len(data)))
    return bytes(data[:cut]) + draw(st.binary(max_size=16))


@PROPERTY
@given(st.one_of(st.binary(max_size=256), damaged(VALID_IMAGE), damaged(VALID_MASK)))
def test_any_bytes_as_an_image_decode_or_raise_shot_error(data: bytes) -> None:
    try:
        image = decode_image(data, source="images[0]")
    except ShotError as error:
        assert error.source == "images[0]"
        return
    assert image.mode == "RGB"


@PROPERTY
@given(st.one_of(st.binary(max_size=256), damaged(VALID_MASK)))
def test_any_bytes_as_a_mask_decode_or_raise_shot_error(data: bytes) -> None:
    try:
        mask = decode_mask(data, source="masks[0]", size=(8, 6))
    except ShotError as error:
        assert error.source == "masks[0]"
        return
    assert mask.shape == (6, 8) and mask.any() and not mask.all()


# --- names that must stay in their folder --------------------------------------------------

# Path pieces that make escapes likely, beside ordinary ones.
path_parts = st.sampled_from(["..", ".", "", "a", "b.png", "~", "C:", "%2e%2e", " ", "\\..", "…"])
path_like = st.lists(path_parts, min_size=1, max_size=5).flatmap(
    lambda parts: st.sampled_from(["/", "\\"]).map(lambda sep: sep.join(parts))
)
names = st.one_of(path_like, st.text(max_size=40))


@PROPERTY
@given(names)
def test_a_blob_key_is_refused_or_stays_under_the_storage_root(key: str) -> None:
    root = Path("/srv/blobs")
    try:
        validate_key(key)
    except ValueError:
        return
    # then: an accepted key names a path strictly under the root, on any resolution of it
    resolved = Path(os.path.normpath(root / key))
    assert resolved.is_relative_to(root) and resolved != root


@pytest.mark.filterwarnings("ignore:Duplicate name")  # two entries of one name: fine to try
@settings(max_examples=40, deadline=None)
@given(st.lists(names.filter(bool), min_size=1, max_size=3))
def test_an_archive_entry_is_refused_or_extracted_inside_the_target(entries: list[str]) -> None:
    with tempfile.TemporaryDirectory() as scratch:
        # given: a zip with those entry names, beside a target folder in an otherwise empty place
        base = Path(scratch)
        archive = base / "dataset.zip"
        with zipfile.ZipFile(archive, "w") as zf:
            for index, name in enumerate(entries):
                zf.writestr(zipfile.ZipInfo(name), f"payload {index}".encode())
        dest = base / "out"

        # when
        try:
            written = extract(archive, dest)
        except UnsafeArchive:
            # then: refused whole, before anything is written
            assert not [p for p in base.rglob("*") if p.is_file() and p != archive]
            return

        # then: nothing was written anywhere but under the target
        assert {p for p in base.rglob("*") if not p.is_relative_to(dest)} == {archive}
        assert all(path.resolve().is_relative_to(dest.resolve()) for path in written)


@PROPERTY
@given(names)
def test_an_upload_file_name_shows_as_one_plain_name(filename: str) -> None:
    name = display_name(filename, fallback="shot-00")

    assert name == "shot-00" or name.strip() == name
    assert "/" not in name and "\\" not in name
    assert name not in ("", ".", "..")
    assert name.isprintable()
    assert 1 <= len(name) <= 255
    # a plain name is kept as the client gave it
    plain = filename.isprintable() and filename.strip() == filename and len(filename) <= 255
    if plain and filename not in ("", ".", "..") and not {"/", "\\"} & set(filename):
        assert name == filename


@pytest.mark.parametrize(
    ("filename", "shown"),
    [
        ("C:\\Users\\me\\dog.jpg", "dog.jpg"),
        ("../../etc/passwd", "passwd"),
        ("photos/..", "shot-00"),
        ("dog\x00.jpg\n", "dog.jpg"),
        ("", "shot-00"),
    ],
)
def test_upload_file_names_from_real_clients(filename: str, shown: str) -> None:
    assert display_name(filename, fallback="shot-00") == shown


def test_a_storage_refuses_a_key_that_would_leave_its_root(tmp_path: Path) -> None:
    storage = LocalStorage(tmp_path / "blobs")
    for key in ("../outside", "a/../../outside", "/etc/passwd", "a//b", "./a"):
        with pytest.raises(ValueError):
            storage.put(key, b"x", content_type="text/plain")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["blobs"]
