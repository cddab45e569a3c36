"""What the admin dashboard shows: every job with its timings and traceback, the queue's depth,
the workers online, the classes, and a class's shots and samples with their scores.

Plain data for the templates and the jobs page's polling endpoint; times and durations are
formatted here once, so the first render and every refresh read the same.
"""

from __future__ import annotations

import math
import uuid
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from datetime import datetime, timedelta
from typing import Any, Literal

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from service.contexts.classes import class_public
from service.contexts.jobs import ACTIVE
from service.models import Job, Owner, Sample, SegClass, Shot, WorkerHeartbeat, utcnow
from service.problems import not_found

# A worker is online while its heartbeat is at most this many intervals old.
ONLINE_INTERVALS = 3
JOB_STATUSES = ("queued", "running", "succeeded", "failed", "cancelled")
JOB_KINDS = ("synthesis", "training")
SORT_KEYS = ("index", "clip_score", "ood_iou", "consensus_iou")
GALLERY_PAGE_SIZE = 120
HISTOGRAM_BINS = 20

SortKey = Literal["index", "clip_score", "ood_iou", "consensus_iou"]
Order = Literal["asc", "desc"]


def format_time(moment: datetime | None) -> str:
    return moment.strftime("%Y-%m-%d %H:%M:%S") if moment is not None else ""


