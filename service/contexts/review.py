"""Review: a person's verdict on a finished sample, and a mask they drew to replace its own.

A reviewer's word overrides the acceptance filters: the sample's `accepted` becomes theirs,
with `accepted_by` "user" (and `rejected_by` "user" when rejected), and what follows the
verdict follows it too: the class's `num_accepted` (in the same transaction), `accepted_only`
datasets and trainings. A replaced mask is checked as a shot's mask is at upload and stored as
the pipeline stores final masks (a 0/255 PNG), under the sample's own prefix, before the row
names it; the row then says `mask_source` "human". Only finished samples can be reviewed.
"""

from __future__ import annotations

import logging
import uuid
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import func, select, update
from sqlalchemy.orm import Session

from aligndiff.instances import count_instances
from aligndiff.masks import BoolMask, mask_to_image
from aligndiff.shots import ShotError, ShotFormatError, decode_mask
from service.auth import Principal
from service.contexts.access import visible_to
from service.contexts.samples import SampleUrls, sample_public
from service.contexts.thumbnails import HUMAN, forget_sample_thumbnails, mask_version
from service.contexts.uploads import Upload
from service.db import db_now
from service.models import Sample, SegClass, utcnow
from service.problems import Problem, not_found
from service.schemas import SamplePublic, SampleReview
from service.settings import Settings
from service.storage import Storage, png_bytes, sample_key

log = logging.getLogger(__name__)

PNG = "image/png"
REVIEWER = "user"
MASK_FIELD = "mask"


@dataclass(frozen=True)
class Reviewed:
    """A sample after its review, and its class's accepted samples then."""

    sample: SamplePublic
    num_accepted: int


@dataclass(frozen=True)
class _Target:
    """The finished sample a review is about."""

    class_id: uuid.UUID
    index: int
    width: int
    height: int
    mask_key: str | None
    mask_source: str | None


# A mask a reviewer drew is stored as `classes/<id>/samples/<n>/mask-<random hex>.png`.
HUMAN_MASK_PREFIX = "mask-"


def superseded_human_mask(
    key: str, *, mask_key: str | None, reviewed_at: datetime | None, before: datetime
) -> bool:
    """Whether `key`, a blob of a sample whose row names `mask_key` and was last reviewed at
    `reviewed_at`, is a mask a reviewer drew that a later one replaced before `before`: no
    export or training that read the row before the replacement still reads it then."""
    name = key.rsplit("/", 1)[-1]
    return (
        name.startswith(HUMAN_MASK_PREFIX)
        and key != mask_key
        and reviewed_at is not None
        and reviewed_at < before
    )


def review_sample(
    *,
    session: Session,
    principal: Principal,
    sample_id: uuid.UUID,
    review_in: SampleReview,
    urls: SampleUrls,
) -> Reviewed:
    """Record a reviewer's verdict on a finished sample of a class `principal` may see (else
    404) and recount the class's accepted samples, in one transaction."""
    target = _finished_sample(session, principal, sample_id)
    accepted = review_in.accepted
    _lock_class(session, target.class_id)
    _update_finished(
        session,
        sample_id,
        accepted=accepted,
        accepted_by=REVIEWER,
        rejected_by=None if accepted else REVIEWER,
        reviewed_at=db_now(),
    )
    num_accepted = _recount_accepted(session, target.class_id)
    session.commit()
    return Reviewed(sample_public(session, sample_id, urls=urls), num_accepted)


