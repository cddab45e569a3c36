"""Dataset exports: each format read back by the tools its users read it with, the real shots
and the samples in it as stored, one COCO annotation per object, the train and validation
splits, the metadata, and the memory a large export takes. (YOLO: `test_export_yolo.py`;
several classes: `test_datasets_multi.py`.)"""

from __future__ import annotations

import io
import json
import shutil
import subprocess
import tarfile
import zipfile
from datetime import UTC, datetime
from io import BytesIO
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from aligndiff import __version__
from service.export import (
    FORMATS,
    ExportClass,
    ExportItem,
    ExportOptions,
    ExportSource,
    archive,
    write_archive,
)
from service.export.voc import labelmap
from tests.api_support import Api, ApiFactory, encode
from tests.dataset_support import (
    CLASS_SEED,
    MODEL_IDS,
    PROMPTS,
    WEBDATASET_METADATA,
    DatasetClass,
    MemoryStorage,
    disk,
    download,
    export_peak,
    extract,
    labels_of,
    many_samples,
    metadata_of,
    random_sample,
)

pytest_plugins = ["tests.api_support", "tests.dataset_support"]

# --- the formats, read back ---------------------------------------------------------------


def test_voc_holds_jpegs_palette_masks_and_the_image_set(
    api: Api, dataset_class: DatasetClass
) -> None:
    # when
    data = download(api, dataset_class, "voc")

    # then: every shot and accepted sample, as a JPEG and a palette mask of labels {0, 1}
    expected = dataset_class.exported()
    with zipfile.ZipFile(io.BytesIO(data)) as opened:
        for item in expected:
            jpeg = Image.open(BytesIO(opened.read(f"JPEGImages/{item.name}.jpg")))
            assert jpeg.format == "JPEG" and jpeg.size == item.pixels.shape[1::-1]
            assert _close(np.asarray(jpeg), item.pixels)
            mask = Image.open(BytesIO(opened.read(f"SegmentationClass/{item.name}.png")))
            assert mask.mode == "P"
            assert mask.getpalette()[:6] == [0, 0, 0, 128, 0, 0]  # type: ignore[index]
            assert set(np.unique(np.asarray(mask))) <= {0, 1}
            assert np.array_equal(np.asarray(mask) == 1, item.mask)
        train = opened.read("ImageSets/Segmentation/train.txt").decode()
        labelmap = opened.read("labelmap.txt").decode().splitlines()

    assert train.splitlines() == [item.name for item in expected]
    assert labelmap[1:] == ["background:0,0,0::", "dog:128,0,0::"]


def test_coco_annotations_decode_to_the_stored_masks(
    api: Api, dataset_class: DatasetClass, tmp_path: Path
) -> None:
    from pycocotools.coco import COCO

    # when
    folder = extract(download(api, dataset_class, "coco"), tmp_path)
    coco = COCO(str(folder / "annotations" / "instances.json"))

    # then: one category, and per image one annotation whose mask is the stored one
    assert coco.loadCats(coco.getCatIds()) == [{"id": 1, "name": "dog", "supercategory": "dog"}]
    expected = dataset_class.exported()
    images = coco.loadImgs(sorted(coco.getImgIds()))
    assert [image["file_name"] for image in images] == [f"{i.name}.png" for i in expected]
    for image, item in zip(images, expected, strict=True):
        (annotation,) = coco.loadAnns(coco.getAnnIds(imgIds=image["id"]))
        assert annotation["iscrowd"] == 0 and annotation["category_id"] == 1
        assert annotation["area"] == item.mask.sum()
        assert np.array_equal(coco.annToMask(annotation).astype(bool), item.mask)
        assert (folder / "images" / image["file_name"]).read_bytes() == item.image_png
    assert [image["source"] for image in images] == ["shot", "shot"] + ["synthetic"] * 4


