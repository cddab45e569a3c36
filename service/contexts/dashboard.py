"""What the admin dashboard shows: every job with its timings and traceback, the queue's depth,
the workers online, the classes, a class's shots and samples with their scores, verdicts and
its report, a training's metrics, and every API key.

Plain data for the templates and the jobs page's polling endpoint; times and durations are
formatted here once, so the first render and every refresh read the same. The jobs page's data
depends on the stored rows alone (a running job's duration is counted by the page from its
start), so an unchanged snapshot of them is answered as before (`JobsSnapshot`).
"""

from __future__ import annotations

import functools
import math
import uuid
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime
from typing import Any, Literal, NamedTuple

from sqlalchemy import and_, bindparam, func, select
from sqlalchemy.orm import Session

from service.contexts.classes import class_public
from service.contexts.jobs import ACTIVE
from service.contexts.keys import every_key
from service.contexts.review import Reviewed
from service.contexts.thumbnails import mask_version
from service.contexts.trainings import training_public
from service.db import db_now
from service.models import Job, Owner, Sample, SegClass, Shot, Training, WorkerHeartbeat
from service.problems import not_found
from service.reads import Query, ReadDatabase, one_of
from service.schemas import ClassReport, ReportTraining, TrainingMetrics, TuningTrial
from service.settings import DEFAULT_MODEL

# A worker is online while its heartbeat is at most this many intervals old.
ONLINE_INTERVALS = 3
JOB_STATUSES = ("queued", "running", "succeeded", "failed", "cancelled")
JOB_KINDS = ("synthesis", "training")
SORT_KEYS = ("index", "clip_score", "ood_iou", "consensus_iou")
GALLERY_PAGE_SIZE = 120
HISTOGRAM_BINS = 20

SortKey = Literal["index", "clip_score", "ood_iou", "consensus_iou"]
Order = Literal["asc", "desc"]


def shallow_dict(row: Any) -> dict[str, Any]:
    """A dataclass of plain values as a dict. `dataclasses.asdict` deep-copies every value,
    and took 40 % of the polled jobs page's time."""
    return {name: getattr(row, name) for name in row.__dataclass_fields__}


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
    # A finished job's; a running job's is counted by the page from `running_since` (ISO 8601),
    # so that the data changes when the job does, not every second.
    duration: str
    running_since: str
    worker: str
    error: str
    traceback: str
    can_cancel: bool
    can_retry: bool
    target_id: str
    target_url: str | None

    def to_json(self) -> dict[str, Any]:
        return shallow_dict(self)


@dataclass(frozen=True)
class WorkerRow:
    name: str
    hostname: str
    pid: int
    started_at: str
    current_job_id: str | None
    # The model whose classes it draws; None for a worker that draws none (predictions only).
    model: str | None


@dataclass(frozen=True)
class ModelBacklog:
    """A deployment model's synthesis work: its classes' queued and running jobs, and the live
    workers that serve it (none while it has work: that work waits for one)."""

    name: str
    queued: int
    running: int
    workers: int
    # False for a model a class names but ALIGNDIFF_MODELS no longer does.
    served: bool

    @property
    def waits_for_a_worker(self) -> bool:
        return self.workers == 0 and self.queued + self.running > 0


@dataclass(frozen=True)
class JobsOverview:
    """The jobs page: the queue's depth, the workers online and the (filtered) jobs."""

    queued: int
    running: int
    workers: list[WorkerRow]
    jobs: list[JobRow]
    total: int
    models: list[ModelBacklog] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {
            "queue": {"queued": self.queued, "running": self.running},
            "models": [
                {**shallow_dict(model), "waits_for_a_worker": model.waits_for_a_worker}
                for model in self.models
            ],
            "workers": [shallow_dict(worker) for worker in self.workers],
            "jobs": [job.to_json() for job in self.jobs],
            "total": self.total,
        }


# The columns of a job row on the jobs page, and the statements of the page's reads (hot:
# the page polls every 2 s), compiled once each (`service.reads`): three per poll.
_JOB_COLUMNS = (
    Job.id, Job.kind, Job.status, Job.stage, Job.progress, Job.attempts, Job.created_at,
    Job.started_at, Job.finished_at, Job.worker, Job.error, Job.traceback, Job.cancel_requested,
    Job.target_id, Owner.name.label("owner"),
)  # fmt: skip
_JOB_NAMES = tuple(column.key for column in _JOB_COLUMNS)
# (Not its last heartbeat's time: the page does not show it, and the data would change with
# every beat.)
_WORKER_COLUMNS = (
    WorkerHeartbeat.name, WorkerHeartbeat.hostname, WorkerHeartbeat.pid,
    WorkerHeartbeat.started_at, WorkerHeartbeat.current_job_id, WorkerHeartbeat.model,
)  # fmt: skip


