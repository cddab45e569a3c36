"""A Hugging Face `datasets` layout, as a zip.

    metadata.json
    id2label.json                                 {"0": "background", "1": <name>, …}
    data/train-00000-of-0000N.parquet             one row per shot and per sample
    data/validation-00000-of-0000M.parquet        the validation split (with a `val`)

The files are named as the Hugging Face Hub names splits, so `load_dataset(<extracted folder>)`
or `load_dataset("parquet", data_dir=<folder>/data)` sees a `train` split and, with a `val`
option, a `validation` one. A split with no rows has no file: `datasets` fails to load a
folder holding an empty Parquet file. The Parquet schema carries the `datasets` features (under
the `huggingface` key), which decode `image` and `annotation` as images: the image as stored (RGB
PNG) and the mask as a palette PNG of label indices (0 background, i the i-th class). The other
columns are the records of `metadata.json` (`source` is "shot" or "synthetic"; the generation
columns are null for shots).

NOTE: rows are written in row groups of `parquet_rows_per_group`, straight into the zip entry,
so memory holds one row group, never a whole file.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterator
from itertools import islice
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from service.export.archive import (
    ExportItem,
    ExportOptions,
    ExportSource,
    Files,
    ZipStream,
    batches,
    label_png,
    write_metadata,
    zip_archive,
)
from service.export.splits import SPLITS, Split

SCORES = ("clip_score", "shot_similarity", "consensus_iou", "ood_iou")


def _value(dtype: str) -> dict[str, str]:
    return {"dtype": dtype, "_type": "Value"}


# The `datasets` features, as `Features.to_dict()` writes them.
FEATURES: dict[str, Any] = {
    "image": {"_type": "Image"},
    "annotation": {"_type": "Image"},
    "name": _value("string"),
    "source": _value("string"),
    "label": _value("int64"),
    "split": _value("string"),
    "id": _value("string"),
    "index": _value("int64"),
    "prompt": _value("string"),
    "prompt_kind": _value("string"),
    "seed": _value("int64"),
    "scores": {score: _value("float64") for score in SCORES},
    "accepted": _value("bool"),
    "accepted_by": _value("string"),
    "mask_source": _value("string"),
    "instances": _value("int64"),
}
_IMAGE = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
SCHEMA = pa.schema(
    [
        ("image", _IMAGE),
        ("annotation", _IMAGE),
        ("name", pa.string()),
        ("source", pa.string()),
        ("label", pa.int64()),
        ("split", pa.string()),
        ("id", pa.string()),
        ("index", pa.int64()),
        ("prompt", pa.string()),
        ("prompt_kind", pa.string()),
        ("seed", pa.int64()),
        ("scores", pa.struct([(score, pa.float64()) for score in SCORES])),
        ("accepted", pa.bool_()),
        ("accepted_by", pa.string()),
        ("mask_source", pa.string()),
        ("instances", pa.int64()),
    ],
    metadata={"huggingface": json.dumps({"info": {"features": FEATURES}})},
)


# The Hub's names of the splits.
HUB_SPLITS: dict[Split, str] = {"train": "train", "val": "validation"}


def write_hf(source: ExportSource, options: ExportOptions) -> Iterator[bytes]:
    """The archive's bytes, streamed."""
    per_file = options.parquet_rows_per_file
    counts = source.split_counts() if source.val.has_val else {"train": source.count}
    splits = [split for split in SPLITS if counts.get(split)]
    totals = {split: math.ceil(counts[split] / per_file) for split in splits}

    def files(ordinal: int, item: ExportItem) -> Files:
        split = item.split
        return {
            "data": data_file(split, ordinal // per_file, totals[split]),
            "image": f"images/{item.name}.png",
            "annotation": f"annotations/{item.name}.png",
        }

    def write(archive: ZipStream) -> Iterator[None]:
        yield from write_metadata(archive, source, format_name="hf", files=files)
        archive.write("id2label.json", json.dumps(source.labels).encode(), compress=True)
        for split in splits:
            items = source.split_items(split)
            for number in range(totals[split]):
                name = data_file(split, number, totals[split])
                with archive.open(name, compress=False, large=True) as entry:
                    writer = pq.ParquetWriter(entry, SCHEMA)
                    for batch in batches(islice(items, per_file), options.parquet_rows_per_group):
                        writer.write_table(_rows(source, batch, files))
                        yield
                    writer.close()
                yield
            if next(items, None) is not None:
                raise ValueError(f"the source yielded more {split} items than it counted")

    return zip_archive(source.created_at, write)


def data_file(split: Split, number: int, total: int) -> str:
    return f"data/{HUB_SPLITS[split]}-{number:05d}-of-{total:05d}.parquet"


def _rows(
    source: ExportSource, batch: list[ExportItem], files: Callable[[int, ExportItem], Files]
) -> pa.Table:
    rows = []
    for item in batch:
        paths = files(0, item)
        rows.append(
            {
                "image": {"bytes": source.read(item.image_key), "path": paths["image"]},
                "annotation": {
                    "bytes": label_png(source.read(item.mask_key), item.label),
                    "path": paths["annotation"],
                },
                "name": item.name,
                "source": item.source,
                "label": item.label,
                "split": item.split,
                "id": item.id,
                "index": item.index,
                "prompt": item.prompt,
                "prompt_kind": item.prompt_kind,
                "seed": item.seed,
                "scores": item.scores or None,
                "accepted": item.accepted,
                "accepted_by": item.accepted_by,
                "mask_source": item.mask_source,
                "instances": source.instance_count(item),
            }
        )
    return pa.Table.from_pylist(rows, schema=SCHEMA)