def test_coco_has_one_annotation_per_object_the_shots_included(
    api: Api, objects_class: DatasetClass, tmp_path: Path
) -> None:
    from pycocotools.coco import COCO

    # when
    folder = extract(download(api, objects_class, "coco"), tmp_path)
    coco = COCO(str(folder / "annotations" / "instances.json"))
    metadata = metadata_of(folder, "coco")

    # then: per image, an annotation per object of its mask (a 4-pixel speck is none), each
    # decoding to one connected object, together the mask but for the speck
    images = coco.loadImgs(sorted(coco.getImgIds()))
    expected = {
        "shot_00": 2,  # two separate objects in the uploaded mask
        "sample_00000": 1,  # a ring: one object with a hole
        "sample_00001": 2,
        "sample_00002": 1,  # one object and a speck
        "sample_00003": 1,  # cut off by the image's edges
    }
    assert [image["file_name"] for image in images] == [f"{name}.png" for name in expected]
    stored = {item.name: item.mask for item in objects_class.exported()}
    stored["sample_00002"] = disk(30, 30, 12)  # without the speck
    for image in images:
        name = image["file_name"].removesuffix(".png")
        annotations = coco.loadAnns(coco.getAnnIds(imgIds=image["id"]))
        assert len(annotations) == expected[name], name
        masks = [coco.annToMask(a).astype(bool) for a in annotations]
        for annotation, mask in zip(annotations, masks, strict=True):
            assert annotation["iscrowd"] == 0 and annotation["category_id"] == 1
            assert annotation["area"] == mask.sum()
            rows, columns = np.nonzero(mask)
            x, y = columns.min(), rows.min()
            width, height = columns.max() - x + 1, rows.max() - y + 1
            assert annotation["bbox"] == [x, y, width, height]
        assert np.array_equal(np.logical_or.reduce(masks), stored[name]), name
        assert sum(m.sum() for m in masks) == stored[name].sum()  # no pixel in two
    # and: the metadata counts the same objects
    records = metadata["shots"] + metadata["samples"]
    assert {r["name"]: r["instances"] for r in records} == expected
    ids = [a["id"] for a in coco.dataset["annotations"]]
    assert ids == list(range(1, sum(expected.values()) + 1))


def test_coco_annotations_score_ap_1_against_themselves(
    api: Api, objects_class: DatasetClass, tmp_path: Path
) -> None:
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    # given: the export's annotations, and the same objects as detections of score 1
    folder = extract(download(api, objects_class, "coco"), tmp_path)
    truth = COCO(str(folder / "annotations" / "instances.json"))
    detections = truth.loadRes(
        [
            {
                "image_id": a["image_id"],
                "category_id": a["category_id"],
                "segmentation": a["segmentation"],
                "score": 1.0,
            }
            for a in truth.dataset["annotations"]
        ]
    )

    # when: COCO's own mask evaluation runs
    evaluation = COCOeval(truth, detections, "segm")
    evaluation.evaluate()
    evaluation.accumulate()
    evaluation.summarize()

    # then: every object is found, exactly (AP and AR over IoU .50:.95)
    assert evaluation.stats[0] == 1.0
    assert evaluation.stats[8] == 1.0


def test_the_voc_label_map_tells_apart_names_that_its_format_would_merge() -> None:
    # ':' separates a label map line's fields, so "a:b" is written "a_b", as another class is
    lines = labelmap(["a:b", "a_b", "dog  house"]).splitlines()

    assert [line.split(":")[0] for line in lines[2:]] == ["a_b-1", "a_b-2", "dog house"]


def test_hf_loads_with_datasets_as_image_columns(
    api: Api, dataset_class: DatasetClass, tmp_path: Path
) -> None:
    import datasets as hf

    # when: the extracted folder is loaded as a dataset
    folder = extract(download(api, dataset_class, "hf"), tmp_path / "dataset")
    loaded = hf.load_dataset(str(folder), split="train", cache_dir=str(tmp_path / "cache"))

    # then: images and annotations decode to the stored ones, with the records beside
    assert isinstance(loaded.features["image"], hf.Image)
    assert isinstance(loaded.features["annotation"], hf.Image)
    expected = dataset_class.exported()
    assert loaded["name"] == [item.name for item in expected]
    for row, item in zip(loaded, expected, strict=True):
        assert np.array_equal(np.asarray(row["image"].convert("RGB")), item.pixels)
        assert np.array_equal(np.asarray(row["annotation"]) == 1, item.mask)
    assert loaded["source"] == ["shot", "shot"] + ["synthetic"] * 4
    assert loaded["index"] == [None, None, 0, 1, 3, 4]
    assert loaded["accepted"] == [None, None, True, True, True, True]
    assert set(loaded[2]["scores"]) == {"clip_score", "shot_similarity", "consensus_iou", "ood_iou"}
    assert {"prompt", "prompt_kind", "seed", "mask_source"} <= set(loaded.column_names)
    assert loaded["label"] == [1] * 6 and loaded["split"] == ["train"] * 6
    assert loaded["accepted_by"] == [None, None] + ["filter"] * 4
    assert loaded["instances"] == [1] * 6
    assert json.loads((folder / "id2label.json").read_text()) == {"0": "background", "1": "dog"}


