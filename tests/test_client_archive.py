"""Extracting a downloaded archive: a good zip or tar is unpacked; one with an entry that could
write outside the target folder (or is not a plain file) is refused whole."""

from __future__ import annotations

import io
import stat
import tarfile
import zipfile
from collections.abc import Callable
from pathlib import Path

import pytest

from aligndiff_client import UnsafeArchive, extract

FILES = {"images/0001.png": b"\x89PNG image", "masks/0001.png": b"\x89PNG mask", "README": b"hi"}


def make_zip(path: Path, entries: list[zipfile.ZipInfo | str] | None = None) -> Path:
    with zipfile.ZipFile(path, "w") as zf:
        for name, data in FILES.items():
            zf.writestr(name, data)
        for entry in entries or []:
            zf.writestr(entry, b"payload")
    return path


def zip_entry(name: str, mode: int) -> zipfile.ZipInfo:
    info = zipfile.ZipInfo(name)
    info.external_attr = mode << 16
    return info


def make_tar(path: Path, entries: list[tarfile.TarInfo] | None = None) -> Path:
    with tarfile.open(path, "w") as tf:
        for name, data in FILES.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
        for entry in entries or []:
            payload = b"payload" if entry.isreg() else b""
            entry.size = len(payload)
            tf.addfile(entry, io.BytesIO(payload))
    return path


def tar_entry(name: str, kind: bytes = tarfile.REGTYPE, linkname: str = "") -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type, info.linkname = kind, linkname
    return info


@pytest.mark.parametrize("make", [make_zip, make_tar], ids=["zip", "tar"])
def test_a_good_archive_is_extracted(make: Callable[[Path], Path], tmp_path: Path) -> None:
    archive = make(tmp_path / "dataset")

    written = extract(archive, tmp_path / "out")

    assert sorted(p.relative_to(tmp_path / "out").as_posix() for p in written) == sorted(FILES)
    for name, data in FILES.items():
        assert (tmp_path / "out" / name).read_bytes() == data


UNSAFE_ZIP_ENTRIES = {
    "parent": "../evil",
    "nested-parent": "images/../../evil",
    "windows-parent": "..\\evil",
    "absolute": "/tmp/abs-evil",
    "drive": "C:/evil",
    "symlink": zip_entry("images/link", stat.S_IFLNK | 0o777),
    "device": zip_entry("dev", stat.S_IFCHR | 0o600),
    "fifo": zip_entry("fifo", stat.S_IFIFO | 0o600),
}

UNSAFE_TAR_ENTRIES = {
    "parent": tar_entry("../evil"),
    "nested-parent": tar_entry("images/../../evil"),
    "absolute": tar_entry("/tmp/abs-evil"),
    "symlink": tar_entry("images/link", tarfile.SYMTYPE, "/etc/passwd"),
    "relative-symlink": tar_entry("link", tarfile.SYMTYPE, "images"),
    "hardlink": tar_entry("images/hard", tarfile.LNKTYPE, "/etc/passwd"),
    "device": tar_entry("dev", tarfile.CHRTYPE),
    "fifo": tar_entry("fifo", tarfile.FIFOTYPE),
}


@pytest.mark.parametrize("entry", UNSAFE_ZIP_ENTRIES.values(), ids=UNSAFE_ZIP_ENTRIES.keys())
def test_an_unsafe_zip_entry_refuses_the_whole_zip(
    entry: zipfile.ZipInfo | str, tmp_path: Path
) -> None:
    archive = make_zip(tmp_path / "dataset.zip", [entry])
    out = tmp_path / "deep" / "out"

    with pytest.raises(UnsafeArchive, match="refusing"):
        extract(archive, out)

    assert not out.exists() and not (tmp_path / "deep" / "evil").exists()


@pytest.mark.parametrize("entry", UNSAFE_TAR_ENTRIES.values(), ids=UNSAFE_TAR_ENTRIES.keys())
def test_an_unsafe_tar_entry_refuses_the_whole_tar(entry: tarfile.TarInfo, tmp_path: Path) -> None:
    archive = make_tar(tmp_path / "dataset.tar", [entry])
    out = tmp_path / "deep" / "out"

    with pytest.raises(UnsafeArchive, match="refusing"):
        extract(archive, out)

    assert not out.exists() and not (tmp_path / "deep" / "evil").exists()


def test_an_entry_through_a_link_already_in_the_target_is_refused(tmp_path: Path) -> None:
    # given: the target folder holds a link that leads out of it
    out = tmp_path / "out"
    out.mkdir()
    (out / "images").symlink_to(tmp_path / "elsewhere", target_is_directory=True)
    archive = make_zip(tmp_path / "dataset.zip")

    with pytest.raises(UnsafeArchive, match="resolves outside"):
        extract(archive, out)
    assert not (tmp_path / "elsewhere").exists()


def test_a_file_that_is_no_archive_is_a_value_error(tmp_path: Path) -> None:
    junk = tmp_path / "junk.zip"
    junk.write_bytes(b"not an archive at all")

    with pytest.raises(ValueError, match="neither a zip nor a tar"):
        extract(junk, tmp_path / "out")
