"""Opaque cursors for keyset pagination."""

from __future__ import annotations

import base64
import json
from typing import Any

from service.problems import Problem

DEFAULT_LIMIT = 50
MAX_LIMIT = 200


def encode_cursor(values: list[Any]) -> str:
    raw = json.dumps(values, separators=(",", ":")).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_cursor(cursor: str, *, arity: int) -> list[Any]:
    """The values behind a cursor; a malformed cursor is the client's error (400)."""
    try:
        padded = cursor + "=" * (-len(cursor) % 4)
        values = json.loads(base64.urlsafe_b64decode(padded.encode()))
    except (ValueError, UnicodeDecodeError):
        raise Problem(
            400, "the cursor is not valid", errors=[{"field": "cursor", "message": "malformed"}]
        ) from None
    if not isinstance(values, list) or len(values) != arity:
        raise Problem(
            400, "the cursor is not valid", errors=[{"field": "cursor", "message": "malformed"}]
        )
    return values
