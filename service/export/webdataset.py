"""WebDataset layout: one tar that `webdataset.WebDataset(path)` reads directly, one record per
shot and per sample.

    __meta__/metadata.json
    shot_00.jpg  shot_00.mask.png  shot_00.json
    …
    sample_00000.jpg  sample_00000.mask.png  sample_00000.json
    …

The members of an image are consecutive and share its name as the record's key: `jpg` (the
image, JPEG quality 95), `mask.png` (palette PNG: index 0 background, i the i-th class) and
`json` (its record, as in `metadata.json`, with its `split`). `metadata.json` sits under
`__meta__/`, a folder WebDataset skips (its readers skip every `__…__/` path), so it adds no
record.

NOTE: a tar member's size comes before its data, so each image's members are encoded in memory
(one image at a time) and then sent: memory does not grow with the number of samples.
`metadata.json` is generated twice (once to measure it) rather than held.
"""

from __future__ import annotations

import json
from collections.abc import Iterator

from service.export.archive import (
    TAR_END,
    ExportItem,
    ExportOptions,
    ExportSource,
    Files,
    jpeg,
    label_png,
    metadata_pieces,
    tar_member,
)

METADATA = "__meta__/metadata.json"


def write_webdataset(source: ExportSource, options: ExportOptions) -> Iterator[bytes]:
    """The archive's bytes, streamed."""
    mtime = int(source.created_at.timestamp())

    def metadata() -> Iterator[bytes]:
        return metadata_pieces(source, format_name="webdataset", files=_files)

    yield from tar_member(METADATA, sum(map(len, metadata())), metadata(), mtime=mtime)
    for item in source.items():
        for name, data in _members(source, item):
            yield from tar_member(name, len(data), [data], mtime=mtime)
    yield TAR_END


def _members(source: ExportSource, item: ExportItem) -> list[tuple[str, bytes]]:
    files = _files(0, item)
    record = item.record(files, instances=source.instance_count(item))
    return [
        (files["image"], jpeg(source.read(item.image_key))),
        (files["mask"], label_png(source.read(item.mask_key), item.label)),
        (files["json"], json.dumps(record).encode()),
    ]


def _files(_: int, item: ExportItem) -> Files:
    name = item.name
    return {"image": f"{name}.jpg", "mask": f"{name}.mask.png", "json": f"{name}.json"}
