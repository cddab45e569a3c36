"""Uploaded files as the business functions receive them, and their fingerprints."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class Upload:
    """One uploaded file: the name the client gave it, and its bytes."""

    filename: str
    data: bytes


def file_digests(uploads: Sequence[Upload]) -> list[list[str]]:
    """[name, sha256] per file: what an idempotency fingerprint records of uploaded files."""
    return [[u.filename, hashlib.sha256(u.data).hexdigest()] for u in uploads]


# What the last path part of a file name may not be: it would read as a folder reference.
_FOLDER_REFERENCES = ("", ".", "..")


def display_name(filename: str, *, fallback: str) -> str:
    """The name an uploaded file is shown and exported under: the last part of the client's
    file name (after `/` or `\\`), without control characters, at most 255 characters; or
    `fallback` when nothing usable is left ("", ".", "..")."""
    name = filename.replace("\\", "/").rsplit("/", 1)[-1]
    name = "".join(character for character in name if character.isprintable()).strip()[:255]
    return fallback if name in _FOLDER_REFERENCES else name
