"""COCO instance segmentation layout, as a zip.

    metadata.json
    annotations/instances.json        one category per class (id = its label index); one
                                      annotation per instance (connected object) of each
                                      image's mask, as compressed RLE (pycocotools), with
                                      its area and bbox
    images/<name>.png                 the images as stored (lossless)

With a `val` option the annotations are split in two files, `annotations/instances_train.json`
and `annotations/instances_val.json`, whose images all sit in `images/`.

Names are `shot_<position>` for the real shots and `sample_<index>` for the samples; image and
annotation ids count from 1 in that order within each annotation file. Objects smaller than the
source's `instance_min_area` are left out (an image may then have no annotation).
"""

from __future__ import annotations

import json
from collections.abc import Iterator

import numpy as np
from pycocotools import mask as mask_utils

from aligndiff import __version__
from aligndiff.instances import Instance
from service.export.archive import (
    FOREGROUND,
    ExportItem,
    ExportOptions,
    ExportSource,
    Files,
    ZipStream,
    write_metadata,
    zip_archive,
)
from service.export.splits import SPLITS, Split

INSTANCES = "annotations/instances.json"


def annotation_file(split: Split | None) -> str:
    """The annotation file of a split (None: the one file of an archive without splits)."""
    return INSTANCES if split is None else f"annotations/instances_{split}.json"


def write_coco(source: ExportSource, options: ExportOptions) -> Iterator[bytes]:
    """The archive's bytes, streamed."""

    def write(archive: ZipStream) -> Iterator[None]:
        yield from write_metadata(archive, source, format_name="coco", files=_files)
        for split in SPLITS if source.val.has_val else (None,):
            with archive.open(annotation_file(split), compress=True) as entry:
                for piece in instances_pieces(source, split):
                    entry.write(piece)
                    yield
        for item in source.items():
            archive.write(_files(0, item)["image"], source.read(item.image_key), compress=False)
            yield

    return zip_archive(source.created_at, write)


def instances_pieces(source: ExportSource, split: Split | None = None) -> Iterator[bytes]:
    """An annotation file, a record at a time: the images of `split` (None: all) from the
    records alone, then their annotations (each mask read, split into its instances and
    encoded in turn)."""
    names = source.label_names
    head = {
        "info": {
            "description": "AlignDiff dataset of "
            f"{', '.join(repr(c.name) for c in source.classes)}: real shots "
            "and synthetic samples",
            "version": __version__,
            "year": source.created_at.year,
            "date_created": source.created_at.isoformat(),
            "contributor": "AlignDiff",
        },
        "licenses": [],
        "categories": [
            {"id": label, "name": name, "supercategory": name}
            for label, name in enumerate(names, start=FOREGROUND)
        ],
    }

    def items() -> Iterator[ExportItem]:
        return source.items() if split is None else source.split_items(split)

    yield (json.dumps(head)[:-1] + ', "images": [').encode()
    for number, item in enumerate(items(), start=1):
        image = {
            "id": number,
            "file_name": f"{item.name}.png",
            "width": item.width,
            "height": item.height,
            "source": item.source,
        }
        yield (b"\n" if number == 1 else b",\n") + json.dumps(image).encode()
    yield b'], "annotations": ['
    annotation_id = 0
    for number, item in enumerate(items(), start=1):
        for instance in source.instances(item):
            annotation_id += 1
            record = annotation(annotation_id, number, item.label, instance)
            yield (b"\n" if annotation_id == 1 else b",\n") + json.dumps(record).encode()
    yield b"]}\n"


def annotation(
    number: int, image_id: int, category_id: int, instance: Instance
) -> dict[str, object]:
    """Annotation `number`: one instance of image `image_id`, its mask as compressed RLE."""
    rle = mask_utils.encode(np.asfortranarray(instance.mask.astype(np.uint8)))
    return {
        "id": number,
        "image_id": image_id,
        "category_id": category_id,
        "segmentation": {"size": [int(n) for n in rle["size"]], "counts": rle["counts"].decode()},
        "area": instance.area,
        "bbox": [float(v) for v in mask_utils.toBbox(rle)],
        "iscrowd": 0,
    }


def _files(_: int, item: ExportItem) -> Files:
    return {"image": f"images/{item.name}.png"}
