"""WebDataset layout: a tar of shards.

    metadata.json
    shard-000000.tar, shard-000001.tar, …

Each shard is a WebDataset tar: per shot and per sample, consecutive members `<name>.jpg`
(the image, JPEG quality 95), `<name>.seg.png` (palette PNG: index 0 background, 1 the class)
and `<name>.json` (its record, as in `metadata.json`). Extract the download and point
`webdataset.WebDataset("shard-{000000..00000N}.tar")` at the shards.

NOTE: a tar member's size comes before its data, so each shard is built in memory and then
sent; a shard is closed at `shard_max_samples` samples or once it holds `shard_max_bytes`,
which bounds the memory a download takes. `metadata.json` is generated twice (once to measure
it) rather than held.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from io import BytesIO

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

SEND_CHUNK = 1 << 20


def write_webdataset(source: ExportSource, options: ExportOptions) -> Iterator[bytes]:
    """The archive's bytes, streamed."""
    mtime = int(source.seg_class.created_at.timestamp())

    def metadata() -> Iterator[bytes]:
        return metadata_pieces(source, format_name="webdataset", files=_files)

    yield from tar_member("metadata.json", sum(map(len, metadata())), metadata(), mtime=mtime)
    shard, in_shard, number = BytesIO(), 0, 0
    for item in source.items():
        for name, data in _members(source, item):
            for chunk in tar_member(name, len(data), [data], mtime=mtime):
                shard.write(chunk)
        in_shard += 1
        if in_shard >= options.shard_max_samples or shard.tell() >= options.shard_max_bytes:
            yield from _send_shard(shard, number, mtime=mtime)
            shard, in_shard, number = BytesIO(), 0, number + 1
    if in_shard:
        yield from _send_shard(shard, number, mtime=mtime)
    yield TAR_END


def _members(source: ExportSource, item: ExportItem) -> list[tuple[str, bytes]]:
    files = _files(0, item)
    return [
        (files["image"], jpeg(source.read(item.image_key))),
        (files["mask"], label_png(source.read(item.mask_key))),
        (files["json"], json.dumps(item.record(files)).encode()),
    ]


def _send_shard(shard: BytesIO, number: int, *, mtime: int) -> Iterator[bytes]:
    shard.write(TAR_END)
    view = shard.getbuffer()
    try:
        chunks = (bytes(view[at : at + SEND_CHUNK]) for at in range(0, len(view), SEND_CHUNK))
        yield from tar_member(f"shard-{number:06d}.tar", len(view), chunks, mtime=mtime)
    finally:
        view.release()


def _files(_: int, item: ExportItem) -> Files:
    name = item.name
    return {"image": f"{name}.jpg", "mask": f"{name}.seg.png", "json": f"{name}.json"}