def test_hf_with_an_empty_validation_split_still_loads_with_datasets(
    api: Api, dataset_class: DatasetClass, tmp_path: Path
) -> None:
    import datasets as hf

    # given: a fraction so small that none of the 4 samples falls in validation
    data = download(api, dataset_class, "hf", val="fraction:0.000001")

    # when: the extracted folder is loaded as a dataset, every split
    folder = extract(data, tmp_path / "dataset")
    loaded = hf.load_dataset(str(folder), cache_dir=str(tmp_path / "cache"))

    # then: one train split of everything, and no empty validation file to trip on
    assert list(loaded) == ["train"] and loaded["train"].num_rows == 6
    assert sorted(path.name for path in (folder / "data").iterdir()) == [
        "train-00000-of-00001.parquet"
    ]


def test_hf_parquet_carries_the_datasets_features(api: Api, dataset_class: DatasetClass) -> None:
    import datasets as hf
    import pyarrow.parquet as pq

    with zipfile.ZipFile(io.BytesIO(download(api, dataset_class, "hf"))) as opened:
        (name,) = [n for n in opened.namelist() if n.endswith(".parquet")]
        schema = pq.read_schema(BytesIO(opened.read(name)))

    assert name == "data/train-00000-of-00001.parquet"
    assert hf.Features.from_arrow_schema(schema)["image"] == hf.Image()


# NOTE: the contract's call, `WebDataset(path)`, on purpose: webdataset warns that it was not told
# whether to shuffle shards (one file: nothing to shuffle).
@pytest.mark.filterwarnings("ignore:WebDataset\\(shardshuffle")
def test_webdataset_is_one_tar_that_webdataset_reads_record_by_record(
    api: Api, dataset_class: DatasetClass, tmp_path: Path
) -> None:
    import webdataset as wds

    # when: the download is read as it is, with no extraction
    path = tmp_path / "dog.tar"
    path.write_bytes(download(api, dataset_class, "webdataset"))
    records = list(wds.WebDataset(str(path)))

    # then: one record per shot and accepted sample, in order, each its image, mask and record
    expected = dataset_class.exported()
    assert [r["__key__"] for r in records] == [item.name for item in expected]
    for record, item in zip(records, expected, strict=True):
        assert {k for k in record if not k.startswith("__")} == {"jpg", "mask.png", "json"}
        assert _close(np.asarray(Image.open(BytesIO(record["jpg"]))), item.pixels)
        mask = Image.open(BytesIO(record["mask.png"]))
        assert mask.mode == "P" and set(np.unique(np.asarray(mask))) <= {0, 1}
        assert np.array_equal(labels_of(record["mask.png"]) == 1, item.mask)
        assert json.loads(record["json"])["name"] == item.name
    # and: the tar holds nothing else but the metadata, where WebDataset does not look
    with tarfile.open(path) as opened:
        names = opened.getnames()
    assert names[0] == WEBDATASET_METADATA
    assert len(names) == 1 + 3 * len(expected)


# --- what is in every archive -------------------------------------------------------------


