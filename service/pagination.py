"""Opaque cursors for keyset pagination."""

from __future__ import annotations

import base64
import json
import uuid
from collections.abc import Callable, Sequence
from datetime import datetime
from typing import Any, TypeVar

from sqlalchemy import Select, and_, bindparam, or_
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
    after = newest_first_after(cursor)
    if after is not None:
        after_at, after_id = after
        statement = statement.where(
            or_(created_at < after_at, and_(created_at == after_at, id_ < after_id))
        )
    return statement.order_by(created_at.desc(), id_.desc()).limit(limit + 1)


def newest_first_bound(
    statement: S,
    *,
    created_at: InstrumentedAttribute[datetime],
    id_: InstrumentedAttribute[uuid.UUID],
    after: bool,
) -> S:
    """`newest_first` for a statement compiled once (a hot read): the cursor's values are the
    bind parameters `after_at` and `after_id` (when `after`), the row count `limit`
    (`newest_first_params` gives their values)."""
    if after:
        after_at = bindparam("after_at", type_=created_at.type)
        after_id = bindparam("after_id", type_=id_.type)
        statement = statement.where(
            or_(created_at < after_at, and_(created_at == after_at, id_ < after_id))
        )
    return statement.order_by(created_at.desc(), id_.desc()).limit(bindparam("limit"))


def newest_first_params(after: tuple[datetime, uuid.UUID] | None, limit: int) -> dict[str, Any]:
    """The values of `newest_first_bound`'s parameters for a page of `limit` after `after`."""
    if after is None:
        return {"after_at": None, "after_id": None, "limit": limit + 1}
    return {"after_at": after[0], "after_id": after[1], "limit": limit + 1}


def newest_first_after(cursor: str | None) -> tuple[datetime, uuid.UUID] | None:
    """The (created_at, id) a newest-first cursor points after; 400 for a malformed one."""
    if cursor is None:
        return None
    raw_at, raw_id = decode_cursor(cursor, arity=2)
    try:
        after_at = datetime.fromisoformat(raw_at)
        after_id = uuid.UUID(raw_id)
    except (TypeError, ValueError):
        raise invalid_cursor() from None
    if after_at.tzinfo is None:
        raise invalid_cursor()
    return after_at, after_id


def newest_first_cursor(created_at: datetime, id_: uuid.UUID) -> str:
    return encode_cursor([created_at.isoformat(), str(id_)])


def split_page(
    rows: Sequence[R], *, limit: int, cursor_after: Callable[[R], str]
) -> tuple[list[R], str | None]:
    """The first `limit` rows and the cursor of the next page (None when none follows)."""
    if len(rows) > limit:
        return list(rows[:limit]), cursor_after(rows[limit - 1])
    return list(rows), None
