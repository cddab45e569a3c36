"""`/v1/classes/{id}/dataset` and `/v1/datasets`: the real shots and samples of a class, or of
several, as one streamed archive."""

from __future__ import annotations

import uuid
from typing import Annotated, Any

from fastapi import APIRouter, Header, Query, Response

from service.api.deps import (
    CurrentPrincipal,
    SessionDep,
    SessionFactoryDep,
    SettingsDep,
    StorageDep,
)
from service.api.ranges import archive_response
from service.api.responses import problem_responses
from service.contexts import datasets
from service.export import VAL_FORMS, VAL_PATTERN, ExportFormat

router = APIRouter(tags=["datasets"])

_ARCHIVE_HEADERS = {
    "ETag": {
        "description": "The archive's identity: the same classes' state, options and server "
        "give the same bytes. Send it back in `If-Range` to resume.",
        "schema": {"type": "string"},
    },
    "Accept-Ranges": {"schema": {"type": "string", "enum": ["bytes"]}},
    "Content-Disposition": {
        "description": '`attachment; filename="<class>-<format>.zip"` (`.tar` for webdataset; '
        "the classes' names joined by `-` for several).",
        "schema": {"type": "string"},
    },
}
_ARCHIVE: dict[str, Any] = {"application/zip": {}, "application/x-tar": {}}
_ARCHIVE_RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {
        "description": "The whole archive, streamed (a zip; a tar for webdataset). "
        "Content-Length is sent only once the archive's size is known.",
        "content": _ARCHIVE,
        "headers": _ARCHIVE_HEADERS,
    },
    206: {
        "description": "The part of the archive the `Range` asked for, with "
        "`Content-Range: bytes first-last/total`.",
        "content": _ARCHIVE,
        "headers": _ARCHIVE_HEADERS,
    },
}
# UUIDs, comma-separated.
_UUID = "[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}"
CLASS_IDS_PATTERN = f"^{_UUID}(,{_UUID})*$"

FormatQuery = Annotated[ExportFormat, Query(alias="format", description="The archive's layout.")]
AcceptedOnlyQuery = Annotated[
    bool,
    Query(description="Only the samples that passed the OOD filter; the shots are always in."),
]
# NOTE: the pattern is stated in the schema, and checked by `datasets.parse_val`, whose 422
# names the accepted forms (a pattern mismatch would only repeat the pattern).
ValQuery = Annotated[
    str,
    Query(
        description=f"The validation split: {VAL_FORMS}. `none` puts everything in train; "
        "`shots` the real shots in validation and the samples in train; `fraction:<f>` that "
        "share of the samples in validation, chosen by a hash of each sample's id (the same "
        "sample always lands in the same split), and the shots in train.",
        json_schema_extra={"pattern": VAL_PATTERN},
    ),
]
RangeHeader = Annotated[
    str | None,
    Header(alias="Range", description="`bytes=N-` to resume a download from byte N."),
]
IfRangeHeader = Annotated[
    str | None,
    Header(
        alias="If-Range",
        description="The ETag of the download being resumed: the range is sent only if "
        "the archive is still the same, else the whole archive (200).",
    ),
]