@pytest.mark.parametrize("export_format", FORMATS)
def test_metadata_records_the_class_the_shots_and_the_samples(
    api: Api, dataset_class: DatasetClass, export_format: str, tmp_path: Path
) -> None:
    # when
    folder = extract(download(api, dataset_class, export_format), tmp_path)
    metadata = metadata_of(folder, export_format)

    # then: enough to trace and regenerate the dataset
    assert metadata["format"] == export_format
    assert metadata["service"] == {"name": "aligndiff", "version": __version__}
    assert metadata["class"]["id"] == str(dataset_class.id)
    assert metadata["class"]["name"] == "dog" and metadata["class"]["token"] == "<dog>"
    assert metadata["class"]["seed"] == CLASS_SEED and metadata["class"]["prompts"] == PROMPTS
    assert metadata["models"] == MODEL_IDS
    assert metadata["labels"] == {"0": "background", "1": "dog"}
    shots = metadata["shots"]
    assert [(s["source"], s["filename"], s["position"]) for s in shots] == [
        ("shot", "dog.jpg", 0),
        ("shot", "albatross.jpg", 1),
    ]
    sample = metadata["samples"][0]
    assert sample["source"] == "synthetic" and sample["name"] == "sample_00000"
    assert sample["index"] == 0 and sample["seed"] == 1000 and sample["accepted"] is True
    assert sample["prompt"] == "a photo of a dog" and sample["prompt_kind"] == "inversion"
    assert sample["mask_source"] == "consensus" and sample["scores"]["clip_score"] == 30.0
    assert sample["accepted_by"] == "filter" and sample["instances"] == 1
    assert sample["split"] == "train" and sample["label"] == 1 and sample["id"]
    assert [s["instances"] for s in shots] == [1, 1]  # counted from the shots' masks
    assert metadata["val"] == "none" and metadata["instance_min_area"] == 16
    (seg_class,) = metadata["classes"]
    assert seg_class["label"] == 1 and seg_class["id"] == str(dataset_class.id)
    # and: the files each record names are in the archive
    for record in shots + metadata["samples"]:
        for role, name in record["files"].items():
            if export_format == "hf" and role != "data":
                continue  # a row of a Parquet file
            assert (folder / name).is_file(), name


@pytest.mark.parametrize("export_format", FORMATS)
def test_accepted_only_by_default_and_every_sample_on_request(
    api: Api, dataset_class: DatasetClass, export_format: str, tmp_path: Path
) -> None:
    def sample_indices(**params: Any) -> list[int]:
        data = download(api, dataset_class, export_format, **params)
        folder = extract(data, tmp_path / str(params))
        metadata = metadata_of(folder, export_format)
        assert [s["name"] for s in metadata["shots"]] == ["shot_00", "shot_01"]
        return [sample["index"] for sample in metadata["samples"]]

    assert sample_indices() == [0, 1, 3, 4]
    assert sample_indices(accepted_only="false") == [0, 1, 2, 3, 4, 5]


@pytest.mark.parametrize("export_format", FORMATS)
def test_an_archive_is_the_same_bytes_every_time(
    api: Api, dataset_class: DatasetClass, export_format: str
) -> None:
    assert download(api, dataset_class, export_format) == download(
        api, dataset_class, export_format
    )


def test_zip_archives_pass_the_unzip_integrity_check(
    api: Api, dataset_class: DatasetClass, tmp_path: Path
) -> None:
    if shutil.which("unzip") is None:
        pytest.skip("no unzip here")
    for export_format in ("voc", "coco", "hf", "yolo"):
        path = tmp_path / f"{export_format}.zip"
        path.write_bytes(download(api, dataset_class, export_format))
        result = subprocess.run(["unzip", "-tq", str(path)], capture_output=True, text=True)
        assert result.returncode == 0, result.stdout + result.stderr


# --- train and validation splits ----------------------------------------------------------


