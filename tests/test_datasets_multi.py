"""`GET /v1/datasets?class_ids=…`: one archive over several classes, labelled in the order given,
with the one-class download's determinism, ETag and Range rules, refusing what it cannot serve,
and flat in memory in the number of samples."""

from __future__ import annotations

import io
import json
import uuid
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image
from pycocotools.coco import COCO

from aligndiff_client import Client
from service.export import FORMATS
from tests.api_support import Api, ApiFactory, add_class
from tests.dataset_support import (
    DatasetClass,
    MemoryStorage,
    create_finished_class,
    create_objects_class,
    export_peak,
    extract,
    labels_of,
    many_samples,
    metadata_of,
    read_yolo,
    serving,
)

pytest_plugins = ["tests.api_support", "tests.dataset_support"]

URL = "/v1/datasets"


@dataclass(frozen=True)
class TwoClasses:
    dog: DatasetClass  # the real dog and albatross shots, random disks
    owl: DatasetClass  # a shot of two objects, masks of several objects

    def params(self, export_format: str, *classes: DatasetClass, **more: str) -> dict[str, str]:
        order = classes or (self.dog, self.owl)
        return {"class_ids": ",".join(str(c.id) for c in order), "format": export_format, **more}


@pytest.fixture
def two(api: Api) -> TwoClasses:
    return TwoClasses(create_finished_class(api), create_objects_class(api, name="owl"))


def fetch(api: Api, params: dict[str, str], **headers: str) -> bytes:
    response = api.alice.get(URL, params=params, headers=headers)
    assert response.status_code == 200, response.text
    return response.content


def named(dataset: DatasetClass, label: int, slug: str) -> list[str]:
    """The archive names of a class's exported items: its shots, then its samples."""
    return [f"{slug}-{label}_{item.name}" for item in dataset.exported()]


# --- labels and names ---------------------------------------------------------------------


@pytest.mark.parametrize("reverse", [False, True])
def test_labels_follow_the_order_given_and_names_carry_their_class(
    api: Api, two: TwoClasses, reverse: bool
) -> None:
    # given: the classes in one order or the other
    first, second = (two.owl, two.dog) if reverse else (two.dog, two.owl)

    # when
    data = fetch(api, two.params("voc", first, second))

    # then: label i is the i-th class, in the masks, the palette and the label map
    with zipfile.ZipFile(io.BytesIO(data)) as opened:
        metadata = json.loads(opened.read("metadata.json"))
        labelmap = opened.read("labelmap.txt").decode().splitlines()
        masks = {
            name.removeprefix("SegmentationClass/").removesuffix(".png"): opened.read(name)
            for name in opened.namelist()
            if name.startswith("SegmentationClass/")
        }
        train = opened.read("ImageSets/Segmentation/train.txt").decode().split()
    assert metadata["labels"] == {"0": "background", "1": first.name, "2": second.name}
    assert [c["id"] for c in metadata["classes"]] == [str(first.id), str(second.id)]
    assert "class" not in metadata  # several: no one class
    assert labelmap[1:] == [
        "background:0,0,0::",
        f"{first.name}:128,0,0::",
        f"{second.name}:0,128,0::",
    ]
    expected = {
        name: (label, item.mask)
        for label, dataset in ((1, first), (2, second))
        for name, item in zip(named(dataset, label, dataset.name), dataset.exported(), strict=True)
    }
    assert sorted(masks) == sorted(expected) and sorted(train) == sorted(expected)
    for name, png in masks.items():
        label, mask = expected[name]
        with Image.open(io.BytesIO(png)) as image:
            assert image.getpalette()[3 * label : 3 * label + 3] == labelmap_colour(labelmap, label)  # type: ignore[index]
        assert np.array_equal(labels_of(png), mask * label), name
    # and: the records name their label; shots first, then each class's samples
    records = metadata["shots"] + metadata["samples"]
    assert [r["name"] for r in metadata["shots"]] == [
        n for n in expected if "_shot_" in n and n.startswith(first.name)
    ] + [n for n in expected if "_shot_" in n and n.startswith(second.name)]
    assert all(r["label"] == expected[r["name"]][0] for r in records)


def labelmap_colour(labelmap: list[str], label: int) -> list[int]:
    return [int(v) for v in labelmap[1 + label].split(":")[1].split(",")]


