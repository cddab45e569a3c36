"""Dataset downloads: a class's real shots and finalized samples as a streamed archive (the
formats are in `service.export`), and what makes a download resumable.

A class's dataset can be downloaded once its synthesis job has succeeded: from then on its rows
and blobs no longer change, so the archive is a pure function of the class, the format and the
software versions. That gives a strong ETag, and lets a broken download resume: the archive is
generated again and the bytes already received skipped. Its total length, which a ranged
answer must state, is learned by generating it once (a complete download, or a measuring pass
when a range is asked for first) and remembered in blob storage under the class (it goes with
the class's blobs). A measuring pass that outlasts the client's patience still finishes and is
remembered, so the client's retry is answered at once.
"""

from __future__ import annotations

import hashlib
import json
import logging
import uuid
from collections.abc import Callable, Iterator
from dataclasses import astuple
from typing import Any

from sqlalchemy import Select, func, select
from sqlalchemy.orm import Session, sessionmaker

from aligndiff.names import inversion_token
from service.auth import Principal
from service.contexts.classes import visible_class
from service.export import (
    ExportClass,
    ExportFormat,
    ExportItem,
    ExportOptions,
    ExportSource,
    extension,
    media_type,
    software_versions,
    write_archive,
)
from service.models import Sample, SegClass
from service.models import Shot as ShotRow
from service.problems import Problem
from service.settings import Settings
from service.storage import BlobNotFound, Storage, class_key

log = logging.getLogger(__name__)

# Bump when a writer's output changes for the same inputs: every ETag changes with it.
# 2: webdataset is one tar of records (it was a tar of shard tars).
# 3: metadata.json names the class's deployment model (`class.model`).
EXPORT_REVISION = 3
# Samples read per query: the rows held in memory at once.
SAMPLE_BATCH = 256


class ExportChanged(RuntimeError):
    """The class's samples changed while its archive was being written (e.g. it was deleted)."""


class DatasetDownload:
    """A class's archive in one format, ready to be generated (as often as needed)."""

    def __init__(
        self,
        *,
        filename: str,
        media_type: str,
        etag: str,
        length: int | None,
        generate: Callable[[], Iterator[bytes]],
        remember_length: Callable[[int | None], None],
    ) -> None:
        self.filename = filename
        self.media_type = media_type
        self.etag = etag
        # The archive's total size, when known (it has been generated before).
        self.length = length
        self._generate = generate
        self._remember_length = remember_length

    def stream(self) -> Iterator[bytes]:
        """The archive's bytes, generated afresh; its length is remembered once it is done."""
        produced = 0
        for chunk in self._generate():
            produced += len(chunk)
            yield chunk
        if self.length is None:
            self._remember_length(produced)
        elif produced != self.length:
            # The archive should be the same bytes every time; forget the stale length.
            log.error(
                "archive %s is %d bytes, %d were remembered", self.etag, produced, self.length
            )
            self._remember_length(None)

    def measure(self) -> int:
        """The archive's total length: remembered, or found by generating it (and dropping
        the bytes)."""
        if self.length is None:
            self.length = sum(len(chunk) for chunk in self._generate())
            self._remember_length(self.length)
        return self.length


def prepare_download(
    *,
    session: Session,
    session_factory: sessionmaker[Session],
    storage: Storage,
    settings: Settings,
    principal: Principal,
    class_id: uuid.UUID,
    export_format: ExportFormat,
    accepted_only: bool,
) -> DatasetDownload:
    """A class's dataset in `export_format`: its real shots (always) and its finalized samples
    (only the accepted ones with `accepted_only`), shots first, samples in index order.

    404 unless `principal` may see the class; 409 unless its synthesis job has succeeded.
    """
    seg_class, job = visible_class(session, principal, class_id)
    status = job.status if job is not None else "queued"
    if job is None or status != "succeeded":
        raise Problem(
            409,
            f"the class's synthesis job is {status}; its dataset can be downloaded once the "
            "job has succeeded",
        )
    samples = _samples(class_id, accepted_only=accepted_only)
    num_samples, last_finalized = (
        session.execute(samples.with_only_columns(func.count(), func.max(Sample.finalized_at)))
        .tuples()
        .one()
    )
    shots = [
        _shot_item(shot)
        for shot in session.execute(
            select(ShotRow).where(ShotRow.class_id == class_id).order_by(ShotRow.position)
        ).scalars()
    ]
    options = ExportOptions()
    state = [
        EXPORT_REVISION,
        software_versions(),
        astuple(options),
        export_format,
        accepted_only,
        str(class_id),
        seg_class.updated_at.isoformat(),
        str(job.id),
        job.finished_at.isoformat() if job.finished_at else None,
        len(shots),
        num_samples,
        last_finalized.isoformat() if last_finalized else None,
    ]
    digest = hashlib.sha256(json.dumps(state).encode()).hexdigest()[:32]
    source = ExportSource(
        seg_class=_export_class(seg_class, default_model=settings.default_model),
        accepted_only=accepted_only,
        num_shots=len(shots),
        num_samples=num_samples,
        items=lambda: _items(session_factory, shots, samples, expected=num_samples),
        read=storage.get,
    )
    filename = f"{inversion_token(seg_class.name).strip('<>')}-{export_format}"
    # NOTE: the archive is streamed long after this returns, a batch of samples per short
    # session of its own: the request's transaction ends here, so a slow client holds no
    # database connection.
    session.rollback()
    length_key = class_key(class_id, f"exports/{digest}.length")
    return DatasetDownload(
        filename=f"{filename}.{extension(export_format)}",
        media_type=media_type(export_format),
        etag=f'"{digest}"',
        length=_remembered_length(storage, length_key),
        generate=lambda: write_archive(export_format, source, options),
        remember_length=lambda length: _remember_length(storage, length_key, length),
    )