@router.get(
    "/v1/classes/{class_id}/dataset",
    response_class=Response,
    responses={**_ARCHIVE_RESPONSES, **problem_responses(401, 404, 409, 416, 422)},
)
def download_dataset(
    session: SessionDep,
    session_factory: SessionFactoryDep,
    storage: StorageDep,
    settings: SettingsDep,
    principal: CurrentPrincipal,
    class_id: uuid.UUID,
    export_format: FormatQuery,
    accepted_only: AcceptedOnlyQuery = True,
    val: ValQuery = "none",
    range_header: RangeHeader = None,
    if_range: IfRangeHeader = None,
) -> Response:
    """Download a class's dataset: its real shots and its synthetic samples, as one archive.

    Formats: `voc` (JPEGImages/, SegmentationClass/ palette PNGs, ImageSets/Segmentation/
    train.txt and val.txt, labelmap.txt), `coco` (images/ and annotations/instances.json, or
    instances_train.json and instances_val.json with a split: one annotation per instance,
    each connected object of a mask, as RLE), `hf` (Parquet under data/, `train-*` and
    `validation-*`, that `datasets.load_dataset` reads, with `image` and `annotation` image
    columns, and id2label.json), `webdataset` (one tar that `webdataset.WebDataset(path)`
    reads as one record per image: `<name>.jpg`, `<name>.mask.png`, `<name>.json` with its
    `split`; its metadata.json under `__meta__/`, which WebDataset skips), `yolo` (Ultralytics
    segmentation: data.yaml, images/{train,val}/, labels/{train,val}/ with a line per
    instance, `class x1 y1 x2 y2 …` normalized). Every archive carries a `metadata.json`: the
    class, the service version, the models, and a record per shot (`"source": "shot"`, files
    named `shot_*`) and per sample (`"source": "synthetic"`, `sample_*`) with its prompt,
    seed, scores, verdict, instances and split, so the dataset can be traced and regenerated.

    Available once the class's synthesis job has succeeded (409 before, and after a failure
    or cancellation). The archive is the same bytes for the same class, so a broken download
    resumes with `Range: bytes=N-` and `If-Range: <ETag>`: 206 with the rest, or 200 with the
    whole archive if it changed (a reviewer changed a sample, the server was upgraded).
    Resuming may wait for one pass over the archive while its total length is measured the
    first time.
    """
    download = datasets.prepare_class_download(
        session=session,
        session_factory=session_factory,
        storage=storage,
        settings=settings,
        principal=principal,
        class_id=class_id,
        export_format=export_format,
        accepted_only=accepted_only,
        val=datasets.parse_val(val),
    )
    return archive_response(download, range_header=range_header, if_range=if_range)


@router.get(
    "/v1/datasets",
    response_class=Response,
    responses={**_ARCHIVE_RESPONSES, **problem_responses(401, 409, 416, 422)},
)
def download_datasets(
    session: SessionDep,
    session_factory: SessionFactoryDep,
    storage: StorageDep,
    settings: SettingsDep,
    principal: CurrentPrincipal,
    class_ids: Annotated[
        str,
        Query(
            description="The classes, comma-separated: label i is the i-th (0 is the "
            "background; YOLO's class i - 1).",
            json_schema_extra={"pattern": CLASS_IDS_PATTERN},
        ),
    ],
    export_format: FormatQuery,
    accepted_only: AcceptedOnlyQuery = True,
    val: ValQuery = "none",
    range_header: RangeHeader = None,
    if_range: IfRangeHeader = None,
) -> Response:
    """Download one dataset over several classes: each class's real shots and synthetic
    samples, as one archive in any format of `GET /v1/classes/{class_id}/dataset`.

    Label indices follow the order of `class_ids`: 0 is the background, the i-th class is
    label i (in VOC's palette and labelmap.txt, COCO's categories, Hugging Face's
    id2label.json; YOLO, which has no background class, numbers it i - 1). File names carry
    their class (`<class>-<label>_shot_00`, `<class>-<label>_sample_00000`), so none collide.
    `metadata.json` lists the `classes` and gives each record its `label`.

    422 (nothing is changed) names the ids that are not a class of yours, repeat, or are not
    ids; 409 names the classes whose synthesis job has not succeeded. The archive is as
    deterministic as one class's: a strong ETag, and `Range` with `If-Range` resume it.
    """
    download = datasets.prepare_download(
        session=session,
        session_factory=session_factory,
        storage=storage,
        settings=settings,
        principal=principal,
        class_ids=datasets.parse_class_ids(class_ids),
        export_format=export_format,
        accepted_only=accepted_only,
        val=datasets.parse_val(val),
    )
    return archive_response(download, range_header=range_header, if_range=if_range)