def test_coco_categories_and_yolo_classes_match_the_labels(
    api: Api, two: TwoClasses, tmp_path: Path
) -> None:
    # when
    coco_folder = extract(fetch(api, two.params("coco")), tmp_path / "coco")
    yolo_folder = extract(fetch(api, two.params("yolo")), tmp_path / "yolo")

    # then: COCO's category i is label i, each object annotated with its class's
    coco = COCO(str(coco_folder / "annotations" / "instances.json"))
    assert [(c["id"], c["name"]) for c in coco.loadCats(coco.getCatIds())] == [
        (1, "dog"),
        (2, "owl"),
    ]
    for image in coco.loadImgs(coco.getImgIds()):
        category = 1 if image["file_name"].startswith("dog-1_") else 2
        annotations = coco.loadAnns(coco.getAnnIds(imgIds=image["id"]))
        assert annotations and {a["category_id"] for a in annotations} == {category}
    assert len(coco.getAnnIds(catIds=[2])) == 2 + 1 + 2 + 1 + 1  # owl's objects
    # and: YOLO's class i - 1, named in data.yaml
    dataset = read_yolo(yolo_folder / "data.yaml")
    assert dataset.names == {0: "dog", 1: "owl"}
    for name, image in dataset.images.items():
        assert {line.cls for line in image.lines} == {0 if name.startswith("dog-1_") else 1}


def test_classes_that_share_a_name_get_labels_of_distinct_names_in_every_format(
    api: Api, two: TwoClasses, tmp_path: Path
) -> None:
    # given: a second class named "dog", and a third whose own name is what the second's
    # label would be made of
    other_dog = create_objects_class(api, name="dog")
    dog_2 = create_objects_class(api, name="dog-2")
    params = two.params("voc", two.dog, other_dog, dog_2)
    expected = ["dog-1", "dog-2-2", "dog-2"]

    # when: every format is downloaded
    folders = {
        export_format: extract(
            fetch(api, {**params, "format": export_format}), tmp_path / export_format
        )
        for export_format in ("voc", "coco", "yolo", "hf")
    }

    # then: the labels are 1, 2, 3 under three names, the same in every format's own file,
    # while metadata.json keeps each class's own name
    voc_lines = (folders["voc"] / "labelmap.txt").read_text().splitlines()
    assert [line.split(":")[0] for line in voc_lines[2:]] == expected
    coco = COCO(str(folders["coco"] / "annotations" / "instances.json"))
    assert [c["name"] for c in coco.loadCats(coco.getCatIds())] == expected
    assert read_yolo(folders["yolo"] / "data.yaml").names == dict(enumerate(expected))
    id2label = json.loads((folders["hf"] / "id2label.json").read_text())
    assert id2label == {"0": "background", "1": "dog-1", "2": "dog-2-2", "3": "dog-2"}
    metadata = metadata_of(folders["hf"], "hf")
    assert [c["name"] for c in metadata["classes"]] == ["dog", "dog", "dog-2"]
    assert metadata["labels"] == id2label


@pytest.mark.parametrize("export_format", FORMATS)
def test_every_format_holds_both_classes_under_unique_names(
    api: Api, two: TwoClasses, export_format: str, tmp_path: Path
) -> None:
    # when
    folder = extract(fetch(api, two.params(export_format, val="shots")), tmp_path)
    metadata = metadata_of(folder, export_format)

    # then: every item of both classes once, each in its split
    records = metadata["shots"] + metadata["samples"]
    names = [r["name"] for r in records]
    assert sorted(names) == sorted(named(two.dog, 1, "dog") + named(two.owl, 2, "owl"))
    assert len(set(names)) == len(names)
    assert all(r["split"] == ("val" if r["source"] == "shot" else "train") for r in records)
    if export_format == "hf":
        assert json.loads((folder / "id2label.json").read_text()) == metadata["labels"]


# --- one archive: determinism, ETag, ranges -----------------------------------------------


def test_the_archive_is_the_same_bytes_with_a_strong_etag_of_its_own(
    api: Api, two: TwoClasses
) -> None:
    def answer(*classes: DatasetClass, **more: str) -> Any:
        response = api.alice.get(URL, params=two.params("coco", *classes, **more))
        assert response.status_code == 200, response.text
        return response

    first, again = answer(), answer()
    assert first.content == again.content
    etag = first.headers["etag"]
    assert etag == again.headers["etag"] and etag.startswith('"')
    assert first.headers["content-disposition"] == 'attachment; filename="dog-owl-coco.zip"'
    # and: another order, option or class set is another archive
    others = {
        answer(two.owl, two.dog).headers["etag"],
        answer(val="shots").headers["etag"],
        answer(two.dog).headers["etag"],
    }
    assert etag not in others and len(others) == 3


def test_a_range_resumes_and_a_stale_if_range_gets_the_whole_archive(
    api: Api, two: TwoClasses
) -> None:
    params = two.params("yolo")
    whole = api.alice.get(URL, params=params)
    etag, body = whole.headers["etag"], whole.content
    offset = len(body) // 3

    resumed = api.alice.get(
        URL, params=params, headers={"Range": f"bytes={offset}-", "If-Range": etag}
    )
    stale = api.alice.get(
        URL, params=params, headers={"Range": f"bytes={offset}-", "If-Range": '"older"'}
    )

    assert resumed.status_code == 206
    assert resumed.headers["content-range"] == f"bytes {offset}-{len(body) - 1}/{len(body)}"
    assert body[:offset] + resumed.content == body
    assert stale.status_code == 200 and stale.content == body


