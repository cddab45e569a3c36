"""Dataset downloads: the real shots and finalized samples of one class, or of several in one
archive, streamed (the formats are in `service.export`), and what makes a download resumable.

A class's dataset can be downloaded once its synthesis job has succeeded: from then on its rows
and blobs change only when a reviewer changes a sample's verdict or mask, which stamps the
sample's `reviewed_at`. So the archive is a pure function of the classes, their samples' last
finalization and review, the options and the software versions. That gives a strong ETag, and
lets a broken download resume: the archive is generated again and the bytes already received
skipped. Its total length, which a ranged answer must state, is learned by generating it once (a
complete download, or a measuring pass when a range is asked for first) and remembered in blob
storage under the (first) class (it goes with the class's blobs). A measuring pass that outlasts
the client's patience still finishes and is remembered, so the client's retry is answered at
once.
"""

from __future__ import annotations

import hashlib
import json
import logging
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import astuple, dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import Select, func, select
from sqlalchemy.orm import Session, sessionmaker

from aligndiff.names import inversion_token
from service.auth import Principal
from service.contexts.access import visible_to
from service.contexts.classes import visible_class
from service.export import (
    NO_VAL,
    VAL_FORMS,
    ExportClass,
    ExportFormat,
    ExportItem,
    ExportOptions,
    ExportSource,
    ValSplit,
    extension,
    media_type,
    software_versions,
    write_archive,
)
from service.models import Job, Sample, SegClass
from service.models import Shot as ShotRow
from service.problems import Problem
from service.settings import Settings
from service.storage import BlobNotFound, Storage, class_key

log = logging.getLogger(__name__)

# Bump when a writer's output changes for the same inputs: every ETag changes with it.
# 2: webdataset is one tar of records (it was a tar of shard tars).
# 3: metadata.json names the class's deployment model (`class.model`).
# 4: COCO writes one annotation per instance (connected object); records carry their label,
#    split, instances, id and accepted_by; metadata.json lists `classes` and the `val` option;
#    archives may hold several classes and a validation split; the yolo format.
# 5: classes that share a name get labels of their own names (`<name>-<label>`); hf writes no
#    file for an empty split.
EXPORT_REVISION = 5
# Longest file name stem made of the classes' names; past it: "<first>-and-<n>-more".
MAX_FILENAME_STEM = 80
# Samples read per query: the rows held in memory at once.
SAMPLE_BATCH = 256


class ExportChanged(RuntimeError):
    """A class's samples changed while its archive was being written (e.g. it was deleted)."""


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


def prepare_class_download(
    *,
    session: Session,
    session_factory: sessionmaker[Session],
    storage: Storage,
    settings: Settings,
    principal: Principal,
    class_id: uuid.UUID,
    export_format: ExportFormat,
    accepted_only: bool,
    val: ValSplit = NO_VAL,
) -> DatasetDownload:
    """A class's dataset in `export_format`: its real shots (always) and its finalized samples
    (only the accepted ones with `accepted_only`), shots first, samples in index order, each
    in the split `val` puts it in.

    404 unless `principal` may see the class; 409 unless its synthesis job has succeeded.
    """
    seg_class, job = visible_class(session, principal, class_id)
    if job is None or job.status != "succeeded":
        status = job.status if job is not None else "queued"
        raise Problem(
            409,
            f"the class's synthesis job is {status}; its dataset can be downloaded once the "
            "job has succeeded",
        )
    return _prepare(
        session=session,
        session_factory=session_factory,
        storage=storage,
        settings=settings,
        classes=[(seg_class, job)],
        export_format=export_format,
        accepted_only=accepted_only,
        val=val,
    )


