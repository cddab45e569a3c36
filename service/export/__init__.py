"""Dataset exports: classes' real shots and samples as a VOC, COCO, Hugging Face, WebDataset
or Ultralytics YOLO archive, streamed.

Each format is a function over an `ExportSource` (the classes, a walk over their items, a blob
reader) that yields the archive's bytes front to back: no archive is ever held whole, in memory
or on disk. Output is deterministic: the same source gives the same bytes.
"""

from __future__ import annotations

import platform
import zlib
from collections.abc import Callable, Iterable, Iterator
from functools import cache
from importlib.metadata import version
from typing import Literal, get_args

import cv2
import PIL
from PIL import features

from aligndiff import __version__
from service.export.archive import ExportClass, ExportItem, ExportOptions, ExportSource
from service.export.coco import write_coco
from service.export.hf import write_hf
from service.export.splits import NO_VAL, VAL_FORMS, VAL_PATTERN, Split, ValSplit
from service.export.voc import write_voc
from service.export.webdataset import write_webdataset
from service.export.yolo import write_yolo

__all__ = [
    "FORMATS",
    "NO_VAL",
    "VAL_FORMS",
    "VAL_PATTERN",
    "ExportClass",
    "ExportFormat",
    "ExportItem",
    "ExportOptions",
    "ExportSource",
    "Split",
    "ValSplit",
    "extension",
    "media_type",
    "software_versions",
    "write_archive",
]

ExportFormat = Literal["voc", "coco", "hf", "webdataset", "yolo"]
FORMATS: tuple[ExportFormat, ...] = get_args(ExportFormat)

Writer = Callable[[ExportSource, ExportOptions], Iterator[bytes]]
_WRITERS: dict[ExportFormat, Writer] = {
    "voc": write_voc,
    "coco": write_coco,
    "hf": write_hf,
    "webdataset": write_webdataset,
    "yolo": write_yolo,
}
# Chunks handed to the server are coalesced to about this size.
CHUNK_BYTES = 1 << 16


def media_type(export_format: ExportFormat) -> str:
    return "application/x-tar" if export_format == "webdataset" else "application/zip"


def extension(export_format: ExportFormat) -> str:
    return "tar" if export_format == "webdataset" else "zip"


def write_archive(
    export_format: ExportFormat, source: ExportSource, options: ExportOptions | None = None
) -> Iterator[bytes]:
    """The archive's bytes in chunks of about `CHUNK_BYTES`."""
    return _coalesce(_WRITERS[export_format](source, options or ExportOptions()))


@cache
def software_versions() -> dict[str, str | None]:
    """The versions of everything whose output ends up in an archive: a change in any of them
    may change an archive's bytes (and so its ETag must change)."""
    return {
        "aligndiff": __version__,
        "python": platform.python_version(),
        "pillow": PIL.__version__,
        "libjpeg": features.version_codec("jpg"),
        "libjpeg-turbo": features.version_feature("libjpeg_turbo"),
        "pillow-zlib": features.version_codec("zlib"),
        "zlib": zlib.ZLIB_RUNTIME_VERSION,
        "pyarrow": version("pyarrow"),
        "pycocotools": version("pycocotools"),
        "opencv": cv2.__version__,
    }


def _coalesce(chunks: Iterable[bytes]) -> Iterator[bytes]:
    pending = bytearray()
    for chunk in chunks:
        pending += chunk
        if len(pending) >= CHUNK_BYTES:
            yield bytes(pending)
            pending.clear()
    if pending:
        yield bytes(pending)