@functools.cache
def _workers_seen_within(seconds: float) -> Query:
    """The workers whose last heartbeat is at most `seconds` old by the database's clock, the
    one heartbeats are written in: an API host whose clock runs off still sees live workers
    online and dead ones gone. (One statement per window: `ReadDatabase` compiles each once.)"""
    return (
        select(*_WORKER_COLUMNS)
        .where(WorkerHeartbeat.last_seen_at >= db_now(-seconds))
        .order_by(WorkerHeartbeat.name)
    )


# The active jobs counted by kind, state and, for a synthesis, its class's model: the queue's
# depth and each model's backlog in one statement. (A synthesis whose class is gone counts in
# the queue, not in any model's backlog.)
_HAS_CLASS = SegClass.id.is_not(None)
_ACTIVE_JOBS = (
    select(Job.kind, SegClass.model, _HAS_CLASS, Job.status, func.count())
    .outerjoin(SegClass, and_(Job.kind == "synthesis", SegClass.id == Job.target_id))
    .where(one_of(Job.status, ACTIVE))
    .group_by(Job.kind, SegClass.model, _HAS_CLASS, Job.status)
)


@functools.cache
def _jobs_shown(*, status: bool, kind: bool) -> Query:
    """The newest `limit` of the jobs the filters keep, each with the count of them all (bind
    parameters: status, kind, limit)."""
    filters = []
    if status:
        filters.append(Job.status == bindparam("status"))
    if kind:
        filters.append(Job.kind == bindparam("kind"))
    # NOTE: a scalar subquery, run once per statement (a window count would hold every row).
    total = select(func.count()).select_from(Job).where(*filters).scalar_subquery()
    return (
        select(*_JOB_COLUMNS, total.label("total"))
        .join(Owner, Owner.id == Job.owner_id)
        .where(*filters)
        .order_by(Job.created_at.desc(), Job.id.desc())
        .limit(bindparam("limit"))
    )


class JobsSnapshot(NamedTuple):
    """The stored rows the jobs page shows, as read (compared as values: equal snapshots give
    equal pages): all its data is computed from them (`overview_of`)."""

    # Each shown job's columns (`_JOB_COLUMNS`), then the count of the jobs the filters keep.
    jobs: tuple[tuple[Any, ...], ...]
    workers: tuple[tuple[Any, ...], ...]
    # (kind, model, whether the class exists, status, count)
    active: tuple[tuple[Any, ...], ...]


async def jobs_snapshot(
    *,
    reads: ReadDatabase,
    status: str | None,
    kind: str | None,
    limit: int,
    heartbeat_seconds: float,
) -> JobsSnapshot:
    """Everyone's jobs (newest first, at most `limit`, with their count), the active jobs by
    state and by model, and the workers online (a heartbeat at most `ONLINE_INTERVALS` old)."""
    shown = _jobs_shown(status=status is not None, kind=kind is not None)
    jobs, workers, active = await reads.many(
        [
            (shown, {"status": status, "kind": kind, "limit": limit}),
            (_workers_seen_within(ONLINE_INTERVALS * heartbeat_seconds), {}),
            (_ACTIVE_JOBS, {}),
        ]
    )
    return JobsSnapshot(jobs=tuple(jobs), workers=tuple(workers), active=tuple(active))


def overview_of(
    snapshot: JobsSnapshot, *, served_models: Sequence[str] = (DEFAULT_MODEL,)
) -> JobsOverview:
    """The jobs page's data from its rows, with the synthesis backlog of each model
    (`served_models`, the default first, and any other a class with active work names)."""
    counts: dict[str, int] = defaultdict(int)
    for *_, job_status, count in snapshot.active:
        counts[job_status] += count
    syntheses = [
        (model, job_status, count)
        for kind, model, has_class, job_status, count in snapshot.active
        if kind == "synthesis" and has_class
    ]
    workers = [_worker_row(row) for row in snapshot.workers]
    return JobsOverview(
        queued=counts["queued"],
        running=counts["running"],
        workers=workers,
        jobs=[_job_row(dict(zip(_JOB_NAMES, row[:-1], strict=True))) for row in snapshot.jobs],
        total=snapshot.jobs[0][-1] if snapshot.jobs else 0,
        models=model_backlogs(syntheses, served_models=served_models, workers=workers),
    )


