"""Opaque cursors for keyset pagination."""

from __future__ import annotations

import base64
import json
import uuid
from collections.abc import Callable, Sequence
from datetime import datetime
from typing import Any, TypeVar

from sqlalchemy import Select, and_, or_
from sqlalchemy.orm import InstrumentedAttribute

from service.problems import Problem

DEFAULT_LIMIT = 50
MAX_LIMIT = 200

R = TypeVar("R")
S = TypeVar("S", bound="Select[*tuple[Any, ...]]")


def invalid_cursor() -> Problem:
    return Problem(
        400, "the cursor is not valid", errors=[{"field": "cursor", "message": "malformed"}]
    )


def encode_cursor(values: list[Any]) -> str:
    raw = json.dumps(values, separators=(",", ":")).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_cursor(cursor: str, *, arity: int) -> list[Any]:
    """The values behind a cursor; a malformed cursor is the client's error (400)."""
    try:
        padded = cursor + "=" * (-len(cursor) % 4)
        values = json.loads(base64.urlsafe_b64decode(padded.encode()))
    except (ValueError, UnicodeDecodeError):
        raise invalid_cursor() from None
    if not isinstance(values, list) or len(values) != arity:
        raise invalid_cursor()
    return values


def newest_first(
    statement: S,
    *,
    created_at: InstrumentedAttribute[datetime],
    id_: InstrumentedAttribute[uuid.UUID],
    cursor: str | None,
    limit: int,
) -> S:
    """Order `statement` newest first (ties broken by id) and start after `cursor`.

    Fetches `limit + 1` rows, so `split_page` can tell whether another page follows.
    """
    if cursor is not None:
        raw_at, raw_id = decode_cursor(cursor, arity=2)
        try:
            after_at = datetime.fromisoformat(raw_at)
            after_id = uuid.UUID(raw_id)
        except (TypeError, ValueError):
            raise invalid_cursor() from None
        if after_at.tzinfo is None:
            raise invalid_cursor()
        statement = statement.where(
            or_(created_at < after_at, and_(created_at == after_at, id_ < after_id))
        )
    return statement.order_by(created_at.desc(), id_.desc()).limit(limit + 1)


def newest_first_cursor(created_at: datetime, id_: uuid.UUID) -> str:
    return encode_cursor([created_at.isoformat(), str(id_)])


def split_page(
    rows: Sequence[R], *, limit: int, cursor_after: Callable[[R], str]
) -> tuple[list[R], str | None]:
    """The first `limit` rows and the cursor of the next page (None when none follows)."""
    if len(rows) > limit:
        return list(rows[:limit]), cursor_after(rows[limit - 1])
    return list(rows), None
