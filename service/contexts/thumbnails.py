"""Thumbnails of shots and samples with their mask overlaid, for the dashboard's gallery.

Each is drawn once, on its first request, and kept in storage under its class's own prefix
(`classes/<id>/thumbnails/…`), so deleting the class deletes them too. Only finished samples
have one. A finished sample's image never changes, and neither does the mask the pipeline made;
a reviewer may replace it, though, and the thumbnails of a reviewer's mask are named by its
blob (`mask_version`), as are their URLs on the gallery, so neither the store nor a browser's
cache can show a replaced mask.
"""

from __future__ import annotations

import hashlib
import logging
import re
import uuid
from dataclasses import dataclass
from io import BytesIO

import numpy as np
from PIL import Image, ImageFilter
from sqlalchemy import select
from sqlalchemy.orm import Session

from service.models import Sample, SegClass, Shot
from service.problems import not_found
from service.storage import BlobNotFound, Storage, class_key

log = logging.getLogger(__name__)

# The grid's tiles and the large view.
SIZES = (128, 512)
JPEG = "image/jpeg"
# The `mask_source` of a mask a reviewer drew.
HUMAN = "human"
OVERLAY_RGB = np.array([255, 40, 150], dtype=np.float32)
OVERLAY_ALPHA = 0.45
# Sample n's thumbnails: `sample-<n>-<size>.jpg`, or `sample-<n>-<size>-<mask version>.jpg`
# for a mask a reviewer drew.
_SAMPLE_THUMBNAIL = re.compile(r"thumbnails/sample-(\d+)-\d+(?:-[0-9a-f]+)?\.jpg")


@dataclass(frozen=True)
class Thumbnail:
    data: bytes
    etag: str


def sample_thumbnail(
    *, session: Session, storage: Storage, sample_id: uuid.UUID, size: int
) -> Thumbnail:
    """A finished sample's image with its mask overlaid, at most `size` px on its long side.
    404 for an unknown or unfinished sample."""
    sample = session.execute(
        select(Sample).where(Sample.id == sample_id, Sample.finalized_at.is_not(None))
    ).scalar_one_or_none()
    if sample is None or sample.mask_key is None:
        raise not_found("sample")
    key = sample_thumbnail_key(
        sample.class_id,
        sample.index,
        size,
        version=mask_version(sample.mask_key, sample.mask_source),
    )
    return _cached(session, storage, sample.class_id, key, sample.image_key, sample.mask_key, size)


def sample_thumbnail_key(class_id: uuid.UUID, index: int, size: int, *, version: str | None) -> str:
    """Where the thumbnail of `size` px of sample `index` is kept (named by the sample's index,
    as its blobs are, and by its mask's `version`)."""
    suffix = "" if version is None else f"-{version}"
    return class_key(class_id, f"{_sample_prefix(index)}{size}{suffix}.jpg")


def thumbnail_sample_index(class_id: uuid.UUID, key: str) -> int | None:
    """n for the key of a thumbnail of class `class_id`'s sample n, else None."""
    found = _SAMPLE_THUMBNAIL.fullmatch(key.removeprefix(class_key(class_id, "")))
    return int(found.group(1)) if found is not None else None


def mask_version(mask_key: str, mask_source: str | None) -> str | None:
    """What tells a sample's masks apart: None for the one the pipeline made (it never
    changes), else a short name of the mask's blob (a reviewer's replacements each have one)."""
    if mask_source != HUMAN:
        return None
    return hashlib.sha256(mask_key.encode()).hexdigest()[:12]


def forget_sample_thumbnails(
    storage: Storage, class_id: uuid.UUID, index: int, *, version: str | None
) -> None:
    """Delete the kept thumbnails of sample `index` drawn with the mask of `version` (once a
    reviewer replaced it). A failure is logged, never raised: no request names them again,
    and they go with the class."""
    keys = [sample_thumbnail_key(class_id, index, size, version=version) for size in SIZES]
    try:
        storage.delete_keys(keys)
    except Exception:
        log.exception(
            "could not delete the old thumbnails of sample %d of class %s", index, class_id
        )


def _sample_prefix(index: int) -> str:
    return f"thumbnails/sample-{index:05d}-"


def shot_thumbnail(
    *, session: Session, storage: Storage, shot_id: uuid.UUID, size: int
) -> Thumbnail:
    """A shot (as normalized at upload) with its mask overlaid. 404 for an unknown shot."""
    shot = session.get(Shot, shot_id)
    if shot is None:
        raise not_found("shot")
    key = class_key(shot.class_id, f"thumbnails/shot-{shot.position:02d}-{size}.jpg")
    return _cached(session, storage, shot.class_id, key, shot.image_key, shot.mask_key, size)


def _cached(
    session: Session,
    storage: Storage,
    class_id: uuid.UUID,
    key: str,
    image_key: str,
    mask_key: str,
    size: int,
) -> Thumbnail:
    if size not in SIZES:
        raise ValueError(f"thumbnail size must be one of {SIZES}, got {size}")
    try:
        data = storage.get(key)
    except BlobNotFound:
        data = overlay(storage.get(image_key), storage.get(mask_key), size)
        # NOTE: two first requests at once both draw it and write the same bytes: harmless.
        storage.put(key, data, content_type=JPEG)
        session.expire_all()
        if session.get(SegClass, class_id) is None:
            # The class was deleted while this was drawn: leave no blob behind it.
            storage.delete_prefix(class_key(class_id, "thumbnails/"))
    return Thumbnail(data=data, etag=f'"{hashlib.sha256(data).hexdigest()[:32]}"')


def overlay(image_png: bytes, mask_png: bytes, size: int) -> bytes:
    """A JPEG of the image, scaled to fit `size`, with the mask's foreground tinted and
    outlined. The mask is foreground where its gray value is >= 128 (stored masks are 0/255)."""
    with Image.open(BytesIO(image_png)) as opened:
        image = opened.convert("RGB")
    with Image.open(BytesIO(mask_png)) as opened:
        mask = opened.convert("L").resize(image.size, Image.Resampling.NEAREST)
    image.thumbnail((size, size), Image.Resampling.LANCZOS)
    mask = mask.resize(image.size, Image.Resampling.NEAREST).point(lambda v: 255 if v >= 128 else 0)
    outline = np.asarray(mask.filter(ImageFilter.MaxFilter(3))) != np.asarray(
        mask.filter(ImageFilter.MinFilter(3))
    )
    pixels = np.asarray(image, dtype=np.float32)
    foreground = np.asarray(mask) > 0
    pixels[foreground] = pixels[foreground] * (1 - OVERLAY_ALPHA) + OVERLAY_RGB * OVERLAY_ALPHA
    pixels[outline] = OVERLAY_RGB
    buffer = BytesIO()
    Image.fromarray(pixels.clip(0, 255).astype(np.uint8)).save(buffer, "JPEG", quality=85)
    return buffer.getvalue()
