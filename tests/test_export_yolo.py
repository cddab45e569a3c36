"""`format=yolo`: the archive read as Ultralytics' segmentation dataset format documents it
(data.yaml, images/<split>/, labels/<split>/ with a line per object, `class x1 y1 x2 y2 …`
normalized to [0, 1]), and its polygons rasterized back onto the masks: holes stay open, each
object is its own line, specks are left out."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest
from PIL import Image, ImageDraw

from aligndiff.instances import split_instances
from service.export.archive import ExportItem
from service.export.yolo import label_lines
from tests.api_support import Api
from tests.dataset_support import (
    MIN_AREA,
    DatasetClass,
    Line,
    Mask,
    disk,
    download,
    extract,
    metadata_of,
    read_yolo,
    ring,
)

pytest_plugins = ["tests.api_support", "tests.dataset_support"]


def rasterized(line: Line, size: tuple[int, int], *, how: str) -> Mask:
    """A label line's polygon filled at the image's size: with Pillow, or with OpenCV after
    truncating to pixels as Ultralytics' `polygon2mask` does."""
    width, height = size
    points = line.points * (width, height)
    if how == "pillow":
        image = Image.new("1", size)
        ImageDraw.Draw(image).polygon([tuple(p) for p in points], fill=1)
        return np.asarray(image)
    filled = np.zeros((height, width), np.uint8)
    cv2.fillPoly(filled, [points.astype(np.int32)], 1)
    return filled.astype(bool)


def iou(a: Mask, b: Mask) -> float:
    return float((a & b).sum() / (a | b).sum())


# --- the archive, read back ---------------------------------------------------------------


def test_yolo_reads_as_ultralytics_documents_it(
    api: Api, dataset_class: DatasetClass, tmp_path: Path
) -> None:
    # when
    folder = extract(download(api, dataset_class, "yolo"), tmp_path)
    dataset = read_yolo(folder / "data.yaml")

    # then: one class, numbered from 0 (YOLO has no background); no split: val is train
    assert dataset.names == {0: "dog"}
    assert dataset.config["train"] == "images/train" == dataset.config["val"]
    assert "path" not in dataset.config
    assert "no background class" in (folder / "data.yaml").read_text()
    # and: every shot and accepted sample, its image as stored, a line per object
    expected = dataset_class.exported()
    assert sorted(dataset.images) == sorted(item.name for item in expected)
    for item in expected:
        image = dataset.images[item.name]
        assert image.path.read_bytes() == item.image_png
        assert [line.cls for line in image.lines] == [0] * len(
            split_instances(item.mask, min_area=MIN_AREA)
        )
    assert metadata_of(folder, "yolo")["format"] == "yolo"


@pytest.mark.parametrize("how", ["pillow", "opencv"])
def test_polygons_fill_back_to_the_objects_holes_open_specks_left_out(
    api: Api, objects_class: DatasetClass, tmp_path: Path, how: str
) -> None:
    # when
    folder = extract(download(api, objects_class, "yolo"), tmp_path)
    dataset = read_yolo(folder / "data.yaml")

    # then: each object of each mask is one line whose polygon fills back to it
    expected_lines = {
        "shot_00": 2,  # two separate objects
        "sample_00000": 1,  # a ring
        "sample_00001": 2,
        "sample_00002": 1,  # a speck of 4 pixels is no object
        "sample_00003": 1,  # cut off by the image's edges
    }
    stored = {item.name: item.mask for item in objects_class.exported()}
    assert {name: len(image.lines) for name, image in dataset.images.items()} == expected_lines
    for name, image in dataset.images.items():
        objects = split_instances(stored[name], min_area=MIN_AREA)
        filled = [rasterized(line, image.size, how=how) for line in image.lines]
        for instance, mask in zip(objects, filled, strict=True):
            assert iou(mask, instance.mask) >= 0.9, name
        assert iou(np.logical_or.reduce(filled), stored[name]) >= 0.9, name
    # and: the ring's hole stays open, the speck stays out
    (ring_line,) = dataset.images["sample_00000"].lines
    hole = disk(30, 34, 6)  # well inside the hole (radius 8)
    assert not rasterized(ring_line, (64, 64), how=how)[hole].any()
    (speck_line,) = dataset.images["sample_00002"].lines
    assert not rasterized(speck_line, (64, 64), how=how)[56:58, 5:7].any()


def test_a_validation_split_has_its_own_folders_and_data_yaml_names_them(
    api: Api, objects_class: DatasetClass, tmp_path: Path
) -> None:
    # when
    folder = extract(download(api, objects_class, "yolo", val="shots"), tmp_path)
    dataset = read_yolo(folder / "data.yaml")

    # then
    assert dataset.config["val"] == "images/val"
    splits = {name: image.split for name, image in dataset.images.items()}
    assert splits == {"shot_00": "val"} | {f"sample_{i:05d}": "train" for i in range(4)}


def test_an_empty_validation_split_falls_back_to_train(
    api: Api, objects_class: DatasetClass, tmp_path: Path
) -> None:
    # given: a fraction so small that none of the 4 samples falls in it
    data = download(api, objects_class, "yolo", val="fraction:0.000001")

    # when
    folder = extract(data, tmp_path)
    dataset = read_yolo(folder / "data.yaml")

    # then: Ultralytics gets a val folder that exists
    assert not (folder / "images" / "val").exists()
    assert dataset.config["val"] == "images/train"
    assert len(dataset.images) == 5


# --- outlines alone -----------------------------------------------------------------------


def _label(mask: Mask) -> list[Line]:
    item = ExportItem("x", "synthetic", mask.shape[1], mask.shape[0], "image", "mask")
    text = label_lines(split_instances(mask, min_area=MIN_AREA), item, cls=0)
    return [
        Line(int(fields[0]), np.array(fields[1:], dtype=float).reshape(-1, 2))
        for fields in (line.split() for line in text.splitlines())
    ]


def test_a_thin_straight_object_is_still_a_polygon() -> None:
    # given: a line of pixels, whose border is one straight run
    mask = np.zeros((20, 40), bool)
    mask[7, 5:30] = True

    # when
    (line,) = _label(mask)

    # then: three points at least (Ultralytics reads a line of four numbers as a box), which
    # fill back to the line
    assert len(line.points) >= 3
    assert iou(rasterized(line, (40, 20), how="opencv"), mask) == 1.0


def test_specks_alone_make_an_empty_label_file() -> None:
    mask = np.zeros((32, 32), bool)
    mask[3:5, 3:5] = mask[20:23, 10:13] = True

    assert _label(mask) == []


def test_an_object_with_two_holes_fills_back_exactly() -> None:
    # given: a ring with a second hole, at a size whose coordinates are no short decimals
    mask = ring() & ~disk(12, 30, 3)
    (instance,) = split_instances(mask, min_area=MIN_AREA)

    # when
    (line,) = _label(mask)

    # then: both rasterizers give back every pixel
    for how in ("pillow", "opencv"):
        assert iou(rasterized(line, (64, 64), how=how), instance.mask) == 1.0