def prepare_download(
    *,
    session: Session,
    session_factory: sessionmaker[Session],
    storage: Storage,
    settings: Settings,
    principal: Principal,
    class_ids: Sequence[uuid.UUID],
    export_format: ExportFormat,
    accepted_only: bool,
    val: ValSplit = NO_VAL,
) -> DatasetDownload:
    """One dataset over several classes, label `i` the `i`-th class of `class_ids` (0 is the
    background): every class's real shots, then every class's finalized samples (only the
    accepted ones with `accepted_only`), each class's in index order. Item names carry their
    class (`<slug>-<label>_shot_00`), so no two collide.

    422 naming the ids that no class visible to `principal` has (another owner's too: an id
    alone must not reveal that it exists), or that repeat; 409 naming the classes whose
    synthesis job has not succeeded (as the one-class download). Nothing is changed either way.
    """
    if not class_ids:
        raise Problem(
            422,
            "name at least one class",
            errors=[{"field": "class_ids", "message": "names no class"}],
        )
    errors = [
        {"field": f"class_ids[{n}]", "message": f"repeats {class_id}"}
        for n, class_id in enumerate(class_ids)
        if class_id in class_ids[:n]
    ]
    if errors:
        raise Problem(422, "each class may be named once", errors=errors)
    found = {
        seg_class.id: (seg_class, job)
        for seg_class, job in session.execute(
            select(SegClass, Job)
            .outerjoin(Job, Job.id == SegClass.job_id)
            .where(SegClass.id.in_(class_ids), visible_to(principal, SegClass.owner_id))
        ).tuples()
    }
    unknown = [(n, class_id) for n, class_id in enumerate(class_ids) if class_id not in found]
    if unknown:
        raise Problem(
            422,
            f"no such class: {', '.join(str(class_id) for _, class_id in unknown)}",
            errors=[{"field": f"class_ids[{n}]", "message": "no such class"} for n, _ in unknown],
        )
    classes: list[tuple[SegClass, Job]] = []
    unfinished: list[tuple[int, uuid.UUID, str]] = []
    for n, class_id in enumerate(class_ids):
        seg_class, job = found[class_id]
        if job is None or job.status != "succeeded":
            unfinished.append((n, class_id, job.status if job is not None else "queued"))
        else:
            classes.append((seg_class, job))
    if unfinished:
        named = ", ".join(f"{class_id} ({status})" for _, class_id, status in unfinished)
        raise Problem(
            409,
            f"the synthesis jobs of these classes have not succeeded: {named}; a dataset can "
            "be downloaded once each of its classes' jobs has succeeded",
            errors=[
                {"field": f"class_ids[{n}]", "message": f"its synthesis job is {status}"}
                for n, _, status in unfinished
            ],
        )
    return _prepare(
        session=session,
        session_factory=session_factory,
        storage=storage,
        settings=settings,
        classes=classes,
        export_format=export_format,
        accepted_only=accepted_only,
        val=val,
    )


def parse_class_ids(text: str) -> list[uuid.UUID]:
    """`<id>,<id>,…` as ids; 422 naming each part that is no UUID."""
    parts = [part.strip() for part in text.split(",")] if text.strip() else []
    ids, errors = [], []
    for n, part in enumerate(parts):
        try:
            ids.append(uuid.UUID(part))
        except ValueError:
            errors.append({"field": f"class_ids[{n}]", "message": f"{part!r} is not a UUID"})
    if errors:
        raise Problem(422, "class_ids is a comma-separated list of class ids", errors=errors)
    return ids


def parse_val(text: str) -> ValSplit:
    """The `val` option; 422 naming the accepted forms for anything else."""
    try:
        return ValSplit.parse(text)
    except ValueError:
        raise Problem(
            422,
            f"val must be {VAL_FORMS}",
            errors=[{"field": "val", "message": f"must be {VAL_FORMS}; got {text!r}"}],
        ) from None


@dataclass(frozen=True)
class _Member:
    """A class of a download, read at request time: what its items and its ETag come from."""

    seg_class: SegClass
    job: Job
    label: int
    prefix: str  # of its items' names: "" alone, else "<slug>-<label>_"
    shots: list[ExportItem]
    samples: Select[*tuple[Any, ...]]
    num_samples: int
    last_finalized: datetime | None
    last_reviewed: datetime | None

    def state(self) -> list[Any]:
        """What its part of the archive depends on, for the ETag."""
        return [
            str(self.seg_class.id),
            self.seg_class.updated_at.isoformat(),
            str(self.job.id),
            self.job.finished_at.isoformat() if self.job.finished_at else None,
            len(self.shots),
            self.num_samples,
            self.last_finalized.isoformat() if self.last_finalized else None,
            self.last_reviewed.isoformat() if self.last_reviewed else None,
        ]


def _prepare(
    *,
    session: Session,
    session_factory: sessionmaker[Session],
    storage: Storage,
    settings: Settings,
    classes: list[tuple[SegClass, Job]],
    export_format: ExportFormat,
    accepted_only: bool,
    val: ValSplit,
) -> DatasetDownload:
    """The download of `classes` (checked: visible, their jobs succeeded), in label order."""
    slugs = [inversion_token(seg_class.name).strip("<>") for seg_class, _ in classes]
    members = [
        _member(
            session,
            seg_class,
            job,
            label=label,
            prefix="" if len(classes) == 1 else f"{slug}-{label}_",
            accepted_only=accepted_only,
            val=val,
        )
        for label, ((seg_class, job), slug) in enumerate(zip(classes, slugs, strict=True), start=1)
    ]
    if val.kind == "shots" and not any(member.num_samples for member in members):
        # NOTE: an archive of validation data only: tools refuse it (Ultralytics finds no
        # `images/train`), and there is nothing in it to train on.
        which = "accepted samples (accepted_only=true)" if accepted_only else "finished samples"
        raise Problem(
            409,
            f"with val=shots the train split holds the samples, and there are no {which}: ask "
            "for val=none or val=fraction:<f>"
            + (", or accepted_only=false" if accepted_only else ""),
        )
    options = ExportOptions()
    state = [
        EXPORT_REVISION,
        software_versions(),
        astuple(options),
        export_format,
        accepted_only,
        val.text,
        settings.instance_min_area,
        [member.state() for member in members],
    ]
    digest = hashlib.sha256(json.dumps(state).encode()).hexdigest()[:32]
    source = ExportSource(
        classes=tuple(
            _export_class(member.seg_class, default_model=settings.default_model)
            for member in members
        ),
        accepted_only=accepted_only,
        num_shots=sum(len(member.shots) for member in members),
        num_samples=sum(member.num_samples for member in members),
        items=lambda: _items(session_factory, members, val=val),
        read=storage.get,
        val=val,
        instance_min_area=settings.instance_min_area,
    )
    filename = "-".join(slugs)
    if len(filename) > MAX_FILENAME_STEM:
        filename = f"{slugs[0]}-and-{len(slugs) - 1}-more"
    # NOTE: the archive is streamed long after this returns, a batch of samples per short
    # session of its own: the request's transaction ends here, so a slow client holds no
    # database connection.
    session.rollback()
    # Remembered under the first class: it goes with that class's blobs.
    length_key = class_key(members[0].seg_class.id, f"exports/{digest}.length")
    return DatasetDownload(
        filename=f"{filename}-{export_format}.{extension(export_format)}",
        media_type=media_type(export_format),
        etag=f'"{digest}"',
        length=_remembered_length(storage, length_key),
        generate=lambda: write_archive(export_format, source, options),
        remember_length=lambda length: _remember_length(storage, length_key, length),
    )