def model_backlogs(
    active: Sequence[Sequence[Any]], *, served_models: Sequence[str], workers: Sequence[WorkerRow]
) -> list[ModelBacklog]:
    """The active synthesis jobs per model (rows of model, status, count; a class stored before
    models were named counts for the default, `served_models[0]`) beside the live workers
    serving it."""
    counts: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))
    for name, status, count in active:
        counts[name or served_models[0]][status] += count
    names = [*served_models, *sorted(set(counts) - set(served_models))]
    return [
        ModelBacklog(
            name=name,
            queued=counts[name].get("queued", 0),
            running=counts[name].get("running", 0),
            workers=sum(worker.model == name for worker in workers),
            served=name in served_models,
        )
        for name in names
    ]


def _job_row(job: dict[str, Any]) -> JobRow:
    status, kind, progress = job["status"], job["kind"], job["progress"]
    started_at, finished_at = job["started_at"], job["finished_at"]
    duration = (finished_at - started_at).total_seconds() if started_at and finished_at else None
    running = status == "running" and started_at is not None and finished_at is None
    target_id = str(job["target_id"])
    return JobRow(
        id=str(job["id"]),
        kind=kind,
        owner=job["owner"],
        status=status,
        stage=job["stage"] or "",
        progress=round(progress, 4),
        progress_text=f"{math.floor(progress * 100)}%",
        attempts=job["attempts"],
        queued_at=format_time(job["created_at"]),
        started_at=format_time(started_at),
        finished_at=format_time(finished_at),
        duration=format_duration(duration),
        running_since=started_at.isoformat() if running else "",
        worker=job["worker"] or "",
        error=job["error"] or "",
        traceback=job["traceback"] or "",
        # A running job asked to stop is on its way to `cancelled`: no second cancel.
        can_cancel=status in ACTIVE and not job["cancel_requested"],
        can_retry=status in ("failed", "cancelled"),
        target_id=target_id,
        target_url=_TARGET_PAGES[kind].format(target_id) if kind in _TARGET_PAGES else None,
    )


# The dashboard page of what a job works on: a class's gallery, a training's page.
_TARGET_PAGES = {"synthesis": "/admin/classes/{}", "training": "/admin/trainings/{}"}


def _worker_row(row: tuple[Any, ...]) -> WorkerRow:
    name, hostname, pid, started_at, current_job_id, model = row
    return WorkerRow(
        name=name,
        hostname=hostname,
        pid=pid,
        started_at=format_time(started_at),
        current_job_id=str(current_job_id) if current_job_id else None,
        model=model,
    )


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


def class_rows(*, session: Session, limit: int, default_model: str) -> list[ClassRow]:
    """Everyone's classes, newest first, with their job's state."""
    rows = session.execute(
        select(SegClass, Owner.name, Job)
        .join(Owner, Owner.id == SegClass.owner_id)
        .outerjoin(Job, Job.id == SegClass.job_id)
        .order_by(SegClass.created_at.desc(), SegClass.id.desc())
        .limit(limit)
    ).all()
    return [_class_row(seg_class, owner, job, default_model) for seg_class, owner, job in rows]


def _class_row(seg_class: SegClass, owner: str, job: Job | None, default_model: str) -> ClassRow:
    # The class as the API shows it (its state is its job's), plus who owns it.
    public = class_public(seg_class, job, default_model=default_model)
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
    mask_source: Literal["consensus", "pseudo_label", "human"] | None = None
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
    verdict: Verdict
    # Names the mask in the thumbnails' URLs (a reviewer's replaced mask is a new URL).
    mask_version: str | None


@dataclass(frozen=True)
class Verdict:
    """A sample's verdict as its tile shows it: accepted or not (None: never judged), a short
    label saying who decided, and a longer title."""

    accepted: bool | None
    label: str
    title: str


# Who rejected a sample, as short as a tile's caption needs.
VERDICT_AUTHORS = {"ood": "OOD filter", "similarity": "similarity", "user": "reviewer"}