@pytest.mark.parametrize("val", ["none", "shots", "fraction:0.5"])
@pytest.mark.parametrize("export_format", FORMATS)
def test_each_format_lays_its_splits_out_its_own_way(
    api: Api, dataset_class: DatasetClass, export_format: str, val: str, tmp_path: Path
) -> None:
    # when
    data = download(api, dataset_class, export_format, val=val, accepted_only="false")
    folder = extract(data, tmp_path / "archive")

    # then: the metadata gives each record the split the option puts it in
    metadata = metadata_of(folder, export_format)
    assert metadata["val"] == val
    shots, samples = metadata["shots"], metadata["samples"]
    assert {s["split"] for s in shots} == {"val" if val == "shots" else "train"}
    if val != "fraction:0.5":
        assert {s["split"] for s in samples} == {"train"}
    # and: the format's own split layout holds the same items
    records = shots + samples
    expected = {
        split: [r["name"] for r in records if r["split"] == split]
        for split in ("train", "val")
        if split == "train" or val != "none"
    }
    assert _split_names(folder, export_format, tmp_path) == expected


def _split_names(folder: Path, export_format: str, tmp_path: Path) -> dict[str, list[str]]:
    """The names of each split, as the format's readers see them."""
    if export_format == "voc":
        sets = folder / "ImageSets" / "Segmentation"
        return {p.stem: p.read_text().split() for p in sorted(sets.glob("*.txt"))}
    if export_format == "coco":
        files = sorted((folder / "annotations").glob("instances*.json"))
        return {
            "train" if p.stem == "instances" else p.stem.removeprefix("instances_"): [
                image["file_name"].removesuffix(".png")
                for image in json.loads(p.read_text())["images"]
            ]
            for p in files
        }
    if export_format == "hf":
        import datasets as hf

        loaded = hf.load_dataset(
            "parquet", data_dir=str(folder / "data"), cache_dir=str(tmp_path / "cache")
        )
        names = {"train": "train", "validation": "val"}
        return {names[split]: loaded[split]["name"] for split in loaded}
    metadata = metadata_of(folder, export_format)
    order = [r["name"] for r in metadata["shots"] + metadata["samples"]]
    result: dict[str, list[str]] = {"train": []}
    if metadata["val"] != "none":
        result["val"] = []
    if export_format == "webdataset":
        for name in order:  # each record's own JSON, as WebDataset hands it over
            record = json.loads((folder / f"{name}.json").read_text())
            result[record["split"]].append(name)
        return result
    assert export_format == "yolo"
    for split in result:
        stems = [p.stem for p in (folder / "images" / split).glob("*.png")]
        labels = [p.stem for p in (folder / "labels" / split).glob("*.txt")]
        assert sorted(stems) == sorted(labels)
        result[split] = sorted(stems, key=order.index)
    return result


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_a_fraction_of_samples_by_id_is_validation_the_same_each_time(
    make_api: ApiFactory,
) -> None:
    # given: a class of 200 samples
    api = make_api()
    class_id = many_samples(api, 200)
    url = f"/v1/classes/{class_id}/dataset"

    def validation(fraction: str) -> set[str]:
        response = api.alice.get(url, params={"format": "coco", "val": f"fraction:{fraction}"})
        assert response.status_code == 200, response.text
        with zipfile.ZipFile(io.BytesIO(response.content)) as opened:
            names = json.loads(opened.read("annotations/instances_val.json"))["images"]
            metadata = json.loads(opened.read("metadata.json"))
        assert {s["split"] for s in metadata["shots"]} <= {"train"}
        by_name = {s["name"]: s["id"] for s in metadata["samples"]}
        return {by_name[image["file_name"].removesuffix(".png")] for image in names}

    # when
    fifth, half = validation("0.2"), validation("0.5")

    # then: about that share of the samples, the same ones on every download, and a larger
    # fraction only adds to them
    assert 10 <= len(fifth) <= 70 and 60 <= len(half) <= 140
    assert validation("0.2") == fifth
    assert fifth < half


# --- the writers alone --------------------------------------------------------------------


