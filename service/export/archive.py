"""What every export format shares: the records exported, the streaming zip and tar writers,
the images as the formats want them, and `metadata.json`.

Everything here is deterministic: the same records and blobs give the same bytes, so that a
download can be resumed by regenerating it (see `service.contexts.datasets`).
"""

from __future__ import annotations

import json
import struct
import tarfile
import tempfile
import zlib
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from io import BytesIO
from typing import Any, Literal

import numpy as np
import numpy.typing as npt
from PIL import Image

from aligndiff import __version__
from aligndiff.instances import Instance, split_instances
from aligndiff.masks import binarize_mask
from service.export.splits import NO_VAL, SPLITS, Split, ValSplit

Source = Literal["shot", "synthetic"]
# A blob's bytes by its storage key.
BlobReader = Callable[[str], bytes]
# The archive names of an exported item's files, by role ("image", "mask", …).
Files = dict[str, str]

BACKGROUND, FOREGROUND = 0, 1


@dataclass(frozen=True)
class ExportClass:
    """A class an archive holds, as recorded in its `metadata.json`."""

    id: str
    name: str
    token: str | None
    seed: int
    prompts: list[str]
    model_ids: dict[str, Any]
    created_at: datetime
    # The deployment model (a name in ALIGNDIFF_MODELS) that synthesized it.
    model: str | None = None

    def record(self, label: int) -> dict[str, Any]:
        """Its entry in `metadata.json`'s `classes`."""
        return {
            "label": label,
            "id": self.id,
            "name": self.name,
            "token": self.token,
            "seed": self.seed,
            "prompts": self.prompts,
            "created_at": self.created_at.isoformat(),
            "model": self.model,
            "models": self.model_ids,
        }


@dataclass(frozen=True)
class ExportItem:
    """One exported image + mask: a real shot or a synthetic sample of one of the classes.

    `name` is its file stem in every format: `shot_<position>` or `sample_<index>` (prefixed
    with its class when an archive holds several). `label` is its class's label index (1 for
    the first class), `split` the split it belongs to.
    """

    name: str
    source: Source
    width: int
    height: int
    image_key: str  # an RGB PNG
    mask_key: str  # a PNG mask (foreground >= 128)
    # A shot's position and the file name it was uploaded as.
    position: int | None = None
    filename: str | None = None
    # A sample's generation record.
    index: int | None = None
    prompt: str | None = None
    prompt_kind: str | None = None
    seed: int | None = None
    scores: dict[str, float | None] = field(default_factory=dict)
    accepted: bool | None = None
    mask_source: str | None = None
    id: str | None = None  # a sample's id
    accepted_by: str | None = None
    # Objects in its mask (None: count them from the mask when needed, as for the shots).
    instances: int | None = None
    label: int = FOREGROUND
    split: Split = "train"

    def record(self, files: Files, *, instances: int) -> dict[str, Any]:
        """Its entry in `metadata.json` (and webdataset's per-sample JSON)."""
        common = {"name": self.name, "source": self.source, "label": self.label}
        size = {"width": self.width, "height": self.height}
        tail = {"instances": instances, "split": self.split, "files": files}
        if self.source == "shot":
            return {
                **common,
                "position": self.position,
                "filename": self.filename,
                **size,
                **tail,
            }
        return {
            **common,
            "id": self.id,
            "index": self.index,
            "prompt": self.prompt,
            "prompt_kind": self.prompt_kind,
            "seed": self.seed,
            **size,
            "scores": self.scores,
            "accepted": self.accepted,
            "accepted_by": self.accepted_by,
            "mask_source": self.mask_source,
            **tail,
        }