def verdict(*, accepted: bool | None, accepted_by: str | None, rejected_by: str | None) -> Verdict:
    """How a tile words a sample's verdict."""
    if accepted is None:
        return Verdict(None, "", "not judged yet")
    if accepted:
        who = "reviewer" if accepted_by == "user" else "filter"
        title = "Accepted by a reviewer" if who == "reviewer" else "Accepted by the filters"
        return Verdict(True, f"accepted · {who}", title)
    if rejected_by is None:
        return Verdict(False, "rejected", "Rejected")
    who = VERDICT_AUTHORS.get(rejected_by, rejected_by)
    return Verdict(
        False, f"rejected · {who}", f"Rejected by {REJECTION_LABELS.get(rejected_by, who)}"
    )


def review_json(reviewed: Reviewed) -> dict[str, Any]:
    """What the gallery's review buttons get back: the sample, its tile's verdict, and the
    class's accepted samples now."""
    sample = reviewed.sample
    shown = verdict(
        accepted=sample.accepted, accepted_by=sample.accepted_by, rejected_by=sample.rejected_by
    )
    return {
        "sample": sample.model_dump(mode="json"),
        "verdict": asdict(shown),
        "num_accepted": reviewed.num_accepted,
    }


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


def gallery(
    *, session: Session, class_id: uuid.UUID, filters: GalleryFilters, default_model: str
) -> Gallery:
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
        seg_class=_class_row(seg_class, owner, job, default_model),
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
        verdict=verdict(
            accepted=sample.accepted,
            accepted_by=sample.accepted_by,
            rejected_by=sample.rejected_by,
        ),
        mask_version=(
            mask_version(sample.mask_key, sample.mask_source) if sample.mask_key else None
        ),
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


def fixed_histogram(edges: Sequence[float], counts: Sequence[int]) -> Histogram:
    """A histogram of fixed bins (a report's) as the dashboard draws one."""
    bars = [HistogramBar(edges[i], edges[i + 1], count) for i, count in enumerate(counts)]
    return Histogram(bars=bars, peak=max(counts, default=0), total=sum(counts))


# --- a class's report --------------------------------------------------------------------------

SIGNAL_LABELS = {
    "clip_score": "CLIP score",
    "shot_similarity": "Shot similarity",
    "prototype_similarity": "Prototype similarity",
    "ood_iou": "OOD IoU",
    "consensus_iou": "Consensus IoU",
}
REJECTION_LABELS = {
    "ood": "the OOD filter",
    "similarity": "the similarity check",
    "user": "a reviewer",
}
EVAL_SET_NOTES = {
    "validation": "Measured on the validation set uploaded with the training.",
    "held_out_shots": "Measured on held-out shots: leave-one-shot-out folds, each trained "
    "without one shot of every class; the IoUs are fold means.",
    "training_shots": "Optimistic: measured on the very shots it trained on (no validation set, "
    "and a class with a single shot), it says little of how the model does on new images.",
}
OPTIMISTIC = "training_shots"
# An acceptance threshold's source when the similarity check is off.
DISABLED = "disabled"
# The trainings the class page charts (the newest); its table lists all the report's.
CHARTED_TRAININGS = 12


@dataclass(frozen=True)
class ScoreHistogram:
    signal: str
    label: str
    histogram: Histogram
    threshold: float | None  # the class's acceptance threshold, marked on the chart


@dataclass(frozen=True)
class AcceptedShare:
    name: str
    samples: int
    accepted: int

    @property
    def share(self) -> float:
        return self.accepted / self.samples if self.samples else 0.0

    @property
    def text(self) -> str:
        if not self.samples:
            return "no samples"
        return f"{self.accepted} / {self.samples} accepted ({self.share:.0%})"


@dataclass(frozen=True)
class RejectionRow:
    reason: str
    label: str
    count: int
    share: float  # of the finished samples


@dataclass(frozen=True)
class Threshold:
    label: str
    value: float
    source: str


@dataclass(frozen=True)
class ComparisonBar:
    """One group of the comparison chart: the IoU with synthetic samples and without."""

    label: str
    note: str
    value: float
    baseline: float | None
    url: str | None
    optimistic: bool


@dataclass(frozen=True)
class TrainingRow:
    id: str
    short_id: str
    url: str
    eval_set: str
    eval_note: str
    optimistic: bool
    miou: float
    baseline_miou: float | None
    difference: float | None
    created_at: str


@dataclass(frozen=True)
class ClassReportView:
    """A class's report (`service.contexts.reports`) as the class page shows it."""

    samples: int
    accepted: int
    histograms: list[ScoreHistogram]
    by_prompt_kind: list[AcceptedShare]
    by_mask_source: list[AcceptedShare]
    rejections: list[RejectionRow]
    thresholds: list[Threshold]
    bg_lambda: float | None
    tuning: list[TuningTrial] | None
    chosen_trial: int | None  # the index in `tuning` of the bg_lambda chosen
    trainings: list[TrainingRow]
    chart: list[ComparisonBar]


