"""Shot ingest: decoding and checking image + mask pairs, and pairing a shots folder by stem."""

from __future__ import annotations

import pickle
import struct
import zlib
from io import BytesIO
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from aligndiff.shots import (
    DEFAULT_MAX_PIXELS,
    Shot,
    ShotError,
    decode_image,
    decode_mask,
    load_shot,
    load_shots,
)

FORMAT_OF_SUFFIX = {".jpg": "JPEG", ".jpeg": "JPEG", ".png": "PNG", ".webp": "WEBP"}
EXIF_ORIENTATION = 0x0112
RED = (255, 0, 0)


# --- factories ---------------------------------------------------------------------------------


def photo(size: tuple[int, int] = (48, 32)) -> Image.Image:
    """A smooth RGB gradient of `size` (width, height): compresses cleanly in every format."""
    width, height = size
    red = np.broadcast_to(np.linspace(0, 255, width), (height, width))
    green = np.broadcast_to(np.linspace(0, 255, height)[:, None], (height, width))
    blue = np.full((height, width), 128.0)
    return Image.fromarray(np.stack([red, green, blue], axis=-1).astype(np.uint8))


def box_mask(size: tuple[int, int] = (48, 32)) -> Image.Image:
    """An 8-bit mask of `size` (width, height): a white box in the middle of a black field."""
    width, height = size
    gray = np.zeros((height, width), np.uint8)
    gray[height // 4 : 3 * height // 4, width // 4 : 3 * width // 4] = 255
    return Image.fromarray(gray)


def encode(image: Image.Image, image_format: str, **params: object) -> bytes:
    buffer = BytesIO()
    image.save(buffer, image_format, **params)
    return buffer.getvalue()


def png_header(width: int, height: int) -> bytes:
    """A PNG that claims `width` x `height` RGB pixels but holds no pixel data: a cheap bomb."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        crc = zlib.crc32(kind + body)
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", crc)

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(b""))
        + chunk(b"IEND", b"")
    )


def animation(image_format: str) -> bytes:
    frames = [photo(), photo().transpose(Image.Transpose.FLIP_LEFT_RIGHT)]
    return encode(frames[0], image_format, save_all=True, append_images=frames[1:])


def write(path: Path, data: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def write_pair(
    folder: Path,
    stem: str,
    *,
    image_suffix: str = ".jpg",
    size: tuple[int, int] = (48, 32),
    split: bool = False,
) -> None:
    """Write one shot, side by side in `folder` or (split) in its images/ and masks/."""
    image_dir, mask_dir = (folder / "images", folder / "masks") if split else (folder, folder)
    write(image_dir / f"{stem}{image_suffix}", encode(photo(size), FORMAT_OF_SUFFIX[image_suffix]))
    write(mask_dir / f"{stem}.png", encode(box_mask(size), "PNG"))


def mask_png(gray: np.ndarray) -> bytes:
    return encode(Image.fromarray(gray.astype(np.uint8)), "PNG")


# --- the real fixtures -------------------------------------------------------------------------


def test_dog_fixture_loads_as_one_shot_with_a_mask_of_its_image_size(
    dog_shots_dir: Path,
) -> None:
    shots = load_shots(dog_shots_dir)

    assert [shot.stem for shot in shots] == ["1"]
    shot = shots[0]
    assert shot.image.mode == "RGB"
    assert shot.image_array.shape == (366, 489, 3)
    assert shot.image_array.dtype == np.uint8
    assert shot.mask.shape == (366, 489)
    assert shot.mask.dtype == np.bool_
    assert shot.mask.any() and not shot.mask.all()


def test_albatross_antialiased_mask_is_cut_at_half_gray(albatross_shots_dir: Path) -> None:
    with Image.open(albatross_shots_dir / "1.png") as mask_file:
        gray = np.asarray(mask_file.convert("RGB").convert("L"))
    assert ((gray > 0) & (gray < 128)).any(), "fixture should have soft edges below the cut"

    (shot,) = load_shots(albatross_shots_dir)

    assert shot.image.size == (224, 224)
    np.testing.assert_array_equal(shot.mask, gray >= 128)
    assert shot.mask.any() and not shot.mask.all()


# --- shots folder layouts ----------------------------------------------------------------------


def test_flat_folder_pairs_by_stem_in_stem_order_whatever_the_creation_order(
    tmp_path: Path,
) -> None:
    # Each stem has its own size, so a mask paired with the wrong image would not fit it.
    write_pair(tmp_path, "b", image_suffix=".webp", size=(40, 30))
    write_pair(tmp_path, "c", image_suffix=".jpeg", size=(36, 24))
    write_pair(tmp_path, "a", image_suffix=".jpg", size=(30, 40))

    shots = load_shots(tmp_path)

    assert [shot.stem for shot in shots] == ["a", "b", "c"]
    assert [shot.image.size for shot in shots] == [(30, 40), (40, 30), (36, 24)]


def test_split_folder_pairs_images_and_masks_by_stem_including_png_images(
    tmp_path: Path,
) -> None:
    write_pair(tmp_path, "2", image_suffix=".png", size=(40, 30), split=True)
    write_pair(tmp_path, "1", image_suffix=".jpg", size=(30, 40), split=True)

    shots = load_shots(tmp_path)

    assert [shot.stem for shot in shots] == ["1", "2"]
    assert [shot.image.size for shot in shots] == [(30, 40), (40, 30)]


def test_hidden_files_and_other_suffixes_are_ignored(tmp_path: Path) -> None:
    write_pair(tmp_path, "1")
    write(tmp_path / ".DS_Store", b"\x00\x00\x00\x01Bud1")
    write(tmp_path / "._1.jpg", b"AppleDouble junk")
    write(tmp_path / "notes.txt", b"shot 1 is the best one")
    write(tmp_path / "thumbs" / "1.jpg", encode(photo((8, 8)), "JPEG"))

    shots = load_shots(tmp_path)

    assert [shot.stem for shot in shots] == ["1"]


def test_upper_case_suffixes_are_accepted(tmp_path: Path) -> None:
    write(tmp_path / "1.JPG", encode(photo(), "JPEG"))
    write(tmp_path / "1.PNG", encode(box_mask(), "PNG"))

    assert [shot.stem for shot in load_shots(tmp_path)] == ["1"]


def test_file_type_is_read_from_the_bytes_not_the_suffix(tmp_path: Path) -> None:
    write(tmp_path / "1.jpg", encode(photo(), "PNG"))
    write(tmp_path / "1.png", encode(box_mask(), "PNG"))
    write(tmp_path / "2.jpg", encode(photo(), "GIF"))
    write(tmp_path / "2.png", encode(box_mask(), "PNG"))

    with pytest.raises(ShotError, match="must be JPEG, PNG or WEBP, found GIF") as error:
        load_shots(tmp_path)

    assert error.value.source == "2.jpg"


def test_image_without_mask_is_rejected_in_a_flat_folder(tmp_path: Path) -> None:
    write_pair(tmp_path, "2")
    write(tmp_path / "1.jpg", encode(photo(), "JPEG"))

    with pytest.raises(ShotError, match=r"image has no mask: expected 1\.png") as error:
        load_shots(tmp_path)

    assert error.value.source == "1.jpg"


def test_image_without_mask_is_rejected_in_a_split_folder(tmp_path: Path) -> None:
    write(tmp_path / "images" / "1.jpg", encode(photo(), "JPEG"))
    (tmp_path / "masks").mkdir()

    with pytest.raises(ShotError, match=r"expected masks/1\.png") as error:
        load_shots(tmp_path)

    assert error.value.source == "images/1.jpg"


def test_mask_without_image_is_rejected_in_a_split_folder(tmp_path: Path) -> None:
    write_pair(tmp_path, "1", split=True)
    write(tmp_path / "masks" / "2.png", encode(box_mask(), "PNG"))

    with pytest.raises(ShotError, match="mask has no image") as error:
        load_shots(tmp_path)

    assert error.value.source == "masks/2.png"


def test_lone_png_in_a_flat_folder_points_to_the_split_layout(tmp_path: Path) -> None:
    write(tmp_path / "1.png", encode(photo(), "PNG"))

    with pytest.raises(ShotError, match="image without a mask or a mask without an image") as error:
        load_shots(tmp_path)

    assert "put images in images/ and masks in masks/" in str(error.value)
    assert error.value.source == "1.png"


def test_two_images_with_one_stem_are_rejected(tmp_path: Path) -> None:
    write_pair(tmp_path, "1", image_suffix=".jpg")
    write(tmp_path / "1.webp", encode(photo(), "WEBP"))

    with pytest.raises(ShotError, match=r"stem '1' names more than one image \(1\.jpg, 1\.webp\)"):
        load_shots(tmp_path)


def test_png_mask_in_the_masks_folder_is_required(tmp_path: Path) -> None:
    write(tmp_path / "images" / "1.jpg", encode(photo(), "JPEG"))
    write(tmp_path / "masks" / "1.jpg", encode(box_mask(), "JPEG"))

    with pytest.raises(ShotError, match="masks must be PNG") as error:
        load_shots(tmp_path)

    assert error.value.source == "masks/1.jpg"


def test_folder_with_no_shots_is_rejected(tmp_path: Path) -> None:
    write(tmp_path / "notes.txt", b"nothing here yet")

    with pytest.raises(ShotError, match="holds no shots"):
        load_shots(tmp_path)


def test_missing_folder_is_rejected(tmp_path: Path) -> None:
    with pytest.raises(ShotError, match="shots folder does not exist") as error:
        load_shots(tmp_path / "nowhere")

    assert error.value.source == str(tmp_path / "nowhere")


def test_mixing_the_two_layouts_is_rejected(tmp_path: Path) -> None:
    write_pair(tmp_path, "1")
    write_pair(tmp_path, "2", split=True)

    with pytest.raises(
        ShotError, match=r"mixes two layouts: image files at the top \(1\.jpg, 1\.png\)"
    ):
        load_shots(tmp_path)


def test_images_folder_without_masks_folder_is_rejected(tmp_path: Path) -> None:
    write(tmp_path / "images" / "1.jpg", encode(photo(), "JPEG"))

    with pytest.raises(ShotError, match="has a images/ folder but no masks/ folder"):
        load_shots(tmp_path)


# --- decoding images ---------------------------------------------------------------------------


def test_bytes_that_are_no_image_are_rejected() -> None:
    with pytest.raises(ShotError, match="is not an image") as error:
        decode_image(b"<html>an error page saved as a .jpg</html>", source="1.jpg")

    assert error.value.source == "1.jpg"
    assert str(error.value).startswith("1.jpg: ")


@pytest.mark.parametrize("image_format", ["GIF", "BMP"])
def test_images_in_other_formats_are_rejected_naming_the_format(image_format: str) -> None:
    with pytest.raises(ShotError, match=f"must be JPEG, PNG or WEBP, found {image_format}"):
        decode_image(encode(photo(), image_format), source="1.jpg")


def test_truncated_image_is_rejected() -> None:
    data = encode(photo((64, 64)), "JPEG")

    with pytest.raises(ShotError, match="corrupt or truncated"):
        decode_image(data[: len(data) // 2], source="1.jpg")


def test_image_over_the_default_pixel_cap_is_rejected_before_decoding() -> None:
    # 8000 x 6000 is over the cap but under Pillow's own bomb limit, and the file holds no
    # pixel data: the message shows the size check ran first, not a decode failure.
    with pytest.raises(ShotError, match=f"over the limit of {DEFAULT_MAX_PIXELS:,}"):
        decode_image(png_header(8000, 6000), source="big.png")


def test_pixel_cap_is_configurable() -> None:
    data = encode(photo((48, 32)), "PNG")

    assert decode_image(data, source="1.png", max_pixels=48 * 32).size == (48, 32)
    with pytest.raises(ShotError, match="48x32 = 1,536 pixels, over the limit of 1,535"):
        decode_image(data, source="1.png", max_pixels=48 * 32 - 1)


@pytest.mark.parametrize("side", [10_000, 100_000], ids=["pillow-warns", "pillow-refuses"])
def test_pillow_decompression_bomb_guard_becomes_a_shot_error(side: int) -> None:
    pillow_limit = Image.MAX_IMAGE_PIXELS

    with pytest.raises(ShotError, match="too large to decode safely"):
        decode_image(png_header(side, side), source="bomb.png", max_pixels=10 * side * side)

    assert pillow_limit == Image.MAX_IMAGE_PIXELS


@pytest.mark.parametrize("image_format", ["PNG", "WEBP"])
def test_animated_images_are_rejected(image_format: str) -> None:
    with pytest.raises(ShotError, match=r"is animated \(2 frames\)"):
        decode_image(animation(image_format), source="1.png")


def test_jpeg_carrying_extra_pictures_decodes_as_its_first_picture() -> None:
    # Phone cameras write such files (Pillow calls them MPO): a photo plus previews or depth maps.
    data = encode(photo((48, 32)), "MPO", save_all=True, append_images=[photo((16, 16))])

    image = decode_image(data, source="1.jpg")

    assert image.size == (48, 32)


@pytest.mark.parametrize(
    ("mode", "image_format"),
    [
        ("RGBA", "PNG"),
        ("LA", "PNG"),
        ("P", "PNG"),
        ("L", "PNG"),
        ("I;16", "PNG"),
        ("CMYK", "JPEG"),
        ("RGB", "WEBP"),
    ],
)
def test_every_stored_colour_mode_decodes_to_rgb(mode: str, image_format: str) -> None:
    data = encode(photo((48, 32)).convert(mode), image_format)

    image = decode_image(data, source="1.png")

    assert image.mode == "RGB"
    assert image.size == (48, 32)


def test_transparent_pixels_decode_as_white() -> None:
    clear = Image.new("RGBA", (8, 8), (0, 0, 0, 0))

    image = decode_image(encode(clear, "PNG"), source="1.png")

    assert (np.asarray(image) == 255).all()


def test_sixteen_bit_gray_is_scaled_not_clipped() -> None:
    mid_gray = Image.fromarray(np.full((8, 8), 32768, np.uint16))

    image = decode_image(encode(mid_gray, "PNG"), source="1.png")

    assert (np.asarray(image) == 128).all()


def test_exif_rotated_jpeg_is_turned_upright_and_its_mask_must_fit_upright() -> None:
    # Stored 40 wide x 20 high with a red top-left corner; orientation 6 means "turn 90 degrees
    # clockwise to view", so upright it is 20 x 40 with the red corner at the top right.
    stored = photo((40, 20))
    stored.paste(RED, (0, 0, 10, 10))
    exif = Image.Exif()
    exif[EXIF_ORIENTATION] = 6
    data = encode(stored, "JPEG", exif=exif.tobytes(), quality=95)

    shot = load_shot(data, encode(box_mask((20, 40)), "PNG"), stem="1")

    assert shot.image.size == (20, 40)
    upright = shot.image_array.astype(int)
    assert np.abs(upright[2, -3] - RED).max() < 40
    assert np.abs(upright[2, 2] - RED).max() > 100
    with pytest.raises(ShotError, match="mask is 40x20 but its image is 20x40"):
        load_shot(data, encode(box_mask((40, 20)), "PNG"), stem="1")


# --- decoding masks ----------------------------------------------------------------------------


def test_mask_of_another_size_than_its_image_is_rejected() -> None:
    with pytest.raises(ShotError, match="mask is 32x48 but its image is 48x32") as error:
        load_shot(encode(photo((48, 32)), "JPEG"), encode(box_mask((32, 48)), "PNG"), stem="1")

    assert error.value.source == "mask '1'"


def test_empty_mask_is_rejected() -> None:
    with pytest.raises(ShotError, match="mask is empty: no pixel is foreground"):
        decode_mask(mask_png(np.zeros((32, 48))), source="1.png", size=(48, 32))


def test_full_mask_is_rejected() -> None:
    with pytest.raises(ShotError, match="mask is full: every pixel is foreground"):
        decode_mask(mask_png(np.full((32, 48), 255)), source="1.png", size=(48, 32))


def test_jpeg_mask_is_rejected() -> None:
    with pytest.raises(ShotError, match="mask must be PNG, found JPEG"):
        decode_mask(encode(box_mask(), "JPEG"), source="1.png", size=(48, 32))


def test_palette_mask_is_foreground_except_index_0_and_void_255() -> None:
    # Four vertical bands of palette indices 0 (background), 255 (VOC void), 1 and 7.
    bands = np.repeat(np.array([0, 255, 1, 7], np.uint8), 12)
    indices = np.broadcast_to(bands, (32, 48)).copy()
    palette = Image.fromarray(indices, mode="P")
    palette.putpalette([value for index in range(256) for value in (index, 0, 0)])

    mask = decode_mask(encode(palette, "PNG"), source="1.png", size=(48, 32))

    expected_columns = np.repeat([False, False, True, True], 12)
    np.testing.assert_array_equal(mask, np.broadcast_to(expected_columns, (32, 48)))


# --- errors and shots --------------------------------------------------------------------------


def test_errors_name_the_upload_field_when_given() -> None:
    with pytest.raises(ShotError) as error:
        load_shot(b"junk", encode(box_mask(), "PNG"), stem="1", image_source="images[0]")

    assert error.value.source == "images[0]"
    assert str(error.value).startswith("images[0]: is not an image")


def test_shot_error_survives_pickling_with_its_source() -> None:
    error = ShotError("mask is empty", "1.png")

    copy = pickle.loads(pickle.dumps(error))

    assert (copy.source, copy.detail, str(copy)) == (
        "1.png",
        "mask is empty",
        "1.png: mask is empty",
    )


def test_shot_rejects_a_mask_that_does_not_fit_its_image() -> None:
    with pytest.raises(ValueError, match="does not match image size"):
        Shot(stem="1", image=photo((48, 32)), mask=np.zeros((48, 32), bool))
