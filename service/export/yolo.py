"""Ultralytics YOLO segmentation layout, as a zip.

    metadata.json
    data.yaml                   train: images/train, val: images/val (images/train when no
                                item is in validation), names: {0: <first class>, …}
    images/train/<name>.png     the images as stored (lossless)
    labels/train/<name>.txt     one line per instance: `class x1 y1 x2 y2 …`
    images/val/…, labels/val/…  the validation split (with a `val` option)

Labels follow Ultralytics' segmentation format: a class index (from 0: YOLO has no background
class, so class i is label i + 1 of `metadata.json`), then the instance's outline as x y pairs
normalized by the image's width and height. Instances are the mask's connected objects of at
least the source's `instance_min_area` pixels (smaller specks are left out); an image without
one has an empty label file (a background image, to Ultralytics).

Outlines are `cv2.findContours`' borders (the centres of the object's edge pixels, as
Ultralytics' own mask converter traces them), with every vertex kept that is not on a straight
run (no further simplification, which would cost IoU). A hole is bridged into the outer
outline, as Ultralytics' `merge_multi_segment` joins segments: the outline walks to the hole's
nearest vertex, around the hole and back the same way, so the one polygon fills with the hole
left open (by any fill rule: the hole runs the other way round, and the bridge is walked twice).

NOTE: coordinates are rounded up, never down, at the sixth decimal: a reader that truncates
scaled coordinates to pixels (Ultralytics' `polygon2mask` casts them to int32) lands on the
pixel the outline passes through, not the one before it.
"""

from __future__ import annotations

import json
from collections.abc import Iterator

import cv2
import numpy as np
import numpy.typing as npt

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

DATA_YAML = "data.yaml"
Points = npt.NDArray[np.int64]  # (n, 2): x, y pixel coordinates
DECIMALS = 6
# Vertex pairs compared at once when looking for a hole's bridge (bounds the memory it takes).
_PAIRS = 1 << 16


def write_yolo(source: ExportSource, options: ExportOptions) -> Iterator[bytes]:
    """The archive's bytes, streamed."""
    has_val = source.val.has_val and source.split_counts()["val"] > 0

    def write(archive: ZipStream) -> Iterator[None]:
        yield from write_metadata(archive, source, format_name="yolo", files=_files)
        archive.write(DATA_YAML, data_yaml(source, has_val=has_val).encode(), compress=True)
        for item in source.items():
            files = _files(0, item)
            archive.write(files["image"], source.read(item.image_key), compress=False)
            labels = label_lines(source.instances(item), item, cls=item.label - FOREGROUND)
            archive.write(files["label"], labels.encode(), compress=True)
            yield

    return zip_archive(source.created_at, write)


def data_yaml(source: ExportSource, *, has_val: bool) -> str:
    """The dataset's YAML, as Ultralytics' `data=` reads it."""
    names = "".join(
        f"  {cls}: {json.dumps(name, ensure_ascii=False)}\n"
        for cls, name in enumerate(source.label_names)
    )
    return (
        "# AlignDiff dataset in Ultralytics YOLO segmentation format (labels/: a line per\n"
        "# instance, `class x1 y1 x2 y2 ...`, normalized).\n"
        "# No `path:`: Ultralytics then resolves train and val against this file's folder\n"
        "# (a relative `path` would be taken from the working directory).\n"
        "train: images/train\n"
        f"val: images/{'val' if has_val else 'train'}\n"
        "# Classes from 0. YOLO has no background class: class i is label i + 1 of\n"
        "# metadata.json, whose label 0 is the background.\n"
        f"nc: {len(source.classes)}\n"
        f"names:\n{names}"
    )


def label_lines(instances: list[Instance], item: ExportItem, *, cls: int) -> str:
    """An image's label file: a line per instance, its class and normalized outline."""
    lines = []
    for instance in instances:
        points = outline(instance)
        xs = _normalized(points[:, 0], item.width)
        ys = _normalized(points[:, 1], item.height)
        coordinates = " ".join(f"{x} {y}" for x, y in zip(xs, ys, strict=True))
        lines.append(f"{cls} {coordinates}\n")
    return "".join(lines)


def outline(instance: Instance) -> Points:
    """One object's outline as one polygon of at least 3 vertices (pixel coordinates), its
    holes bridged in."""
    x, y, width, height = instance.bbox
    # NOTE: traced in the object's box with a 1-pixel empty border: far less work than the
    # whole image, and no edge case for objects that touch the image's edge.
    crop = np.pad(instance.mask[y : y + height, x : x + width], 1).astype(np.uint8)
    offset = (x - 1, y - 1)
    contours, hierarchy = cv2.findContours(
        crop, cv2.RETR_CCOMP, cv2.CHAIN_APPROX_SIMPLE, offset=offset
    )
    # One 8-connected object has one outer border (no parent); its holes are its children.
    parents = hierarchy[0][:, 3]
    borders = [c.reshape(-1, 2).astype(np.int64) for c in contours]
    outers = [border for border, parent in zip(borders, parents, strict=True) if parent < 0]
    holes = [border for border, parent in zip(borders, parents, strict=True) if parent >= 0]
    polygon = outers[0]
    if len(polygon) < 3:
        # A thin straight object: its border is one straight run, two vertices; every border
        # pixel keeps it a polygon (Ultralytics reads a line of 4 numbers as a box).
        full, _ = cv2.findContours(crop, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE, offset=offset)
        polygon = np.resize(full[0].reshape(-1, 2).astype(np.int64), (max(3, len(full[0])), 2))
    # (More outer borders than one would be a tracing quirk: bridged in too, nothing lost.)
    for border in outers[1:] + holes:
        polygon = _bridge(polygon, border)
    return polygon


def _bridge(polygon: Points, hole: Points) -> Points:
    """`polygon` with `hole` walked into it from their nearest pair of vertices and back."""
    best, at_polygon, at_hole = None, 0, 0
    rows = max(1, _PAIRS // len(hole))
    for start in range(0, len(polygon), rows):
        block = polygon[start : start + rows]
        distances = ((block[:, None, :] - hole[None, :, :]) ** 2).sum(-1)
        nearest = int(np.argmin(distances))
        i, j = divmod(nearest, len(hole))
        if best is None or distances[i, j] < best:
            best, at_polygon, at_hole = distances[i, j], start + i, j
    around = np.roll(hole, -at_hole, axis=0)
    return np.concatenate(
        [polygon[: at_polygon + 1], around, around[:1], polygon[at_polygon:]], axis=0
    )


def _normalized(values: Points, size: int) -> list[str]:
    """Pixel coordinates divided by `size`, as decimals rounded up at the sixth place (up by
    one more step where exact, so that scaling back in floating point never falls short)."""
    scale = 10**DECIMALS
    scaled = values * scale
    steps = -(-scaled // size) + (scaled % size == 0)
    return [f"{int(v) // scale}.{int(v) % scale:0{DECIMALS}d}" for v in steps]


def _files(_: int, item: ExportItem) -> Files:
    return {
        "image": f"images/{item.split}/{item.name}.png",
        "label": f"labels/{item.split}/{item.name}.txt",
    }
