"""Shot ingest: the few real image + mask pairs of a class, decoded, checked and paired.

Every problem a user can cause (a wrong or corrupt file, an oversized image, a mask that does not
fit its image, a shots folder that cannot be paired) raises `ShotError`, whose message names the
file concerned and says what was wrong, so the CLI and the service can show it as it is.
"""

from __future__ import annotations

import struct
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from io import BytesIO
from pathlib import Path

import numpy as np
import numpy.typing as npt
from PIL import Image, ImageOps, UnidentifiedImageError

from aligndiff.masks import BoolMask, binarize_mask

DEFAULT_MAX_PIXELS = 40_000_000
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp")
MASK_SUFFIX = ".png"

IMAGE_FORMATS = ("JPEG", "PNG", "WEBP")
MASK_FORMATS = ("PNG",)
# NOTE: Pillow names a JPEG that carries extra pictures (phone cameras' previews or depth maps)
# "MPO". It is still a JPEG and its first picture is the photo, so it is accepted as one.
_JPEG_WITH_EXTRA_PICTURES = "MPO"

# What Pillow raises on bytes that it identified but cannot decode (truncated, corrupt chunks,
# oversized metadata). Anything else escaping a decode is a bug, not the user's file.
_DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, IndexError, struct.error)

_WHITE = (255, 255, 255, 255)


class ShotError(ValueError):
    """A user-supplied shot or shots folder cannot be used.

    `source` is the file name (or upload field, or folder) concerned and `detail` says what is
    wrong with it; `str(error)` is both, as `"<source>: <detail>"`.
    """

    def __init__(self, detail: str, source: str) -> None:
        # Both stay in `args` so the error survives pickling (e.g. across worker processes).
        super().__init__(detail, source)
        self.detail = detail
        self.source = source

    def __str__(self) -> str:
        return f"{self.source}: {self.detail}"


class ShotFormatError(ShotError):
    """A shot file is not of an accepted type: bytes in no known image format, or a format
    other than those allowed (JPEG, PNG or WEBP images; PNG masks)."""


@dataclass(frozen=True, eq=False)
class Shot:
    """One real example of a class: an RGB image and its foreground mask, of one size.

    Shots compare (and hash) by identity: images and arrays have no useful equality.
    """

    stem: str
    image: Image.Image  # RGB, EXIF orientation applied
    mask: BoolMask  # (H, W) bool, True = foreground

    def __post_init__(self) -> None:
        if self.image.mode != "RGB":
            raise ValueError(f"shot image must be RGB, got {self.image.mode}")
        if self.mask.shape != (self.image.height, self.image.width):
            raise ValueError(
                f"shot mask shape {self.mask.shape} does not match image size {self.image.size}"
            )

    @property
    def image_array(self) -> npt.NDArray[np.uint8]:
        """The image as a uint8 array of shape (H, W, 3)."""
        return np.asarray(self.image, dtype=np.uint8)