def label_names(names: Sequence[str]) -> list[str]:
    """The labels' names for classes named `names` (label i+1 is `names[i]`): the class's own
    name, or, where several classes share one (or one is "background"), `<name>-<label>`, as
    their files are prefixed. No two labels get one name: tools key labels by name (a VOC
    label map, `id2label` turned into `label2id`)."""
    counts = Counter(names)
    own = {name for name in names if counts[name] == 1 and name != "background"}
    taken = {"background", *own}
    chosen = []
    for label, name in enumerate(names, start=FOREGROUND):
        if name not in own:
            # NOTE: `<name>-<label>` may be another class's own name ("dog-2"): extend it.
            name = f"{name}-{label}"
            while name in taken:
                name = f"{name}-{label}"
            taken.add(name)
        chosen.append(name)
    return chosen


@dataclass(frozen=True)
class ExportSource:
    """What a format writer reads: the classes (in label order: the first is label 1), a way
    to walk their items as often as the format needs, and the blobs.

    `items()` starts a fresh walk each call: the shots of every class (class by class), then
    every class's samples; it yields exactly `num_shots + num_samples` items or raises. Each
    item carries its label and its split (by `val`).
    """

    classes: tuple[ExportClass, ...]
    accepted_only: bool
    num_shots: int
    num_samples: int
    items: Callable[[], Iterator[ExportItem]]
    read: BlobReader
    val: ValSplit = NO_VAL
    # Objects smaller than this (pixels) are no instance of their own (aligndiff.instances).
    instance_min_area: int = 16

    @property
    def count(self) -> int:
        return self.num_shots + self.num_samples

    @property
    def label_names(self) -> list[str]:
        """Each class's label name, in label order (`label_names`)."""
        return label_names([c.name for c in self.classes])

    @property
    def labels(self) -> dict[str, str]:
        """Label index → name, as every format numbers them (0 is the background)."""
        names = {str(label): name for label, name in enumerate(self.label_names, start=FOREGROUND)}
        return {str(BACKGROUND): "background", **names}

    @property
    def created_at(self) -> datetime:
        """The archive's timestamp (of every zip entry and tar member): its newest class's."""
        return max(c.created_at for c in self.classes)

    def split_counts(self) -> dict[Split, int]:
        """Items per split (a walk over the records; no blob is read)."""
        counts = dict.fromkeys(SPLITS, 0)
        for item in self.items():
            counts[item.split] += 1
        return counts

    def split_items(self, split: Split) -> Iterator[ExportItem]:
        """A fresh walk over the items of one split, in walk order."""
        return (item for item in self.items() if item.split == split)

    def instances(self, item: ExportItem) -> list[Instance]:
        """The item's objects (its mask's connected components of at least
        `instance_min_area` pixels), read from its mask."""
        mask = mask_labels(self.read(item.mask_key)).astype(bool)
        return split_instances(mask, min_area=self.instance_min_area)

    def instance_count(self, item: ExportItem) -> int:
        """How many objects the item holds: as recorded, else counted from its mask."""
        if item.instances is not None:
            return item.instances
        return len(self.instances(item))


@dataclass(frozen=True)
class ExportOptions:
    """Bounds of the buffers some formats need (see each format's module)."""

    # hf: rows per Parquet file, and per row group (the rows held in memory at once).
    parquet_rows_per_file: int = 1000
    parquet_rows_per_group: int = 64


# --- metadata.json ------------------------------------------------------------------------