def report_view(report: ClassReport) -> ClassReportView:
    """The class page's report section, from the API's report of the class."""
    counts = report.counts
    acceptance = report.acceptance
    thresholds = (
        {
            "shot_similarity": acceptance.shot_similarity,
            "prototype_similarity": acceptance.prototype_similarity,
        }
        if acceptance is not None
        else {}
    )
    # A disabled check's threshold (-1) accepts everything: nothing to mark.
    marked = {
        signal: value
        for signal, value in thresholds.items()
        if acceptance is not None and acceptance.source.get(signal) != DISABLED
    }
    histograms = [
        ScoreHistogram(
            signal=signal,
            label=SIGNAL_LABELS.get(signal, signal),
            histogram=fixed_histogram(found.edges, found.counts),
            threshold=marked.get(signal),
        )
        for signal, found in report.histograms
    ]
    trainings = [_training_row(training) for training in report.trainings]
    return ClassReportView(
        samples=counts.samples,
        accepted=counts.accepted,
        histograms=histograms,
        by_prompt_kind=[
            AcceptedShare(name, group.samples, group.accepted)
            for name, group in counts.by_prompt_kind
        ],
        by_mask_source=[
            AcceptedShare(name, group.samples, group.accepted)
            for name, group in counts.by_mask_source
            # A source no sample has yet (masks a reviewer uploaded) is left out.
            if group.samples or name != "human"
        ],
        rejections=[
            RejectionRow(
                reason=reason,
                label=REJECTION_LABELS.get(reason, reason),
                count=count,
                share=count / counts.samples if counts.samples else 0.0,
            )
            for reason, count in counts.rejected_by
        ],
        thresholds=[
            Threshold(SIGNAL_LABELS[signal], value, acceptance.source.get(signal, ""))
            for signal, value in thresholds.items()
            if acceptance is not None
        ],
        bg_lambda=report.bg_lambda,
        tuning=report.tuning,
        chosen_trial=next(
            (
                index
                for index, trial in enumerate(report.tuning or [])
                if report.bg_lambda is not None
                and math.isclose(trial.bg_lambda, report.bg_lambda, abs_tol=1e-9)
            ),
            None,
        ),
        trainings=trainings,
        # Oldest on the left: the chart reads as a history.
        chart=[
            ComparisonBar(
                label=row.short_id,
                note=row.eval_set,
                value=row.miou,
                baseline=row.baseline_miou,
                url=row.url,
                optimistic=row.optimistic,
            )
            for row in reversed(trainings[:CHARTED_TRAININGS])
        ],
    )


def _training_row(training: ReportTraining) -> TrainingRow:
    baseline = training.baseline_miou
    return TrainingRow(
        id=str(training.id),
        short_id=str(training.id)[:8],
        url=f"/admin/trainings/{training.id}",
        eval_set=training.eval_set,
        eval_note=EVAL_SET_NOTES.get(training.eval_set, ""),
        optimistic=training.eval_set == OPTIMISTIC,
        miou=training.miou,
        baseline_miou=baseline,
        difference=training.miou - baseline if baseline is not None else None,
        created_at=format_time(training.created_at),
    )


# --- a training's page -------------------------------------------------------------------------


@dataclass(frozen=True)
class ClassLink:
    name: str
    url: str | None  # None: the class was deleted since


@dataclass(frozen=True)
class ClassIoURow:
    name: str
    url: str | None
    iou: float
    std: float | None
    baseline: float | None
    difference: float | None


@dataclass(frozen=True)
class FoldRow:
    fold: int
    held_out: str
    miou: float
    baseline_miou: float | None
    per_class: list[float | None]  # in `TrainingPage.class_names` order


@dataclass(frozen=True)
class Evaluation:
    """A succeeded training's metrics: per class, per fold and against its baseline."""

    miou: float
    baseline_miou: float | None
    difference: float | None
    spread: float | None
    exceeds_spread: bool | None
    class_names: list[str]
    per_class: list[ClassIoURow]
    folds: list[FoldRow]
    chart: list[ComparisonBar]


@dataclass(frozen=True)
class TrainingPage:
    """A training, what it is measured on, and its evaluation once it succeeded."""

    id: str
    owner: str
    status: str
    error: str
    architecture: str
    steps: int
    batch_size: int
    use_synthetic: bool
    copy_paste: bool
    compare_baseline: bool
    created_at: str
    classes: list[ClassLink]
    eval_set: str
    eval_note: str
    optimistic: bool
    evaluation: Evaluation | None


