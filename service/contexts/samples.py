"""Samples: a class's finalized synthetic samples, filtered and paged by index, and their
blobs."""

from __future__ import annotations

import uuid
from collections.abc import Callable
from typing import Any, Literal

from sqlalchemy import Row, select
from sqlalchemy.orm import Session

from service.auth import Principal
from service.contexts.access import visible_to
from service.contexts.classes import visible_class_id
from service.models import Sample, SegClass
from service.pagination import decode_cursor, encode_cursor, invalid_cursor, split_page
from service.problems import not_found
from service.schemas import Page, SamplePublic

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


def list_samples(
    *,
    session: Session,
    principal: Principal,
    class_id: uuid.UUID,
    accepted: bool | None,
    min_clip_score: float | None,
    limit: int,
    cursor: str | None,
    urls: SampleUrls,
) -> Page[SamplePublic]:
    """A class's finalized samples in index order, optionally only those `accepted` (or not)
    and scoring at least `min_clip_score`. Samples still being worked on are not listed."""
    # NOTE: keyset on the index (unique per class), so a page costs the same at any depth; the
    # owner check rides on the same query, and only an empty page costs a second one (to tell
    # "no such class" from "no samples").
    statement = (
        select(*_LISTED)
        .join(SegClass, SegClass.id == Sample.class_id)
        .where(
            Sample.class_id == class_id,
            Sample.finalized_at.is_not(None),
            visible_to(principal, SegClass.owner_id),
        )
    )
    if cursor is not None:
        (after,) = decode_cursor(cursor, arity=1)
        if not isinstance(after, int) or isinstance(after, bool):
            raise invalid_cursor()
        statement = statement.where(Sample.index > after)
    if accepted is not None:
        statement = statement.where(Sample.accepted.is_(accepted))
    if min_clip_score is not None:
        statement = statement.where(Sample.clip_score >= min_clip_score)
    statement = statement.order_by(Sample.index).limit(limit + 1)
    found = session.execute(statement).all()
    if not found:
        visible_class_id(session, principal, class_id)
    rows, next_cursor = split_page(
        found, limit=limit, cursor_after=lambda row: encode_cursor([row.index])
    )
    items = [_public(row, urls) for row in rows]
    return Page[SamplePublic].model_construct(items=items, next_cursor=next_cursor)


def sample_public(session: Session, sample_id: uuid.UUID, *, urls: SampleUrls) -> SamplePublic:
    """A sample as the API shows it, whoever owns it (the caller has checked who may see it);
    404 if there is no such sample."""
    row = session.execute(select(*_LISTED).where(Sample.id == sample_id)).one_or_none()
    if row is None:
        raise not_found("sample")
    return _public(row, urls)


def _public(row: Row[*tuple[Any, ...]], urls: SampleUrls) -> SamplePublic:
    # NOTE: built without validation: every value comes typed from the database.
    fields = row._asdict()
    fields["accepted"] = bool(fields["accepted"])
    fields["image_url"], fields["mask_url"] = urls(row.id)
    return SamplePublic.model_construct(**fields)


def sample_blob(
    *,
    session: Session,
    principal: Principal,
    sample_id: uuid.UUID,
    which: Literal["image", "mask"],
) -> tuple[str, int]:
    """The blob key of a finalized sample's image or final mask, and the sample's index."""
    row = (
        session.execute(
            select(Sample.image_key, Sample.mask_key, Sample.index)
            .join(SegClass, SegClass.id == Sample.class_id)
            .where(
                Sample.id == sample_id,
                Sample.finalized_at.is_not(None),
                visible_to(principal, SegClass.owner_id),
            )
        )
        .tuples()
        .one_or_none()
    )
    if row is None:
        raise not_found("sample")
    image_key, mask_key, index = row
    key = image_key if which == "image" else mask_key
    if key is None:
        raise not_found(f"sample {which}")
    return key, index