def test_one_class_here_is_that_class_s_archive_named_as_before(api: Api, two: TwoClasses) -> None:
    alone = fetch(api, two.params("voc", two.dog))
    single = api.alice.get(two.dog.url, params={"format": "voc"}).content

    assert alone == single


def test_the_sdk_downloads_several_classes_resuming_a_broken_download(
    api: Api, two: TwoClasses, tmp_path: Path
) -> None:
    expected = fetch(api, two.params("yolo", val="shots"))
    dest = tmp_path / "both.zip"

    class Interrupted(Exception):
        pass

    def interrupt(done: int, total: int | None) -> None:
        raise Interrupted

    with serving(api) as base, Client(base, api.keys["alice"]) as client:
        with pytest.raises(Interrupted):
            client.download_dataset(
                [two.dog.id, two.owl.id], "yolo", dest, val="shots", on_progress=interrupt
            )
        partial = dest.with_name(dest.name + ".incomplete")
        assert 0 < partial.stat().st_size < len(expected)

        path = client.download_dataset(
            [two.dog.id, two.owl.id], "yolo", dest, val="shots", progress=False
        )

    assert path == dest and dest.read_bytes() == expected


# --- what it refuses ----------------------------------------------------------------------


def test_unknown_foreign_repeated_or_malformed_ids_are_named_in_a_422(
    api: Api, two: TwoClasses
) -> None:
    bobs = create_finished_class(api, owner="bob", name="cat")
    stranger = uuid.uuid4()
    cases = {
        f"{two.dog.id},{stranger}": ["class_ids[1]"],
        f"{bobs.id},{two.dog.id}": ["class_ids[0]"],  # bob's: as unknown as any
        f"{two.dog.id},{two.owl.id},{two.dog.id}": ["class_ids[2]"],
        f"{two.dog.id},not-an-id": ["class_ids[1]"],
        "": ["class_ids"],
    }
    for class_ids, fields in cases.items():
        response = api.alice.get(URL, params={"class_ids": class_ids, "format": "voc"})
        assert response.status_code == 422, class_ids
        assert response.headers["content-type"] == "application/problem+json"
        body = response.json()
        assert [e["field"] for e in body["errors"]] == fields, class_ids
    response = api.alice.get(URL, params={"class_ids": f"{stranger},{bobs.id}", "format": "voc"})
    assert str(stranger) in response.json()["detail"] and str(bobs.id) in response.json()["detail"]
    # and: a missing list, a bad format or val are refused too
    for params in ({"format": "voc"}, {**two.params("gif")}, two.params("voc", val="half")):
        assert api.alice.get(URL, params=params).status_code == 422


def test_a_class_whose_job_has_not_succeeded_answers_409_naming_it(
    api: Api, two: TwoClasses
) -> None:
    running, _ = add_class(api, owner_id=api.alice_id, name="cat", status="running")

    response = api.alice.get(URL, params={"class_ids": f"{two.dog.id},{running}", "format": "coco"})

    assert response.status_code == 409
    assert f"{running} (running)" in response.json()["detail"]
    assert [e["field"] for e in response.json()["errors"]] == ["class_ids[1]"]


def test_an_admin_may_put_any_owner_s_classes_together(api: Api, two: TwoClasses) -> None:
    bobs = create_finished_class(api, owner="bob", name="cat")
    params = {"class_ids": f"{two.dog.id},{bobs.id}", "format": "hf"}

    assert api.admin.get(URL, params=params).status_code == 200
    assert api.bob.get(URL, params=params).status_code == 422
    assert api.anonymous.get(URL, params=params).status_code == 401


def test_the_openapi_schema_documents_the_route(api: Api) -> None:
    schema = api.anonymous.get("/openapi.json").json()
    operation = schema["paths"][URL]["get"]

    assert operation["operationId"] == "download_datasets"
    parameters = {p["name"]: p for p in operation["parameters"]}
    assert {"class_ids", "format", "val", "accepted_only", "Range", "If-Range"} <= set(parameters)
    assert parameters["class_ids"]["required"] is True
    assert "pattern" in parameters["class_ids"]["schema"]
    assert {"200", "206", "409", "416", "422"} <= set(operation["responses"])


# --- memory -------------------------------------------------------------------------------


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
@pytest.mark.parametrize("export_format", ["coco", "yolo"])
def test_memory_does_not_grow_with_the_number_of_samples_over_several_classes(
    make_api: ApiFactory, export_format: str
) -> None:
    # given: two classes of 100 samples each, and two of 1,000 each
    api = make_api(storage=MemoryStorage())
    small = [many_samples(api, 100, name="dog"), many_samples(api, 101, name="owl")]
    large = [many_samples(api, 1000, name="dog"), many_samples(api, 1001, name="owl")]

    # when
    small_peak = export_peak(api, small, export_format)
    large_peak = export_peak(api, large, export_format)

    # then
    assert large_peak < 3 * small_peak, (small_peak, large_peak)