def training_page(*, session: Session, training_id: uuid.UUID) -> TrainingPage:
    """Any owner's training with its metrics (none before it succeeded); 404 if unknown."""
    found = session.execute(
        select(Training, Owner.name, Job)
        .join(Owner, Owner.id == Training.owner_id)
        .outerjoin(Job, Job.id == Training.job_id)
        .where(Training.id == training_id)
    ).one_or_none()
    if found is None:
        raise not_found("training")
    training, owner, job = found
    public = training_public(training, job)
    names = dict(
        session.execute(select(SegClass.id, SegClass.name).where(SegClass.id.in_(public.class_ids)))
        .tuples()
        .all()
    )
    classes = [
        ClassLink(names[class_id], f"/admin/classes/{class_id}")
        if class_id in names
        else ClassLink(str(class_id), None)
        for class_id in public.class_ids
    ]
    eval_set = public.metrics.eval_set if public.metrics is not None else training.eval_set
    return TrainingPage(
        id=str(public.id),
        owner=owner,
        status=public.status,
        error=public.error or "",
        architecture=public.architecture,
        steps=public.steps,
        batch_size=public.batch_size,
        use_synthetic=public.use_synthetic,
        copy_paste=public.copy_paste,
        compare_baseline=public.compare_baseline,
        created_at=format_time(public.created_at),
        classes=classes,
        eval_set=eval_set,
        eval_note=EVAL_SET_NOTES.get(eval_set, ""),
        optimistic=eval_set == OPTIMISTIC,
        evaluation=(
            _evaluation(public.metrics, {link.name: link.url for link in classes})
            if public.metrics is not None
            else None
        ),
    )


def _evaluation(metrics: TrainingMetrics, urls: dict[str, str | None]) -> Evaluation:
    baseline = metrics.baseline
    comparison = metrics.comparison
    std = metrics.per_class_iou_std or {}
    per_class = []
    for name, iou in metrics.per_class_iou.items():
        base = baseline.per_class_iou.get(name) if baseline is not None else None
        per_class.append(
            ClassIoURow(
                name=name,
                url=urls.get(name),
                iou=iou,
                std=std.get(name),
                baseline=base,
                difference=iou - base if base is not None else None,
            )
        )
    class_names = [row.name for row in per_class]
    if comparison is not None:
        difference: float | None = comparison.miou_difference
    else:
        difference = metrics.miou - baseline.miou if baseline is not None else None
    return Evaluation(
        miou=metrics.miou,
        baseline_miou=baseline.miou if baseline is not None else None,
        difference=difference,
        spread=comparison.spread if comparison is not None else None,
        exceeds_spread=comparison.exceeds_spread if comparison is not None else None,
        class_names=class_names,
        per_class=per_class,
        folds=[
            FoldRow(
                fold=fold.fold,
                held_out=", ".join(f"{name} #{shot}" for name, shot in fold.held_out.items()),
                miou=fold.miou,
                baseline_miou=fold.baseline.miou if fold.baseline is not None else None,
                per_class=[fold.per_class_iou.get(name) for name in class_names],
            )
            for fold in metrics.folds or []
        ],
        chart=[
            ComparisonBar(
                label=row.name,
                note="",
                value=row.iou,
                baseline=row.baseline,
                url=row.url,
                # The page says it once, above the chart.
                optimistic=False,
            )
            for row in per_class
        ],
    )


# --- keys ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class KeyRow:
    """An API key as the keys page shows it (never its secret)."""

    id: str
    short_id: str
    name: str
    owner: str
    owner_id: str
    admin: bool
    created_at: str
    last_used_at: str
    revoked_at: str
    revoked: bool


def key_rows(*, session: Session, limit: int) -> list[KeyRow]:
    """Every owner's keys, newest first, revoked ones included."""
    return [
        KeyRow(
            id=str(listed.key.id),
            short_id=str(listed.key.id)[:8],
            name=listed.key.name,
            owner=listed.owner,
            owner_id=str(listed.key.owner_id),
            admin=listed.key.admin,
            created_at=format_time(listed.key.created_at),
            last_used_at=format_time(listed.key.last_used_at),
            revoked_at=format_time(listed.key.revoked_at),
            revoked=listed.key.revoked_at is not None,
        )
        for listed in every_key(session=session, limit=limit)
    ]
