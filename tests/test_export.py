"""Dataset exports: each format read back by the tools its users read it with, the real shots
and the samples in it as stored, its metadata, and the memory a large export takes."""

from __future__ import annotations

import io
import json
import shutil
import subprocess
import tarfile
import tracemalloc
import zipfile
from datetime import UTC, datetime
from io import BytesIO
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image
from sqlalchemy import insert

from aligndiff import __version__
from service.auth import authenticate
from service.contexts import datasets
from service.export import (
    FORMATS,
    ExportClass,
    ExportItem,
    ExportOptions,
    ExportSource,
    archive,
    write_archive,
)
from service.models import Sample, utcnow
from service.storage import BlobNotFound, LocalStorage, sample_key
from tests.api_support import Api, ApiFactory, add_class, encode
from tests.dataset_support import (
    CLASS_SEED,
    MODEL_IDS,
    PROMPTS,
    DatasetClass,
    download,
    extract,
    labels_of,
    random_sample,
)

pytest_plugins = ["tests.api_support", "tests.dataset_support"]

WEBDATASET_METADATA = "__meta__/metadata.json"


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
    assert json.loads((folder / "id2label.json").read_text()) == {"0": "background", "1": "dog"}


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
    metadata = _metadata(folder, export_format)

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
        metadata = _metadata(folder, export_format)
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
    for export_format in ("voc", "coco", "hf"):
        path = tmp_path / f"{export_format}.zip"
        path.write_bytes(download(api, dataset_class, export_format))
        result = subprocess.run(["unzip", "-tq", str(path)], capture_output=True, text=True)
        assert result.returncode == 0, result.stdout + result.stderr


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
    small, large = _many_samples(api, 200), _many_samples(api, 2000)

    # when: each archive is streamed through (after an untraced pass to warm caches)
    small_peak = _export_peak(api, small, export_format)
    large_peak = _export_peak(api, large, export_format)

    # then: ten times the samples take nowhere near ten times the memory
    assert large_peak < 3 * small_peak, (small_peak, large_peak)


def _many_samples(api: Api, count: int) -> Any:
    """A succeeded class of `count` finalized samples sharing one tiny image and mask."""
    class_id, _ = add_class(api, owner_id=api.alice_id, status="succeeded")
    image, mask = random_sample(np.random.default_rng(count))
    image_key, mask_key = sample_key(class_id, 0, "image.png"), sample_key(class_id, 0, "mask.png")
    api.storage.put(image_key, encode(image), content_type="image/png")
    api.storage.put(mask_key, encode(mask), content_type="image/png")
    rows = [
        {
            "class_id": class_id,
            "index": index,
            "prompt": "a photo of a dog",
            "prompt_kind": "text",
            "seed": index,
            "width": 32,
            "height": 32,
            "image_key": image_key,
            "coarse_mask_key": mask_key,
            "mask_key": mask_key,
            "mask_source": "consensus",
            "clip_score": 30.0,
            "accepted": True,
            "finalized_at": utcnow(),
        }
        for index in range(count)
    ]
    with api.session() as session:
        session.execute(insert(Sample), rows)
        session.commit()
    return class_id


def _export_peak(api: Api, class_id: Any, export_format: Any) -> int:
    """The most memory Python held at once while the archive was streamed (after a pass
    to warm up)."""
    with api.session() as session:
        principal = authenticate(session, f"Bearer {api.keys['alice']}")
        download_ = datasets.prepare_download(
            session=session,
            session_factory=api.app.state.session_factory,
            storage=api.storage,
            settings=api.settings,
            principal=principal,
            class_id=class_id,
            export_format=export_format,
            accepted_only=True,
        )
        for _ in download_.stream():
            pass
        tracemalloc.start()
        try:
            size = sum(len(chunk) for chunk in download_.stream())
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
    assert size > 0
    return peak


# --- helpers ------------------------------------------------------------------------------


class MemoryStorage(LocalStorage):
    """Blobs in a dict (a local store's other operations are never called here)."""

    def __init__(self) -> None:
        self.blobs: dict[str, bytes] = {}

    def put(self, key: str, data: bytes, *, content_type: str) -> None:
        self.blobs[key] = data

    def get(self, key: str) -> bytes:
        try:
            return self.blobs[key]
        except KeyError:
            raise BlobNotFound(key) from None


def _metadata(folder: Path, export_format: str) -> Any:
    """An extracted archive's `metadata.json` (webdataset keeps it where WebDataset skips)."""
    name = WEBDATASET_METADATA if export_format == "webdataset" else "metadata.json"
    return json.loads((folder / name).read_text())


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
        seg_class=seg_class,
        accepted_only=True,
        num_shots=1,
        num_samples=num_samples,
        items=lambda: iter([shot, *samples]),
        read=blobs.__getitem__,
    )
