"""`/v1/classes/{id}/dataset`: a class's real shots and samples as a streamed archive."""

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
from service.export import ExportFormat

router = APIRouter(tags=["datasets"])

_ARCHIVE_HEADERS = {
    "ETag": {
        "description": "The archive's identity: the same class state, format and server give "
        "the same bytes. Send it back in `If-Range` to resume.",
        "schema": {"type": "string"},
    },
    "Accept-Ranges": {"schema": {"type": "string", "enum": ["bytes"]}},
    "Content-Disposition": {
        "description": '`attachment; filename="<class>-<format>.zip"` (`.tar` for webdataset).',
        "schema": {"type": "string"},
    },
}
_ARCHIVE: dict[str, Any] = {"application/zip": {}, "application/x-tar": {}}


@router.get(
    "/v1/classes/{class_id}/dataset",
    response_class=Response,
    responses={
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
        **problem_responses(401, 404, 409, 416, 422),
    },
)
def download_dataset(
    session: SessionDep,
    session_factory: SessionFactoryDep,
    storage: StorageDep,
    settings: SettingsDep,
    principal: CurrentPrincipal,
    class_id: uuid.UUID,
    export_format: Annotated[
        ExportFormat, Query(alias="format", description="The archive's layout.")
    ],
    accepted_only: Annotated[
        bool,
        Query(description="Only the samples that passed the OOD filter; the shots are always in."),
    ] = True,
    range_header: Annotated[
        str | None,
        Header(alias="Range", description="`bytes=N-` to resume a download from byte N."),
    ] = None,
    if_range: Annotated[
        str | None,
        Header(
            alias="If-Range",
            description="The ETag of the download being resumed: the range is sent only if "
            "the archive is still the same, else the whole archive (200).",
        ),
    ] = None,
) -> Response:
    """Download a class's dataset: its real shots and its synthetic samples, as one archive.

    Formats: `voc` (JPEGImages/, SegmentationClass/ palette PNGs, ImageSets/Segmentation/
    train.txt, labelmap.txt), `coco` (images/ and annotations/instances.json with RLE masks),
    `hf` (Parquet under data/ that `datasets.load_dataset` reads, with `image` and
    `annotation` image columns, and id2label.json), `webdataset` (one tar that
    `webdataset.WebDataset(path)` reads as one record per image: `<name>.jpg`,
    `<name>.mask.png`, `<name>.json`; its metadata.json under `__meta__/`, which WebDataset
    skips). Every archive carries a `metadata.json`: the class, the service version, the
    models, and a record per shot (`"source": "shot"`, files named `shot_*`) and per sample
    (`"source": "synthetic"`, `sample_*`) with its prompt, seed and scores, so the dataset can
    be traced and regenerated.

    Available once the class's synthesis job has succeeded (409 before, and after a failure
    or cancellation). The archive is the same bytes for the same class, so a broken download
    resumes with `Range: bytes=N-` and `If-Range: <ETag>`: 206 with the rest, or 200 with the
    whole archive if it changed (the server was upgraded, say). Resuming may wait for one
    pass over the archive while its total length is measured the first time.
    """
    download = datasets.prepare_download(
        session=session,
        session_factory=session_factory,
        storage=storage,
        settings=settings,
        principal=principal,
        class_id=class_id,
        export_format=export_format,
        accepted_only=accepted_only,
    )
    return archive_response(download, range_header=range_header, if_range=if_range)