def replace_mask(
    *,
    session: Session,
    storage: Storage,
    settings: Settings,
    principal: Principal,
    sample_id: uuid.UUID,
    mask: Upload,
    urls: SampleUrls,
) -> SamplePublic:
    """Replace a finished sample's mask with `mask`, checked as a shot's mask is (a PNG of the
    sample's size with foreground and background: else 422, or 415 for a file that is not a
    PNG). Its objects are counted again. The old mask blob stays: an export or a training
    that read the row before may still be reading it. (The pipeline's own mask is kept for
    good; a replaced mask a reviewer drew goes with the sweeper's orphans once the sample was
    last reviewed `orphan_grace_seconds` ago: `superseded_human_mask`.)"""
    target = _finished_sample(session, principal, sample_id)
    # NOTE: decoding and storing take a while; the connection goes back to the pool meanwhile
    # rather than sit idle in a transaction.
    session.rollback()
    decoded = _decode(mask, width=target.width, height=target.height)
    instances = count_instances(decoded, min_area=settings.instance_min_area)
    key = sample_key(target.class_id, target.index, f"{HUMAN_MASK_PREFIX}{uuid.uuid4().hex}.png")
    storage.put(key, png_bytes(mask_to_image(decoded)), content_type=PNG)
    try:
        _lock_class(session, target.class_id)
        _update_finished(
            session,
            sample_id,
            mask_key=key,
            mask_source=HUMAN,
            instances=instances,
            reviewed_at=db_now(),
        )
        session.commit()
    except BaseException:
        session.rollback()
        _delete_quietly(storage, key)
        raise
    if target.mask_key is not None:
        old = mask_version(target.mask_key, target.mask_source)
        forget_sample_thumbnails(storage, target.class_id, target.index, version=old)
    return sample_public(session, sample_id, urls=urls)


def _finished_sample(session: Session, principal: Principal, sample_id: uuid.UUID) -> _Target:
    """The finished sample, or 404 unless `principal` may see its class (as for its blobs)."""
    row = session.execute(
        select(
            Sample.class_id,
            Sample.index,
            Sample.width,
            Sample.height,
            Sample.mask_key,
            Sample.mask_source,
        )
        .join(SegClass, SegClass.id == Sample.class_id)
        .where(
            Sample.id == sample_id,
            Sample.finalized_at.is_not(None),
            visible_to(principal, SegClass.owner_id),
        )
    ).one_or_none()
    if row is None:
        raise not_found("sample")
    return _Target(*row)


def _lock_class(session: Session, class_id: uuid.UUID) -> None:
    """Take the class's lock until the transaction ends, and mark the class changed (its
    datasets' ETags change with it).

    NOTE: an UPDATE, taken before the sample's: PostgreSQL locks the class's row, so two
    reviews of one class count its accepted samples one after the other (each sees the
    other's verdict), and in the order a class deletion takes them; SQLite takes its
    database write lock.
    """
    session.execute(
        update(SegClass)
        .where(SegClass.id == class_id)
        .values(updated_at=utcnow())
        .execution_options(synchronize_session=False)
    )


def _update_finished(session: Session, sample_id: uuid.UUID, **values: object) -> None:
    """Set `values` on the finished sample; 404 if it is gone (its class was deleted since)."""
    result = session.execute(
        update(Sample)
        .where(Sample.id == sample_id, Sample.finalized_at.is_not(None))
        .values(**values)
        .execution_options(synchronize_session=False)
    )
    if not result.rowcount:  # type: ignore[attr-defined]
        raise not_found("sample")


def _recount_accepted(session: Session, class_id: uuid.UUID) -> int:
    """Set the class's `num_accepted` to its finished samples accepted now; return it."""
    accepted = session.execute(
        select(func.count()).where(
            Sample.class_id == class_id,
            Sample.finalized_at.is_not(None),
            Sample.accepted.is_(True),
        )
    ).scalar_one()
    session.execute(
        update(SegClass)
        .where(SegClass.id == class_id)
        .values(num_accepted=accepted)
        .execution_options(synchronize_session=False)
    )
    return int(accepted)


def _decode(mask: Upload, *, width: int, height: int) -> BoolMask:
    """The uploaded mask's foreground, checked by the rules of a shot's mask."""
    try:
        return decode_mask(mask.data, source=MASK_FIELD, size=(width, height))
    except ShotFormatError as error:
        raise Problem(
            415,
            "the mask is not of an accepted type: a mask must be a PNG",
            errors=[{"field": error.source, "message": error.detail}],
        ) from None
    except ShotError as error:
        raise Problem(
            422,
            "the mask is not valid",
            errors=[{"field": error.source, "message": error.detail}],
        ) from None


def _delete_quietly(storage: Storage, key: str) -> None:
    try:
        storage.delete_keys([key])
    except Exception:
        log.exception("could not delete blob %s, which no row names", key)