def _samples(class_id: uuid.UUID, *, accepted_only: bool) -> Select[*tuple[Any, ...]]:
    """The exported samples of a class: finalized ones, accepted ones only if asked."""
    statement = select(
        Sample.index, Sample.prompt, Sample.prompt_kind, Sample.seed, Sample.width,
        Sample.height, Sample.image_key, Sample.mask_key, Sample.clip_score,
        Sample.shot_similarity, Sample.consensus_iou, Sample.ood_iou, Sample.accepted,
        Sample.mask_source,
    ).where(
        Sample.class_id == class_id,
        Sample.finalized_at.is_not(None),
        Sample.mask_key.is_not(None),
    )  # fmt: skip
    if accepted_only:
        statement = statement.where(Sample.accepted.is_(True))
    return statement


def _items(
    session_factory: sessionmaker[Session],
    shots: list[ExportItem],
    samples: Select[*tuple[Any, ...]],
    *,
    expected: int,
) -> Iterator[ExportItem]:
    """The shots, then the samples by index, read in batches (keyset on the index)."""
    yield from shots
    seen, after = 0, -1
    while True:
        with session_factory() as session:
            rows = session.execute(
                samples.where(Sample.index > after).order_by(Sample.index).limit(SAMPLE_BATCH)
            ).all()
        seen += len(rows)
        if seen > expected:
            break
        for row in rows:
            yield _sample_item(row)
        if len(rows) < SAMPLE_BATCH:
            break
        after = rows[-1]._mapping["index"]
    if seen != expected:
        raise ExportChanged(f"expected {expected} samples, found {seen}")


def _export_class(seg_class: SegClass, *, default_model: str) -> ExportClass:
    return ExportClass(
        id=str(seg_class.id),
        name=seg_class.name,
        token=seg_class.token,
        seed=seg_class.seed,
        prompts=list(seg_class.prompts),
        model_ids=dict(seg_class.model_ids),
        created_at=seg_class.created_at,
        model=seg_class.model or default_model,
    )


def _shot_item(shot: ShotRow) -> ExportItem:
    return ExportItem(
        name=f"shot_{shot.position:02d}",
        source="shot",
        width=shot.width,
        height=shot.height,
        image_key=shot.image_key,
        mask_key=shot.mask_key,
        position=shot.position,
        filename=shot.filename,
    )


def _sample_item(row: Any) -> ExportItem:
    return ExportItem(
        name=f"sample_{row.index:05d}",
        source="synthetic",
        width=row.width,
        height=row.height,
        image_key=row.image_key,
        mask_key=row.mask_key,
        index=row.index,
        prompt=row.prompt,
        prompt_kind=row.prompt_kind,
        seed=row.seed,
        scores={
            "clip_score": row.clip_score,
            "shot_similarity": row.shot_similarity,
            "consensus_iou": row.consensus_iou,
            "ood_iou": row.ood_iou,
        },
        accepted=bool(row.accepted),
        mask_source=row.mask_source,
    )


def _remembered_length(storage: Storage, key: str) -> int | None:
    try:
        text = storage.get(key).decode()
    except BlobNotFound:
        return None
    return int(text) if text.isdigit() else None


def _remember_length(storage: Storage, key: str, length: int | None) -> None:
    """Remember (or, with None, forget) an archive's length; a failure only costs a later
    resume a measuring pass, so it is logged, never raised."""
    # NOTE: forgotten by writing nothing (the store has no single-blob delete).
    data = b"" if length is None else str(length).encode()
    try:
        storage.put(key, data, content_type="text/plain")
    except Exception:
        log.warning("could not record the length of archive %s", key, exc_info=True)
