"""Blob storage: one interface, a local folder or S3. Keys are derived from ids."""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import uuid
from collections.abc import Iterator, Sequence
from contextlib import suppress
from dataclasses import dataclass
from datetime import UTC, datetime
from io import BytesIO
from pathlib import Path, PurePosixPath
from typing import BinaryIO, Protocol
from urllib.parse import urlparse

from PIL import Image

log = logging.getLogger(__name__)


class BlobNotFound(KeyError):
    """No blob under that key."""


class StorageUnavailable(RuntimeError):
    """The blob store cannot be reached."""


@dataclass(frozen=True)
class BlobInfo:
    """A stored blob's key and when it was last written (what tells an in-flight upload, whose
    row is not committed yet, from an orphan)."""

    key: str
    modified_at: datetime


class Storage(Protocol):
    def put(self, key: str, data: bytes, *, content_type: str) -> None: ...

    def get(self, key: str) -> bytes: ...

    def iter_chunks(self, key: str, chunk_size: int = 1 << 20) -> Iterator[bytes]: ...

    def exists(self, key: str) -> bool: ...

    def delete_prefix(self, prefix: str) -> int: ...

    def list_keys(self, prefix: str) -> Iterator[str]:
        """The keys under `prefix`, streamed (never all held at once), the keys under any one
        folder together (S3 lists in key order; the local store walks folder by folder)."""
        ...

    def list_blobs(self, prefix: str) -> Iterator[BlobInfo]:
        """The blobs under `prefix` (a whole folder, as `list_keys`), with their write times."""
        ...

    def delete_keys(self, keys: Sequence[str]) -> int:
        """Delete these blobs (a missing one is no error); returns how many were asked."""
        ...

    def presigned_url(self, key: str, *, expires_seconds: int) -> str | None:
        """A time-limited GET URL, or None when blobs are served by the API itself."""
        ...

    def check(self) -> None:
        """Raise StorageUnavailable unless the store is reachable and writable."""
        ...


def validate_key(key: str) -> str:
    """Keys are relative POSIX paths without '..', '.' or empty parts."""
    path = PurePosixPath(key)
    if not key or path.is_absolute() or any(p in ("", ".", "..") for p in key.split("/")):
        raise ValueError(f"invalid blob key {key!r}")
    return key


# Keys: derived from ids, so a retried task writes the same key, never a second copy.
def class_prefix(class_id: uuid.UUID) -> str:
    return f"classes/{class_id}/"


def shot_key(class_id: uuid.UUID, position: int, name: str) -> str:
    return f"{class_prefix(class_id)}shots/{position:02d}/{name}"


def sample_key(class_id: uuid.UUID, index: int, name: str) -> str:
    return f"{class_prefix(class_id)}samples/{index:05d}/{name}"


def class_key(class_id: uuid.UUID, name: str) -> str:
    return f"{class_prefix(class_id)}{name}"


def training_prefix(training_id: uuid.UUID) -> str:
    return f"trainings/{training_id}/"


def training_key(training_id: uuid.UUID, name: str) -> str:
    return f"{training_prefix(training_id)}{name}"


# A folder where a blob was asked for, or a blob where a folder would be: no blob either way.
_NOT_A_BLOB = (FileNotFoundError, IsADirectoryError, NotADirectoryError)


def png_bytes(image: Image.Image) -> bytes:
    """An image encoded as PNG, ready for `Storage.put`."""
    buffer = BytesIO()
    # NOTE: zlib level 1, not Pillow's 6: a 489x366 photo encodes in 11 ms instead of 33 ms
    # for 6 % more bytes (photos barely compress; masks shrink as well either way). Encoding
    # was the largest CPU cost of an upload under the mixed load test (bench/RESULTS.md).
    image.save(buffer, format="PNG", compress_level=1)
    return buffer.getvalue()


def delete_prefix_quietly(storage: Storage, prefix: str) -> None:
    """Delete the blobs under `prefix`; a failure is logged, never raised (it must not hide the
    error or the outcome that led here)."""
    try:
        storage.delete_prefix(prefix)
    except Exception:
        log.exception("could not delete blobs: they remain under %s", prefix)