def test_zip64_fields_are_written_when_offsets_and_sizes_need_them(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # given: a ZIP64 threshold low enough for small entries to pass it, and a central
    # directory spooled to disk from its first record
    monkeypatch.setattr(archive, "ZIP64_LIMIT", 100)
    monkeypatch.setattr(archive, "DIRECTORY_SPOOL_BYTES", 10)
    payload = bytes(range(256)) * 4

    def write(zip_stream: archive.ZipStream) -> Any:
        for number in range(3):
            with zip_stream.open(f"f{number}.bin", compress=False, large=True) as entry:
                entry.write(payload)
            yield

    # when
    data = b"".join(archive.zip_archive(datetime(2026, 1, 2, tzinfo=UTC), write))

    # then: Python's zipfile reads every entry back
    with zipfile.ZipFile(io.BytesIO(data)) as opened:
        assert [info.header_offset > 100 for info in opened.infolist()] == [False, True, True]
        assert all(opened.read(f"f{n}.bin") == payload for n in range(3))
        assert opened.testzip() is None


def test_hf_rows_are_split_across_parquet_files_in_small_row_groups() -> None:
    import pyarrow.parquet as pq

    # given: 1 shot and 4 samples, 2 rows a file, 1 a row group
    options = ExportOptions(parquet_rows_per_file=2, parquet_rows_per_group=1)

    # when
    data = b"".join(write_archive("hf", _memory_source(num_samples=4), options))

    # then
    with zipfile.ZipFile(io.BytesIO(data)) as opened:
        names = [n for n in opened.namelist() if n.endswith(".parquet")]
        files = [pq.ParquetFile(BytesIO(opened.read(name))) for name in names]
    assert names == [f"data/train-0000{n}-of-00003.parquet" for n in range(3)]
    assert [f.metadata.num_rows for f in files] == [2, 2, 1]
    assert [f.metadata.num_row_groups for f in files] == [2, 2, 1]


def test_empty_sample_list_still_exports_the_shots() -> None:
    source = _memory_source(num_samples=0)

    for export_format in FORMATS:
        data = b"".join(write_archive(export_format, source))
        if export_format == "webdataset":
            with tarfile.open(fileobj=io.BytesIO(data)) as opened:
                metadata = json.load(opened.extractfile(WEBDATASET_METADATA))  # type: ignore[arg-type]
        else:
            with zipfile.ZipFile(io.BytesIO(data)) as opened:
                metadata = json.loads(opened.read("metadata.json"))
        assert [s["name"] for s in metadata["shots"]] == ["shot_00"]
        assert metadata["samples"] == []


# --- memory -------------------------------------------------------------------------------


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
@pytest.mark.parametrize("export_format", FORMATS)
def test_memory_does_not_grow_with_the_number_of_samples(
    make_api: ApiFactory, export_format: str
) -> None:
    # given: classes of 200 and 2,000 tiny samples
    # NOTE: blobs in memory: a local store's path handling churns the interpreter's table of
    # interned strings, whose occasional rebuild (megabytes, for a moment) would be measured.
    api = make_api(storage=MemoryStorage())
    small, large = many_samples(api, 200), many_samples(api, 2000)

    # when: each archive is streamed through (after an untraced pass to warm caches)
    small_peak = export_peak(api, [small], export_format)
    large_peak = export_peak(api, [large], export_format)

    # then: ten times the samples take nowhere near ten times the memory
    assert large_peak < 3 * small_peak, (small_peak, large_peak)


# --- helpers ------------------------------------------------------------------------------


def _close(a: np.ndarray, b: np.ndarray) -> bool:
    """JPEG at quality 95: close to the original, not equal (mean error in gray levels)."""
    return a.shape == b.shape and float(np.abs(a.astype(int) - b.astype(int)).mean()) < 12


def _memory_source(*, num_samples: int) -> ExportSource:
    image, mask = random_sample(np.random.default_rng(1))
    blobs = {"image": encode(image), "mask": encode(mask)}
    shot = ExportItem("shot_00", "shot", 32, 32, "image", "mask", position=0, filename="a.png")
    samples = [
        ExportItem(f"sample_{i:05d}", "synthetic", 32, 32, "image", "mask", index=i)
        for i in range(num_samples)
    ]
    seg_class = ExportClass(
        id="c", name="dog", token=None, seed=1, prompts=[], model_ids={},
        created_at=datetime(2026, 1, 2, tzinfo=UTC),
    )  # fmt: skip
    return ExportSource(
        classes=(seg_class,),
        accepted_only=True,
        num_shots=1,
        num_samples=num_samples,
        items=lambda: iter([shot, *samples]),
        read=blobs.__getitem__,
    )