def _member(
    session: Session,
    seg_class: SegClass,
    job: Job,
    *,
    label: int,
    prefix: str,
    accepted_only: bool,
    val: ValSplit,
) -> _Member:
    samples = _samples(seg_class.id, accepted_only=accepted_only)
    num_samples, last_finalized, last_reviewed = (
        session.execute(
            samples.with_only_columns(
                func.count(), func.max(Sample.finalized_at), func.max(Sample.reviewed_at)
            )
        )
        .tuples()
        .one()
    )
    shots = [
        _shot_item(shot, label=label, prefix=prefix, val=val)
        for shot in session.execute(
            select(ShotRow).where(ShotRow.class_id == seg_class.id).order_by(ShotRow.position)
        ).scalars()
    ]
    return _Member(
        seg_class=seg_class,
        job=job,
        label=label,
        prefix=prefix,
        shots=shots,
        samples=samples,
        num_samples=num_samples,
        last_finalized=last_finalized,
        last_reviewed=last_reviewed,
    )


def _samples(class_id: uuid.UUID, *, accepted_only: bool) -> Select[*tuple[Any, ...]]:
    """The exported samples of a class: finalized ones, accepted ones only if asked."""
    statement = select(
        Sample.id, Sample.index, Sample.prompt, Sample.prompt_kind, Sample.seed, Sample.width,
        Sample.height, Sample.image_key, Sample.mask_key, Sample.clip_score,
        Sample.shot_similarity, Sample.consensus_iou, Sample.ood_iou, Sample.accepted,
        Sample.accepted_by, Sample.mask_source, Sample.instances,
    ).where(
        Sample.class_id == class_id,
        Sample.finalized_at.is_not(None),
        Sample.mask_key.is_not(None),
    )  # fmt: skip
    if accepted_only:
        statement = statement.where(Sample.accepted.is_(True))
    return statement


def _items(
    session_factory: sessionmaker[Session], members: list[_Member], *, val: ValSplit
) -> Iterator[ExportItem]:
    """Every class's shots, then each class's samples by index, read in batches (keyset on
    the index)."""
    for member in members:
        yield from member.shots
    for member in members:
        seen, after = 0, -1
        while True:
            with session_factory() as session:
                rows = session.execute(
                    member.samples.where(Sample.index > after)
                    .order_by(Sample.index)
                    .limit(SAMPLE_BATCH)
                ).all()
            seen += len(rows)
            if seen > member.num_samples:
                break
            for row in rows:
                yield _sample_item(row, label=member.label, prefix=member.prefix, val=val)
            if len(rows) < SAMPLE_BATCH:
                break
            after = rows[-1]._mapping["index"]
        if seen != member.num_samples:
            raise ExportChanged(
                f"expected {member.num_samples} samples of class {member.seg_class.id}, "
                f"found {seen}"
            )


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


def _shot_item(shot: ShotRow, *, label: int, prefix: str, val: ValSplit) -> ExportItem:
    return ExportItem(
        name=f"{prefix}shot_{shot.position:02d}",
        source="shot",
        width=shot.width,
        height=shot.height,
        image_key=shot.image_key,
        mask_key=shot.mask_key,
        position=shot.position,
        filename=shot.filename,
        label=label,
        split=val.split_of(shot=True, key=str(shot.id)),
    )


def _sample_item(row: Any, *, label: int, prefix: str, val: ValSplit) -> ExportItem:
    return ExportItem(
        name=f"{prefix}sample_{row.index:05d}",
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
        id=str(row.id),
        accepted_by=row.accepted_by,
        instances=row.instances,
        label=label,
        split=val.split_of(shot=False, key=str(row.id)),
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