class LocalStorage:
    """Blobs as files under a root folder; writes are atomic (temporary file, then rename)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.root.mkdir(parents=True, exist_ok=True)

    def _path(self, key: str) -> Path:
        return self.root / validate_key(key)

    def put(self, key: str, data: bytes, *, content_type: str) -> None:
        path = self._path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".put-", dir=path.parent)
        try:
            with os.fdopen(fd, "wb") as handle:
                handle.write(data)
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    def get(self, key: str) -> bytes:
        try:
            return self._path(key).read_bytes()
        except _NOT_A_BLOB:
            raise BlobNotFound(key) from None

    def iter_chunks(self, key: str, chunk_size: int = 1 << 20) -> Iterator[bytes]:
        # NOTE: not a generator itself, so a missing blob raises here (a 404 can still be
        # answered) rather than on the first chunk, after a streamed response has begun.
        try:
            handle = self._path(key).open("rb")
        except _NOT_A_BLOB:
            raise BlobNotFound(key) from None
        return self._read_chunks(handle, chunk_size)

    @staticmethod
    def _read_chunks(handle: BinaryIO, chunk_size: int) -> Iterator[bytes]:
        with handle:
            while chunk := handle.read(chunk_size):
                yield chunk

    def exists(self, key: str) -> bool:
        return self._path(key).is_file()

    def list_keys(self, prefix: str) -> Iterator[str]:
        if prefix:
            validate_key(prefix.removesuffix("/"))
        base = self.root / prefix if prefix else self.root
        yield from self._walk(base)

    def _walk(self, folder: Path) -> Iterator[str]:
        """Files under `folder`, depth first in name order: the order of sorted paths, holding
        one folder's listing at a time. A folder deleted meanwhile lists nothing."""
        try:
            with os.scandir(folder) as scan:
                entries = sorted(scan, key=lambda entry: entry.name)
        except (FileNotFoundError, NotADirectoryError):
            return
        for entry in entries:
            if entry.is_dir(follow_symlinks=False):
                yield from self._walk(Path(entry.path))
            elif entry.is_file(follow_symlinks=False) and not entry.name.startswith(".put-"):
                yield Path(entry.path).relative_to(self.root).as_posix()

    def list_blobs(self, prefix: str) -> Iterator[BlobInfo]:
        for key in self.list_keys(prefix):
            with suppress(FileNotFoundError):  # deleted since it was listed
                mtime = (self.root / key).stat().st_mtime
                yield BlobInfo(key, datetime.fromtimestamp(mtime, UTC))

    def delete_keys(self, keys: Sequence[str]) -> int:
        for key in keys:
            self._path(key).unlink(missing_ok=True)
        return len(keys)

    def delete_prefix(self, prefix: str) -> int:
        validate_key(prefix.rstrip("/"))
        base = self.root / prefix
        count = sum(1 for _ in self.list_keys(prefix))
        shutil.rmtree(base, ignore_errors=True)
        return count

    def presigned_url(self, key: str, *, expires_seconds: int) -> str | None:
        return None

    def check(self) -> None:
        # NOTE: a probe name of its own per call (two processes may check at once), and the
        # temporary-file prefix, so list_keys never reports it.
        try:
            fd, probe = tempfile.mkstemp(prefix=".put-ready-", dir=self.root)
            with os.fdopen(fd, "wb") as handle:
                handle.write(b"ok")
            Path(probe).unlink()
        except OSError as error:
            raise StorageUnavailable(str(error)) from error


def make_storage(
    url: str,
    *,
    endpoint_url: str | None = None,
    region: str = "us-east-1",
    public_endpoint_url: str | None = None,
) -> Storage:
    """`file:///path` → LocalStorage; `s3://bucket/prefix` → S3Storage, whose presigned URLs
    name `public_endpoint_url` when given (else `endpoint_url`)."""
    parsed = urlparse(url)
    if parsed.scheme == "file":
        # `file://data/blobs` (a relative folder) parses as host "data", path "/blobs": keep
        # the host as the path's first part rather than silently writing to `/blobs`.
        host = parsed.netloc if parsed.netloc not in ("", "localhost") else ""
        return LocalStorage(Path(host + parsed.path))
    if parsed.scheme == "s3":
        from service.s3 import S3Storage

        return S3Storage(
            bucket=parsed.netloc,
            prefix=parsed.path.lstrip("/"),
            endpoint_url=endpoint_url,
            region=region,
            public_endpoint_url=public_endpoint_url,
        )
    raise ValueError(f"unsupported storage URL {url!r}: use file://… or s3://bucket/prefix")
