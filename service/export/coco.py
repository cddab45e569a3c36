"""COCO instance segmentation layout, as a zip.

    metadata.json
    annotations/instances.json   one category (id 1, the class); one annotation per image,
                                 its mask as compressed RLE (pycocotools), with area and bbox
    images/<name>.png            the images as stored (lossless)

Names are `shot_<position>` for the real shots and `sample_<index>` for the samples; image and
annotation ids count from 1 in that order.
"""

from __future__ import annotations

import json
from collections.abc import Iterator

import numpy as np
from pycocotools import mask as mask_utils

from aligndiff import __version__
from service.export.archive import (
    FOREGROUND,
    ExportItem,
    ExportOptions,
    ExportSource,
    Files,
    ZipStream,
    mask_labels,
    write_metadata,
    zip_archive,
)

INSTANCES = "annotations/instances.json"


def write_coco(source: ExportSource, options: ExportOptions) -> Iterator[bytes]:
    """The archive's bytes, streamed."""

    def write(archive: ZipStream) -> Iterator[None]:
        yield from write_metadata(archive, source, format_name="coco", files=_files)
        with archive.open(INSTANCES, compress=True) as entry:
            for piece in instances_pieces(source):
                entry.write(piece)
                yield
        for item in source.items():
            archive.write(_files(0, item)["image"], source.read(item.image_key), compress=False)
            yield

    return zip_archive(source.seg_class.created_at, write)


def instances_pieces(source: ExportSource) -> Iterator[bytes]:
    """`instances.json`, a record at a time: the images (from the records alone), then the
    annotations (each mask read and encoded in turn)."""
    seg_class = source.seg_class
    head = {
        "info": {
            "description": f"AlignDiff dataset of {seg_class.name!r}: real shots and "
            "synthetic samples",
            "version": __version__,
            "year": seg_class.created_at.year,
            "date_created": seg_class.created_at.isoformat(),
            "contributor": "AlignDiff",
        },
        "licenses": [],
        "categories": [{"id": FOREGROUND, "name": seg_class.name, "supercategory": seg_class.name}],
    }
    yield (json.dumps(head)[:-1] + ', "images": [').encode()
    for number, item in enumerate(source.items(), start=1):
        image = {
            "id": number,
            "file_name": f"{item.name}.png",
            "width": item.width,
            "height": item.height,
            "source": item.source,
        }
        yield (b"\n" if number == 1 else b",\n") + json.dumps(image).encode()
    yield b'], "annotations": ['
    for number, item in enumerate(source.items(), start=1):
        yield (b"\n" if number == 1 else b",\n") + json.dumps(
            annotation(number, source.read(item.mask_key))
        ).encode()
    yield b"]}\n"


def annotation(number: int, mask_png: bytes) -> dict[str, object]:
    """Image `number`'s annotation: its whole foreground as one RLE-encoded instance."""
    rle = mask_utils.encode(np.asfortranarray(mask_labels(mask_png)))
    return {
        "id": number,
        "image_id": number,
        "category_id": FOREGROUND,
        "segmentation": {"size": [int(n) for n in rle["size"]], "counts": rle["counts"].decode()},
        "area": int(mask_utils.area(rle)),
        "bbox": [float(v) for v in mask_utils.toBbox(rle)],
        "iscrowd": 0,
    }


def _files(_: int, item: ExportItem) -> Files:
    return {"image": f"images/{item.name}.png"}
