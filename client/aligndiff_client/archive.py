"""Safe extraction of a downloaded dataset archive (zip, or tar for webdataset).

Every entry is checked before anything is written: an absolute path, a `..` component, a
symbolic or hard link, a device, FIFO or any other non-regular entry makes the whole archive
refused (`UnsafeArchive`). Files are then written by this code (never by `tarfile.extract`, whose
behaviour depends on the Python version), without the archive's permissions or owners.
"""

from __future__ import annotations

import re
import shutil
import stat
import tarfile
import zipfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import IO

from aligndiff_client.errors import UnsafeArchive

_DRIVE = re.compile(r"[A-Za-z]:")


@dataclass(frozen=True)
class _Entry:
    name: str
    is_dir: bool
    open: Callable[[], IO[bytes]]


def extract(archive: str | Path, dest: str | Path) -> list[Path]:
    """Extract a zip or tar archive into `dest` (created if missing); return the files written.

    Raises `UnsafeArchive` (and writes nothing) if any entry could land outside `dest` or is
    not a plain file or folder, and `ValueError` if the file is neither a zip nor a tar."""
    archive, dest = Path(archive), Path(dest)
    with _entries(archive) as entries:
        root = dest.resolve()
        targets = [(entry, _target(root, entry.name)) for entry in entries]
        for entry, target in targets:
            if target == root and not entry.is_dir:
                raise UnsafeArchive(f"refusing a file entry without a name ({entry.name!r})")
        _check_no_file_is_a_folder(root, targets)
        written = []
        for entry, target in targets:
            if entry.is_dir:
                target.mkdir(parents=True, exist_ok=True)
                continue
            target.parent.mkdir(parents=True, exist_ok=True)
            with entry.open() as source, target.open("wb") as out:
                shutil.copyfileobj(source, out)
            written.append(target)
    return written


def _check_no_file_is_a_folder(root: Path, targets: list[tuple[_Entry, Path]]) -> None:
    """Refuse an archive in which one path is both a file and a folder (`a` and `a/b`), which
    no extraction can honour."""
    folders = {target for entry, target in targets if entry.is_dir}
    for _, target in targets:
        folders.update(parent for parent in target.parents if parent.is_relative_to(root))
    for entry, target in targets:
        if not entry.is_dir and target in folders:
            raise UnsafeArchive(f"refusing {entry.name!r}: another entry makes it a folder")


@contextmanager
def _entries(archive: Path) -> Iterator[list[_Entry]]:
    if zipfile.is_zipfile(archive):
        with zipfile.ZipFile(archive) as zf:
            yield [_zip_entry(zf, info) for info in zf.infolist()]
    elif tarfile.is_tarfile(archive):
        with tarfile.open(archive) as tf:
            yield [_tar_entry(tf, member) for member in tf.getmembers()]
    else:
        raise ValueError(f"{archive} is neither a zip nor a tar archive")


def _zip_entry(zf: zipfile.ZipFile, info: zipfile.ZipInfo) -> _Entry:
    # The Unix mode, when the archive was made on Unix, sits in the high 16 bits; 0 means
    # "no type recorded" (a plain entry).
    kind = stat.S_IFMT(info.external_attr >> 16)
    if kind not in (0, stat.S_IFREG, stat.S_IFDIR):
        what = "a symbolic link" if kind == stat.S_IFLNK else "not a plain file"
        raise UnsafeArchive(f"refusing {info.filename!r}: {what}")
    return _Entry(info.filename, info.is_dir(), lambda: zf.open(info))


def _tar_entry(tf: tarfile.TarFile, member: tarfile.TarInfo) -> _Entry:
    if member.issym() or member.islnk():
        raise UnsafeArchive(f"refusing {member.name!r}: a link (to {member.linkname!r})")
    if not (member.isreg() or member.isdir()):
        raise UnsafeArchive(f"refusing {member.name!r}: not a plain file or folder")

    def open_member() -> IO[bytes]:
        source = tf.extractfile(member)
        if source is None:  # pragma: no cover - isreg() members always have a body
            raise UnsafeArchive(f"refusing {member.name!r}: no content")
        return source

    return _Entry(member.name, member.isdir(), open_member)


def _target(root: Path, name: str) -> Path:
    """Where entry `name` goes under `root`, or UnsafeArchive if it would go anywhere else."""
    # NOTE: backslashes count as separators too: a zip made on Windows may use them, and on
    # Windows `..\\x` is a parent reference.
    path = PurePosixPath(name.replace("\\", "/"))
    if path.is_absolute() or _DRIVE.match(path.as_posix()):
        raise UnsafeArchive(f"refusing {name!r}: an absolute path")
    if ".." in path.parts:
        raise UnsafeArchive(f"refusing {name!r}: a '..' component")
    target = root.joinpath(*path.parts)
    # A link already inside `dest` could still lead out; resolve and check.
    if not target.resolve().is_relative_to(root):
        raise UnsafeArchive(f"refusing {name!r}: it resolves outside {root}")
    return target