def metadata_pieces(
    source: ExportSource, *, format_name: str, files: Callable[[int, ExportItem], Files]
) -> Iterator[bytes]:
    """`metadata.json`, piece by piece (one record at a time, so memory does not grow with the
    number of samples): the classes, the service version, the label map, the options, then one
    record per shot and per sample with its split and the names of its files in the archive.
    `files(ordinal, item)` names them; `ordinal` counts the items of the item's split.

    An archive of one class also names it (and its models) alone, under `class` and `models`,
    as archives did before they could hold several.
    """
    classes = [c.record(label) for label, c in enumerate(source.classes, start=FOREGROUND)]
    single: dict[str, Any] = {}
    if len(classes) == 1:
        (only,) = classes
        single = {
            "class": {k: v for k, v in only.items() if k not in ("label", "models")},
            "models": only["models"],
        }
    head = {
        "format": format_name,
        "service": {"name": "aligndiff", "version": __version__},
        **single,
        "classes": classes,
        "labels": source.labels,
        "accepted_only": source.accepted_only,
        "val": source.val.text,
        "instance_min_area": source.instance_min_area,
        "num_shots": source.num_shots,
        "num_samples": source.num_samples,
    }
    yield (json.dumps(head)[:-1] + ', "shots": [').encode()
    in_samples = False
    first = True
    ordinals = dict.fromkeys(SPLITS, 0)
    for item in source.items():
        if item.source == "synthetic" and not in_samples:
            yield b'], "samples": ['
            in_samples, first = True, True
        ordinal = ordinals[item.split]
        ordinals[item.split] += 1
        record = item.record(files(ordinal, item), instances=source.instance_count(item))
        yield (b"\n" if first else b",\n") + json.dumps(record).encode()
        first = False
    yield b"]}\n" if in_samples else b'], "samples": []}\n'


# --- images -------------------------------------------------------------------------------


def _voc_palette() -> list[int]:
    """The PASCAL VOC colormap: 256 RGB colours (1 is (128, 0, 0), 255 (224, 224, 192))."""
    palette = []
    for index in range(256):
        red = green = blue = 0
        value = index
        for bit in range(8):
            red |= ((value >> 0) & 1) << (7 - bit)
            green |= ((value >> 1) & 1) << (7 - bit)
            blue |= ((value >> 2) & 1) << (7 - bit)
            value >>= 3
        palette += [red, green, blue]
    return palette


VOC_PALETTE = _voc_palette()


def mask_labels(mask_png: bytes) -> npt.NDArray[np.uint8]:
    """A stored mask as label indices: 1 where foreground (by the contract's rule), else 0."""
    with Image.open(BytesIO(mask_png)) as mask:
        return binarize_mask(mask).astype(np.uint8)


def label_png(mask_png: bytes, label: int = FOREGROUND) -> bytes:
    """A stored mask as a palette PNG of label indices with the VOC colours: 0 for the
    background, `label` for the foreground."""
    image = Image.fromarray(mask_labels(mask_png) * np.uint8(label), mode="P")
    image.putpalette(VOC_PALETTE)
    return encode(image, "PNG")


def jpeg(image_png: bytes, *, quality: int = 95) -> bytes:
    with Image.open(BytesIO(image_png)) as image:
        return encode(image.convert("RGB"), "JPEG", quality=quality)


def encode(image: Image.Image, image_format: str, **options: Any) -> bytes:
    buffer = BytesIO()
    image.save(buffer, image_format, **options)
    return buffer.getvalue()


# --- zip ----------------------------------------------------------------------------------

# Sizes and offsets past this need ZIP64 fields (CPython's limit: some readers take the 32-bit
# fields as signed).
ZIP64_LIMIT = (1 << 31) - 1
# The central directory is spooled to a temporary file past this size, so a zip of any number
# of entries is written in bounded memory.
DIRECTORY_SPOOL_BYTES = 1024 * 1024
_UTF8_NAMES = 0x800
_DATA_DESCRIPTOR = 0x08
_MADE_BY = (3 << 8) | 45  # Unix, ZIP 4.5
_REGULAR_FILE = 0o100644 << 16