def format_duration(seconds: float | None) -> str:
    if seconds is None:
        return ""
    total = max(0, int(seconds))
    hours, rest = divmod(total, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h {minutes:02d}m"
    if minutes:
        return f"{minutes}m {secs:02d}s"
    return f"{secs}s"


@dataclass(frozen=True)
class JobRow:
    """A job as the jobs page shows it (and its polling endpoint sends it)."""

    id: str
    kind: str
    owner: str
    status: str
    stage: str
    progress: float
    progress_text: str
    attempts: int
    queued_at: str
    started_at: str
    finished_at: str
    duration: str
    worker: str
    error: str
    traceback: str
    can_cancel: bool
    can_retry: bool
    target_id: str
    target_url: str | None

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class WorkerRow:
    name: str
    hostname: str
    pid: int
    started_at: str
    last_seen: str
    current_job_id: str | None


@dataclass(frozen=True)
class JobsOverview:
    """The jobs page: the queue's depth, the workers online and the (filtered) jobs."""

    queued: int
    running: int
    workers: list[WorkerRow]
    jobs: list[JobRow]
    total: int

    def to_json(self) -> dict[str, Any]:
        return {
            "queue": {"queued": self.queued, "running": self.running},
            "workers": [asdict(worker) for worker in self.workers],
            "jobs": [job.to_json() for job in self.jobs],
            "total": self.total,
        }


def jobs_overview(
    *,
    session: Session,
    status: str | None,
    kind: str | None,
    limit: int,
    heartbeat_seconds: float,
    now: datetime | None = None,
) -> JobsOverview:
    """Everyone's jobs (newest first, at most `limit`) with the queue and the workers."""
    now = now or utcnow()
    counts = dict(
        session.execute(
            select(Job.status, func.count()).where(Job.status.in_(ACTIVE)).group_by(Job.status)
        )
        .tuples()
        .all()
    )
    filters = []
    if status is not None:
        filters.append(Job.status == status)
    if kind is not None:
        filters.append(Job.kind == kind)
    total = session.execute(select(func.count()).select_from(Job).where(*filters)).scalar_one()
    rows = session.execute(
        select(Job, Owner.name)
        .join(Owner, Owner.id == Job.owner_id)
        .where(*filters)
        .order_by(Job.created_at.desc(), Job.id.desc())
        .limit(limit)
    ).all()
    return JobsOverview(
        queued=counts.get("queued", 0),
        running=counts.get("running", 0),
        workers=workers_online(session=session, heartbeat_seconds=heartbeat_seconds, now=now),
        jobs=[_job_row(job, owner, now) for job, owner in rows],
        total=total,
    )


def _job_row(job: Job, owner: str, now: datetime) -> JobRow:
    end = job.finished_at or (now if job.status == "running" else None)
    duration = (end - job.started_at).total_seconds() if job.started_at and end else None
    return JobRow(
        id=str(job.id),
        kind=job.kind,
        owner=owner,
        status=job.status,
        stage=job.stage or "",
        progress=round(job.progress, 4),
        progress_text=f"{math.floor(job.progress * 100)}%",
        attempts=job.attempts,
        queued_at=format_time(job.created_at),
        started_at=format_time(job.started_at),
        finished_at=format_time(job.finished_at),
        duration=format_duration(duration),
        worker=job.worker or "",
        error=job.error or "",
        traceback=job.traceback or "",
        # A running job asked to stop is on its way to `cancelled`: no second cancel.
        can_cancel=job.status in ACTIVE and not job.cancel_requested,
        can_retry=job.status in ("failed", "cancelled"),
        target_id=str(job.target_id),
        target_url=f"/admin/classes/{job.target_id}" if job.kind == "synthesis" else None,
    )


def workers_online(
    *, session: Session, heartbeat_seconds: float, now: datetime | None = None
) -> list[WorkerRow]:
    """The worker processes whose heartbeat is recent, by name."""
    since = (now or utcnow()) - timedelta(seconds=ONLINE_INTERVALS * heartbeat_seconds)
    beats = session.scalars(
        select(WorkerHeartbeat)
        .where(WorkerHeartbeat.last_seen_at >= since)
        .order_by(WorkerHeartbeat.name)
    ).all()
    return [
        WorkerRow(
            name=beat.name,
            hostname=beat.hostname,
            pid=beat.pid,
            started_at=format_time(beat.started_at),
            last_seen=format_time(beat.last_seen_at),
            current_job_id=str(beat.current_job_id) if beat.current_job_id else None,
        )
        for beat in beats
    ]


@dataclass(frozen=True)
class ClassRow:
    id: str
    name: str
    owner: str
    status: str
    stage: str
    progress: float
    num_shots: int
    num_samples_requested: int
    num_samples_done: int
    num_accepted: int
    clip_score_mean: float | None
    created_at: str


def class_rows(*, session: Session, limit: int) -> list[ClassRow]:
    """Everyone's classes, newest first, with their job's state."""
    rows = session.execute(
        select(SegClass, Owner.name, Job)
        .join(Owner, Owner.id == SegClass.owner_id)
        .outerjoin(Job, Job.id == SegClass.job_id)
        .order_by(SegClass.created_at.desc(), SegClass.id.desc())
        .limit(limit)
    ).all()
    return [_class_row(seg_class, owner, job) for seg_class, owner, job in rows]


def _class_row(seg_class: SegClass, owner: str, job: Job | None) -> ClassRow:
    # The class as the API shows it (its state is its job's), plus who owns it.
    public = class_public(seg_class, job)
    return ClassRow(
        id=str(public.id),
        name=public.name,
        owner=owner,
        status=public.status,
        stage=public.stage or "",
        progress=public.progress,
        num_shots=public.num_shots,
        num_samples_requested=public.num_samples_requested,
        num_samples_done=public.num_samples_done,
        num_accepted=public.num_accepted,
        clip_score_mean=public.clip_score_mean,
        created_at=format_time(public.created_at),
    )


@dataclass(frozen=True)
class GalleryFilters:
    """Which samples the gallery shows, in which order."""

    sort: SortKey = "index"
    order: Order = "asc"
    accepted: bool | None = None
    mask_source: Literal["consensus", "pseudo_label"] | None = None
    prompt_kind: Literal["inversion", "text"] | None = None
    page: int = 1


@dataclass(frozen=True)
class ShotTile:
    id: str
    position: int
    filename: str
    width: int
    height: int


@dataclass(frozen=True)
class SampleTile:
    id: str
    index: int
    prompt: str
    prompt_kind: str
    seed: int
    width: int
    height: int
    clip_score: float | None
    shot_similarity: float | None
    consensus_iou: float | None
    ood_iou: float | None
    accepted: bool | None
    mask_source: str | None


@dataclass(frozen=True)
class HistogramBar:
    low: float
    high: float
    count: int


@dataclass(frozen=True)
class Histogram:
    bars: list[HistogramBar]
    peak: int
    total: int


@dataclass(frozen=True)
class Gallery:
    seg_class: ClassRow
    prompts: list[str]
    shots: list[ShotTile]
    samples: list[SampleTile]
    matching: int
    pages: int
    histogram: Histogram


def gallery(*, session: Session, class_id: uuid.UUID, filters: GalleryFilters) -> Gallery:
    """A class's shots, one page of its finished samples (filtered and sorted), and the
    histogram of all its samples' CLIP scores. 404 for an unknown class."""
    found = session.execute(
        select(SegClass, Owner.name, Job)
        .join(Owner, Owner.id == SegClass.owner_id)
        .outerjoin(Job, Job.id == SegClass.job_id)
        .where(SegClass.id == class_id)
    ).one_or_none()
    if found is None:
        raise not_found("class")
    seg_class, owner, job = found
    shots = session.scalars(
        select(Shot).where(Shot.class_id == class_id).order_by(Shot.position)
    ).all()
    conditions = [Sample.class_id == class_id, Sample.finalized_at.is_not(None)]
    if filters.accepted is not None:
        conditions.append(Sample.accepted.is_(filters.accepted))
    if filters.mask_source is not None:
        conditions.append(Sample.mask_source == filters.mask_source)
    if filters.prompt_kind is not None:
        conditions.append(Sample.prompt_kind == filters.prompt_kind)
    matching = session.execute(
        select(func.count()).select_from(Sample).where(*conditions)
    ).scalar_one()
    pages = max(1, math.ceil(matching / GALLERY_PAGE_SIZE))
    page = min(max(1, filters.page), pages)
    column = getattr(Sample, filters.sort)
    ordered = column.desc() if filters.order == "desc" else column.asc()
    samples = session.scalars(
        select(Sample)
        .where(*conditions)
        # Samples without that score (none yet) come last either way; index breaks ties.
        .order_by(ordered.nulls_last(), Sample.index)
        .offset((page - 1) * GALLERY_PAGE_SIZE)
        .limit(GALLERY_PAGE_SIZE)
    ).all()
    scores = session.scalars(
        select(Sample.clip_score).where(
            Sample.class_id == class_id,
            Sample.finalized_at.is_not(None),
            Sample.clip_score.is_not(None),
        )
    ).all()
    return Gallery(
        seg_class=_class_row(seg_class, owner, job),
        prompts=list(seg_class.prompts or []),
        shots=[
            ShotTile(
                id=str(shot.id),
                position=shot.position,
                filename=shot.filename,
                width=shot.width,
                height=shot.height,
            )
            for shot in shots
        ],
        samples=[_sample_tile(sample) for sample in samples],
        matching=matching,
        pages=pages,
        histogram=histogram([score for score in scores if score is not None]),
    )


def _sample_tile(sample: Sample) -> SampleTile:
    return SampleTile(
        id=str(sample.id),
        index=sample.index,
        prompt=sample.prompt,
        prompt_kind=sample.prompt_kind,
        seed=sample.seed,
        width=sample.width,
        height=sample.height,
        clip_score=sample.clip_score,
        shot_similarity=sample.shot_similarity,
        consensus_iou=sample.consensus_iou,
        ood_iou=sample.ood_iou,
        accepted=sample.accepted,
        mask_source=sample.mask_source,
    )


def histogram(values: Sequence[float], bins: int = HISTOGRAM_BINS) -> Histogram:
    """Counts of `values` in `bins` equal-width bins from their minimum to their maximum (one
    bin when they are all equal)."""
    if not values:
        return Histogram(bars=[], peak=0, total=0)
    low, high = min(values), max(values)
    if high == low:
        return Histogram(
            bars=[HistogramBar(low, high, len(values))], peak=len(values), total=len(values)
        )
    width = (high - low) / bins
    counts = [0] * bins
    for value in values:
        counts[min(bins - 1, int((value - low) / width))] += 1
    bars = [
        HistogramBar(low + i * width, low + (i + 1) * width, count)
        for i, count in enumerate(counts)
    ]
    return Histogram(bars=bars, peak=max(counts), total=len(values))