def decode_image(data: bytes, *, source: str, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Decode a shot image: a single-frame JPEG, PNG or WEBP, whatever its file name says.

    The format is read from the bytes. The pixel count is checked against `max_pixels` before
    any pixel data is decoded; Pillow's own decompression-bomb limit (`Image.MAX_IMAGE_PIXELS`)
    also applies, so the effective cap is the smaller of the two. The result is RGB with the EXIF
    orientation applied: transparent pixels are laid on white, 16-bit gray is scaled to 8 bits.

    Raises ShotError naming `source` for any other format, undecodable bytes, an animation or an
    image over the cap.
    """
    with _pillow_errors(source):
        image = Image.open(BytesIO(data))
        _check_format(image, IMAGE_FORMATS, source=source, kind="image")
        _check_single_frame(image, source=source)
        if image.width * image.height > max_pixels:
            raise ShotError(
                f"image is {image.width}x{image.height} = {image.width * image.height:,} pixels, "
                f"over the limit of {max_pixels:,}; downscale it",
                source,
            )
        image.load()
        return _to_rgb(ImageOps.exif_transpose(image))


def decode_mask(data: bytes, *, source: str, size: tuple[int, int]) -> BoolMask:
    """Decode a shot mask into its foreground: an (H, W) bool array.

    The mask must be a single-frame PNG (read from the bytes), binarized by the public rule
    (`aligndiff.masks.binarize_mask`). After its own EXIF orientation is applied it must be
    exactly `size` = (width, height) of its image, also taken after orientation, and hold at
    least one foreground and one background pixel. Raises ShotError naming `source` otherwise.
    """
    width, height = size
    with _pillow_errors(source):
        image = Image.open(BytesIO(data))
        _check_format(image, MASK_FORMATS, source=source, kind="mask")
        _check_single_frame(image, source=source)
        # Checked before decoding so that a mask can never cost more than its image, which has
        # already passed the pixel cap; orientation below may still swap width and height.
        if image.width * image.height != width * height:
            raise _size_mismatch(image.size, size, source)
        image.load()
        oriented = ImageOps.exif_transpose(image)
    if oriented.size != size:
        raise _size_mismatch(oriented.size, size, source)
    mask = binarize_mask(oriented)
    if not mask.any():
        raise ShotError(
            "mask is empty: no pixel is foreground (gray value >= 128, or a palette index "
            "other than 0 and 255); paint the object in white on black",
            source,
        )
    if mask.all():
        raise ShotError(
            "mask is full: every pixel is foreground, so nothing tells the object from its "
            "background; paint the background black",
            source,
        )
    return mask


def load_shot(
    image_bytes: bytes,
    mask_bytes: bytes,
    *,
    stem: str,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    image_source: str | None = None,
    mask_source: str | None = None,
) -> Shot:
    """Decode and check one image + mask pair (see `decode_image` and `decode_mask`).

    Errors name `image_source` / `mask_source` (a file name or upload field) when given, else
    the image or mask of `stem`.
    """
    image = decode_image(
        image_bytes, source=image_source or f"image {stem!r}", max_pixels=max_pixels
    )
    mask = decode_mask(mask_bytes, source=mask_source or f"mask {stem!r}", size=image.size)
    return Shot(stem=stem, image=image, mask=mask)


def load_shots(directory: Path, *, max_pixels: int = DEFAULT_MAX_PIXELS) -> list[Shot]:
    """Load every shot of a shots folder, paired by stem and sorted by stem.

    Two layouts, never mixed:

    - flat: `<stem>.<jpg|jpeg|webp>` image + `<stem>.png` mask side by side. A stem with one
      .png and one other image file pairs them (the .png is the mask); a lone .png is an error,
      so PNG images need the other layout.
    - split: `images/<stem>.<jpg|jpeg|png|webp>` + `masks/<stem>.png`.

    Suffixes are matched case-insensitively. Hidden files (name starting with ".") and files
    whose suffix is not one of `IMAGE_SUFFIXES` are ignored (notes, thumbnails, sub-folders other
    than images/ and masks/), except an image file in masks/, which is an error since masks must
    be PNG. Errors in pairing (a missing or extra mask, a stem used twice, an empty, missing or
    mixed-layout folder) are raised before any file is decoded. Error sources are paths relative
    to `directory` (e.g. "images/1.jpg"), or the folder itself.
    """
    shots = []
    for stem, image_path, mask_path in _pair_files(directory):
        image_source = _relative_name(image_path, directory)
        mask_source = _relative_name(mask_path, directory)
        shot = load_shot(
            _read(image_path, image_source),
            _read(mask_path, mask_source),
            stem=stem,
            max_pixels=max_pixels,
            image_source=image_source,
            mask_source=mask_source,
        )
        shots.append(shot)
    return shots


@contextmanager
def _pillow_errors(source: str) -> Iterator[None]:
    """Turn Pillow's failures on untrusted bytes into ShotError."""
    try:
        # NOTE: Pillow only *warns* between MAX_IMAGE_PIXELS and twice that; it is made an error
        # here, locally, rather than by changing Pillow's process-wide limit. `catch_warnings`
        # swaps the global filter list, so before Python 3.14 it is not thread-safe: a decode
        # running beside another can leave this filter installed, or undo a filter that another
        # thread added meanwhile.
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            yield
    except ShotError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as error:
        raise ShotError(f"image is too large to decode safely ({error})", source) from None
    except UnidentifiedImageError:
        raise ShotFormatError(
            "is not an image: its bytes are in no known image format", source
        ) from None
    except _DECODE_ERRORS as error:
        raise ShotError(
            f"is corrupt or truncated and cannot be decoded ({error})", source
        ) from None


def _check_format(image: Image.Image, allowed: tuple[str, ...], *, source: str, kind: str) -> None:
    found = image.format or "unknown"
    if found == _JPEG_WITH_EXTRA_PICTURES and "JPEG" in allowed:
        return
    if found not in allowed:
        names = allowed[0] if len(allowed) == 1 else f"{', '.join(allowed[:-1])} or {allowed[-1]}"
        reason = "; JPEG-style compression would blur its edges" if kind == "mask" else ""
        raise ShotFormatError(f"{kind} must be {names}, found {found}{reason}", source)


def _check_single_frame(image: Image.Image, *, source: str) -> None:
    if image.format == _JPEG_WITH_EXTRA_PICTURES:
        return
    frames = getattr(image, "n_frames", 1)
    if frames > 1:
        raise ShotError(
            f"is animated ({frames} frames); a shot must be a single still picture", source
        )


def _size_mismatch(found: tuple[int, int], expected: tuple[int, int], source: str) -> ShotError:
    return ShotError(
        f"mask is {found[0]}x{found[1]} but its image is {expected[0]}x{expected[1]} "
        "(width x height, after the image's EXIF orientation); a mask must have its image's size",
        source,
    )


def _to_rgb(image: Image.Image) -> Image.Image:
    if image.mode in ("I", "I;16", "I;16L", "I;16B"):
        # Pillow converts 16-bit gray to 8 bits by clipping at 255, which would turn almost
        # the whole picture white; scale it instead.
        values = np.asarray(image, dtype=np.int64).clip(0, 65535) >> 8
        image = Image.fromarray(values.astype(np.uint8), mode="L")
    if "A" in image.mode or "transparency" in image.info:
        # Lay transparent pixels on white, as a viewer shows them, rather than exposing
        # whatever colour happens to be stored under alpha 0.
        background = Image.new("RGBA", image.size, _WHITE)
        image = Image.alpha_composite(background, image.convert("RGBA"))
    return image.convert("RGB")


_Pair = tuple[str, Path, Path]  # stem, image file, mask file


def _pair_files(directory: Path) -> list[_Pair]:
    """Find and pair the shot files of a shots folder, checking its layout (no decoding)."""
    folder = str(directory)
    if not directory.exists():
        raise ShotError("shots folder does not exist", folder)
    if not directory.is_dir():
        raise ShotError("is not a folder; expected a folder of shots", folder)
    images_dir, masks_dir = directory / "images", directory / "masks"
    loose = _image_files_by_stem(directory)
    if not (images_dir.is_dir() or masks_dir.is_dir()):
        flat_images = {stem: [f for f in files if not _is_png(f)] for stem, files in loose.items()}
        flat_masks = {stem: [f for f in files if _is_png(f)] for stem, files in loose.items()}
        return _pair_by_stem(directory, flat_images, flat_masks, flat=True)
    if loose:
        names = ", ".join(p.name for files in loose.values() for p in files)
        raise ShotError(
            f"mixes two layouts: image files at the top ({names}) and an images/ or masks/ "
            "folder; put every pair side by side, or every image in images/ and every mask "
            "in masks/",
            folder,
        )
    for present, absent in ((images_dir, masks_dir), (masks_dir, images_dir)):
        if not absent.is_dir():
            raise ShotError(
                f"has a {present.name}/ folder but no {absent.name}/ folder beside it", folder
            )
    masks = _image_files_by_stem(masks_dir)
    for files in masks.values():
        for path in files:
            if not _is_png(path):
                raise ShotError(
                    "is not a .png file; masks must be PNG", _relative_name(path, directory)
                )
    return _pair_by_stem(directory, _image_files_by_stem(images_dir), masks, flat=False)


def _pair_by_stem(
    directory: Path,
    images: dict[str, list[Path]],
    masks: dict[str, list[Path]],
    *,
    flat: bool,
) -> list[_Pair]:
    def name(path: Path) -> str:
        return _relative_name(path, directory)

    stems = sorted(images.keys() | masks.keys())
    if not stems:
        raise ShotError(
            "holds no shots: expected <stem>.<jpg|jpeg|webp> images with <stem>.png masks "
            "beside them, or images/<stem>.<jpg|jpeg|png|webp> with masks/<stem>.png",
            str(directory),
        )
    pairs = []
    for stem in stems:
        stem_images, stem_masks = images.get(stem, []), masks.get(stem, [])
        for files, kind in ((stem_images, "image"), (stem_masks, "mask")):
            if len(files) > 1:
                raise ShotError(
                    f"stem {stem!r} names more than one {kind} "
                    f"({', '.join(name(p) for p in files)}); each stem must name one image "
                    "and one mask",
                    name(files[0]),
                )
        if not stem_masks:
            expected = f"{stem}{MASK_SUFFIX} beside it" if flat else f"masks/{stem}{MASK_SUFFIX}"
            raise ShotError(f"image has no mask: expected {expected}", name(stem_images[0]))
        if not stem_images:
            if flat:
                detail = (
                    "has no partner: it is an image without a mask or a mask without an image. "
                    "Side by side, a .png is the mask of the .jpg, .jpeg or .webp image of the "
                    "same stem; to use PNG images, put images in images/ and masks in masks/"
                )
            else:
                detail = (
                    f"mask has no image: expected images/{stem} with a .jpg, .jpeg, .png or "
                    ".webp suffix"
                )
            raise ShotError(detail, name(stem_masks[0]))
        pairs.append((stem, stem_images[0], stem_masks[0]))
    return pairs


def _image_files_by_stem(folder: Path) -> dict[str, list[Path]]:
    """Non-hidden files of `folder` with an image suffix, grouped by stem, in name order."""
    groups: dict[str, list[Path]] = {}
    for path in sorted(folder.iterdir()):
        if path.name.startswith(".") or path.suffix.lower() not in IMAGE_SUFFIXES:
            continue
        if path.is_file():
            groups.setdefault(path.stem, []).append(path)
    return groups


def _is_png(path: Path) -> bool:
    return path.suffix.lower() == MASK_SUFFIX


def _relative_name(path: Path, directory: Path) -> str:
    return path.relative_to(directory).as_posix()


def _read(path: Path, source: str) -> bytes:
    try:
        return path.read_bytes()
    except OSError as error:
        raise ShotError(f"cannot be read ({error.strerror or error})", source) from None
