"""Samples: a class's finalized synthetic samples, filtered and paged by index, and their
blobs."""

from __future__ import annotations

import functools
import uuid
from collections.abc import Callable
from typing import Any, Literal

from sqlalchemy import bindparam, select
from sqlalchemy.orm import Session

from service.auth import Principal
from service.contexts.access import owner_param, visible_to_any
from service.contexts.classes import visible_class_exists
from service.models import Sample, SegClass
from service.pagination import decode_cursor, encode_cursor, invalid_cursor, split_page
from service.problems import not_found
from service.reads import Query, ReadDatabase
from service.schemas import SamplePublic

# The absolute (image_url, mask_url) of a sample, built by the API from its own routes.
SampleUrls = Callable[[uuid.UUID], tuple[str, str]]


# The columns a listed sample needs, selected as plain tuples: no ORM identity map on a hot path.
_LISTED = (
    Sample.id, Sample.class_id, Sample.index, Sample.prompt, Sample.prompt_kind, Sample.seed,
    Sample.width, Sample.height, Sample.clip_score, Sample.shot_similarity,
    Sample.prototype_similarity, Sample.consensus_iou, Sample.ood_iou, Sample.accepted,
    Sample.rejected_by, Sample.accepted_by, Sample.mask_source, Sample.instances,
    Sample.reviewed_at, Sample.created_at,
)  # fmt: skip


# The fields of a listed sample, in `SamplePublic`'s order; the URLs are the API's.
_LISTED_NAMES = tuple(column.key for column in _LISTED)
_INDEX = _LISTED_NAMES.index("index")


@functools.cache
def _listing(*, admin: bool, after: bool, accepted: bool | None, min_clip: bool) -> Query:
    """The listing's statement for one combination of the filters given (compiled once
    each); bind parameters: class_id, owner_id, after, min_clip_score, limit."""
    # NOTE: keyset on the index (unique per class), so a page costs the same at any depth; the
    # owner check rides on the same query, and only an empty page costs a second one (to tell
    # "no such class" from "no samples").
    statement = (
        select(*_LISTED)
        .join(SegClass, SegClass.id == Sample.class_id)
        .where(
            Sample.class_id == bindparam("class_id"),
            Sample.finalized_at.is_not(None),
            visible_to_any(admin, SegClass.owner_id),
        )
    )
    if after:
        statement = statement.where(Sample.index > bindparam("after"))
    if accepted is not None:
        statement = statement.where(Sample.accepted.is_(accepted))
    if min_clip:
        statement = statement.where(Sample.clip_score >= bindparam("min_clip_score"))
    return statement.order_by(Sample.index).limit(bindparam("limit"))


async def list_samples(
    *,
    reads: ReadDatabase,
    principal: Principal,
    class_id: uuid.UUID,
    accepted: bool | None,
    min_clip_score: float | None,
    limit: int,
    cursor: str | None,
    urls: SampleUrls,
) -> dict[str, Any]:
    """A class's finalized samples in index order, optionally only those `accepted` (or not)
    and scoring at least `min_clip_score`, as a `Page[SamplePublic]`'s JSON fields. Samples
    still being worked on are not listed."""
    after = None
    if cursor is not None:
        (after,) = decode_cursor(cursor, arity=1)
        if not isinstance(after, int) or isinstance(after, bool):
            raise invalid_cursor()
    statement = _listing(
        admin=principal.is_admin,
        after=after is not None,
        accepted=accepted,
        min_clip=min_clip_score is not None,
    )
    params = {
        "class_id": class_id,
        "after": after,
        "min_clip_score": min_clip_score,
        "limit": limit + 1,
        **owner_param(principal),
    }
    found = await reads.rows(statement, params)
    if not found:
        await visible_class_exists(reads, principal, class_id)
    rows, next_cursor = split_page(
        found, limit=limit, cursor_after=lambda row: encode_cursor([row[_INDEX]])
    )
    return {"items": [_fields(row, urls) for row in rows], "next_cursor": next_cursor}


def sample_public(session: Session, sample_id: uuid.UUID, *, urls: SampleUrls) -> SamplePublic:
    """A sample as the API shows it, whoever owns it (the caller has checked who may see it);
    404 if there is no such sample."""
    row = session.execute(select(*_LISTED).where(Sample.id == sample_id)).one_or_none()
    if row is None:
        raise not_found("sample")
    # NOTE: built without validation: every value comes typed from the database.
    return SamplePublic.model_construct(**_fields(tuple(row), urls))


def _fields(row: tuple[Any, ...], urls: SampleUrls) -> dict[str, Any]:
    fields = dict(zip(_LISTED_NAMES, row, strict=True))
    fields["accepted"] = bool(fields["accepted"])
    fields["image_url"], fields["mask_url"] = urls(fields["id"])
    fields["created_at"] = fields.pop("created_at")  # last, as `SamplePublic` has it
    return fields


@functools.cache
def _blob_keys(*, admin: bool) -> Query:
    return (
        select(Sample.image_key, Sample.mask_key, Sample.index)
        .join(SegClass, SegClass.id == Sample.class_id)
        .where(
            Sample.id == bindparam("sample_id"),
            Sample.finalized_at.is_not(None),
            visible_to_any(admin, SegClass.owner_id),
        )
    )


async def sample_blob(
    *,
    reads: ReadDatabase,
    principal: Principal,
    sample_id: uuid.UUID,
    which: Literal["image", "mask"],
) -> tuple[str, int]:
    """The blob key of a finalized sample's image or final mask, and the sample's index."""
    statement = _blob_keys(admin=principal.is_admin)
    rows = await reads.rows(statement, {"sample_id": sample_id, **owner_param(principal)})
    if not rows:
        raise not_found("sample")
    image_key, mask_key, index = rows[0]
    key = image_key if which == "image" else mask_key
    if key is None:
        raise not_found(f"sample {which}")
    return key, index
