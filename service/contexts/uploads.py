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