class ZipStream:
    """A zip archive written front to back into a small buffer that the caller drains as it
    goes (`drain()`): the sizes and CRC of each entry follow its data (data descriptors), so
    nothing is ever seeked back to or kept whole.

    Deterministic: every entry carries the same timestamp, and entries are written in the
    order given. Entries opened `large=True` carry ZIP64 sizes (for files that may pass 2 GiB);
    offsets and the entry count switch to ZIP64 by themselves when needed.
    """

    def __init__(self, *, modified: datetime) -> None:
        self._buffer = bytearray()
        self._offset = 0
        self._entries = 0
        # Closed by __exit__ (`zip_archive` writes within `with`).
        self._directory = tempfile.SpooledTemporaryFile(max_size=DIRECTORY_SPOOL_BYTES)  # noqa: SIM115
        year = min(max(modified.year, 1980), 2107)
        self._date = ((year - 1980) << 9) | (modified.month << 5) | modified.day
        self._time = (modified.hour << 11) | (modified.minute << 5) | (modified.second // 2)

    def __enter__(self) -> ZipStream:
        return self

    def __exit__(self, *exc: object) -> None:
        self._directory.close()

    def drain(self) -> bytes:
        """The bytes written since the last drain."""
        data = bytes(self._buffer)
        self._buffer.clear()
        return data

    def write(self, name: str, data: bytes, *, compress: bool) -> None:
        """A whole entry at once (small files, or bytes already in memory)."""
        with self.open(name, compress=compress) as entry:
            entry.write(data)

    def open(self, name: str, *, compress: bool, large: bool = False) -> ZipEntry:
        """A writable entry; close it (or use `with`) before opening the next."""
        return ZipEntry(self, name, compress=compress, large=large)

    def finish(self) -> Iterator[None]:
        """Write the central directory and the end records; drain after each step."""
        start, entries = self._offset, self._entries
        self._directory.seek(0)
        while chunk := self._directory.read(1 << 16):
            self._emit(chunk)
            yield
        size = self._offset - start
        if entries >= 0xFFFF or size > ZIP64_LIMIT or start > ZIP64_LIMIT:
            end64 = self._offset
            self._emit(
                struct.pack(
                    "<IQHHIIQQQQ", 0x06064B50, 44, _MADE_BY, 45, 0, 0, entries, entries, size, start
                )
            )
            self._emit(struct.pack("<IIQI", 0x07064B50, 0, end64, 1))
            entries, size, start = min(entries, 0xFFFF), 0xFFFFFFFF, 0xFFFFFFFF
        self._emit(struct.pack("<IHHHHIIH", 0x06054B50, 0, 0, entries, entries, size, start, 0))
        yield

    def _emit(self, data: bytes) -> None:
        self._buffer += data
        self._offset += len(data)

    def _record(self, entry: ZipEntry) -> None:
        """Keep an entry's central directory record (small: ~100 bytes, spooled)."""
        extra = b""
        sizes = (entry.compressed_size, entry.size)
        offset = entry.offset
        if entry.large:
            extra += struct.pack("<QQ", entry.size, entry.compressed_size)
            sizes = (0xFFFFFFFF, 0xFFFFFFFF)
        if offset > ZIP64_LIMIT:
            extra += struct.pack("<Q", offset)
            offset = 0xFFFFFFFF
        if extra:
            extra = struct.pack("<HH", 1, len(extra)) + extra
        name = entry.name.encode()
        self._directory.write(
            struct.pack(
                "<IHHHHHHIIIHHHHHII",
                0x02014B50,
                _MADE_BY,
                45 if extra else 20,
                entry.flags,
                entry.method,
                self._time,
                self._date,
                entry.crc,
                *sizes,
                len(name),
                len(extra),
                0,
                0,
                0,
                _REGULAR_FILE,
                offset,
            )
            + name
            + extra
        )
        self._entries += 1


class ZipEntry:
    """One zip entry being written: a write-only, non-seekable binary stream."""

    def __init__(self, archive: ZipStream, name: str, *, compress: bool, large: bool) -> None:
        self.name = name
        self.large = large
        self.method = zlib.DEFLATED if compress else 0
        self.flags = _DATA_DESCRIPTOR | _UTF8_NAMES
        self.offset = archive._offset
        self.crc = self.size = self.compressed_size = 0
        self.closed = False
        self._archive = archive
        self._compressor = zlib.compressobj(6, zlib.DEFLATED, -15) if compress else None
        encoded = name.encode()
        extra = struct.pack("<HHQQ", 1, 16, 0, 0) if large else b""
        sizes = 0xFFFFFFFF if large else 0
        archive._emit(
            struct.pack(
                "<IHHHHHIIIHH",
                0x04034B50,
                45 if large else 20,
                self.flags,
                self.method,
                archive._time,
                archive._date,
                0,
                sizes,
                sizes,
                len(encoded),
                len(extra),
            )
            + encoded
            + extra
        )

    def __enter__(self) -> ZipEntry:
        return self

    def __exit__(self, exc_type: object, *exc: object) -> None:
        # An entry interrupted by an error is left unfinished: the archive is abandoned too.
        if exc_type is None:
            self.close()

    def write(self, data: bytes | bytearray | memoryview) -> int:
        if self.closed:
            raise ValueError("write to a closed zip entry")
        data = bytes(data)
        self.crc = zlib.crc32(data, self.crc)
        self.size += len(data)
        self._put(self._compressor.compress(data) if self._compressor else data)
        return len(data)

    def tell(self) -> int:
        return self.size

    def flush(self) -> None:
        """Nothing to do: bytes reach the archive's buffer as they are written."""

    def writable(self) -> bool:
        return True

    def close(self) -> None:
        if self.closed:
            return
        if self._compressor is not None:
            self._put(self._compressor.flush())
        self.closed = True
        if not self.large and max(self.size, self.compressed_size) > ZIP64_LIMIT:
            raise ValueError(f"zip entry {self.name!r} passed 2 GiB; open it large=True")
        descriptor_format = "<IIQQ" if self.large else "<IIII"
        descriptor = struct.pack(
            descriptor_format, 0x08074B50, self.crc, self.compressed_size, self.size
        )
        self._archive._emit(descriptor)
        self._archive._record(self)

    def _put(self, data: bytes) -> None:
        self.compressed_size += len(data)
        self._archive._emit(data)


def zip_archive(
    modified: datetime, write: Callable[[ZipStream], Iterator[None]]
) -> Iterator[bytes]:
    """Run `write` (which yields whenever it has written something worth sending) over a fresh
    zip and stream the bytes, the central directory last."""
    with ZipStream(modified=modified) as archive:
        for _ in write(archive):
            yield archive.drain()
        for _ in archive.finish():
            yield archive.drain()


# --- tar ----------------------------------------------------------------------------------

TAR_BLOCK = 512
TAR_END = b"\0" * (2 * TAR_BLOCK)


def tar_member(name: str, size: int, chunks: Iterable[bytes], *, mtime: int) -> Iterator[bytes]:
    """A tar member as bytes: its header (by `tarfile`), its data, padding to a block.

    NOTE: written by hand around `TarInfo.tobuf` rather than through `tarfile.open(mode="w|")`,
    whose `addfile` copies a member whole before returning: here each chunk is handed on as it
    comes, so a member of any size passes through in bounded memory.
    """
    info = tarfile.TarInfo(name)
    info.size = size
    info.mtime = mtime
    info.mode = 0o644
    yield info.tobuf(tarfile.PAX_FORMAT)
    written = 0
    for chunk in chunks:
        written += len(chunk)
        yield chunk
    if written != size:
        raise ValueError(f"tar member {name!r}: declared {size} bytes, got {written}")
    if size % TAR_BLOCK:
        yield b"\0" * (TAR_BLOCK - size % TAR_BLOCK)


def write_metadata(
    archive: ZipStream,
    source: ExportSource,
    *,
    format_name: str,
    files: Callable[[int, ExportItem], Files],
) -> Iterator[None]:
    """`metadata.json` as a zip entry, written a record at a time."""
    with archive.open("metadata.json", compress=True) as entry:
        for piece in metadata_pieces(source, format_name=format_name, files=files):
            entry.write(piece)
            yield


def batches(items: Iterable[ExportItem], size: int) -> Iterator[list[ExportItem]]:
    batch: list[ExportItem] = []
    for item in items:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch
