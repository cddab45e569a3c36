"""The report per class: its finished samples counted by prompt kind, mask source and verdict,
histograms of their scores over fixed bins, its acceptance thresholds and bg_lambda tuning, and
the trainings measured on it.

Everything is counted in the database (two aggregate queries over the class's sample rows): no
sample is loaded, however many the class has.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import ColumnElement, String, and_, case, cast, func, select
from sqlalchemy.orm import InstrumentedAttribute, Session

from service.auth import Principal
from service.contexts.access import visible_to
from service.contexts.classes import visible_class
from service.contexts.trainings import training_public
from service.models import Job, Sample, SegClass, Training
from service.schemas import (
    AcceptedCounts,
    ClassAcceptance,
    ClassReport,
    Histogram,
    MaskSourceCounts,
    PromptKindCounts,
    RejectionCounts,
    ReportCounts,
    ReportHistograms,
    ReportTraining,
    TuningTrial,
)

# The most trainings a report lists (the newest).
MAX_TRAININGS = 100


@dataclass(frozen=True)
class Bins:
    """`count` equal bins from `low` to `high`."""

    low: float
    high: float
    count: int

    def edges(self) -> list[float]:
        width = (self.high - self.low) / self.count
        # Rounded, so that -1 + 3 × 0.1 reads -0.7 rather than -0.7000000000000001.
        return [round(self.low + i * width, 9) for i in range(self.count + 1)]


# Fixed per signal, so the histograms of two classes compare bin by bin. CLIP scores are
# max(100·cos, 0); the similarities are cosines; the IoUs are in [0, 1].
HISTOGRAM_BINS: dict[str, Bins] = {
    "clip_score": Bins(0.0, 100.0, 20),
    "shot_similarity": Bins(-1.0, 1.0, 20),
    "prototype_similarity": Bins(-1.0, 1.0, 20),
    "ood_iou": Bins(0.0, 1.0, 10),
    "consensus_iou": Bins(0.0, 1.0, 10),
}
PROMPT_KINDS = tuple(PromptKindCounts.model_fields)
MASK_SOURCES = tuple(MaskSourceCounts.model_fields)
REJECTIONS = tuple(RejectionCounts.model_fields)


def class_report(*, session: Session, principal: Principal, class_id: uuid.UUID) -> ClassReport:
    """The report of a class `principal` may see (else 404, as for a class that does not
    exist). Its trainings are the principal's own (an admin's: everyone's)."""
    seg_class, _ = visible_class(session, principal, class_id)
    finished = (Sample.class_id == class_id, Sample.finalized_at.is_not(None))
    return ClassReport(
        class_id=class_id,
        counts=_counts(session, finished),
        histograms=ReportHistograms(**_histograms(session, finished)),
        acceptance=(
            ClassAcceptance.model_validate(seg_class.acceptance)
            if seg_class.acceptance is not None
            else None
        ),
        bg_lambda=seg_class.bg_lambda,
        tuning=(
            [TuningTrial.model_validate(trial) for trial in seg_class.tuning]
            if seg_class.tuning is not None
            else None
        ),
        trainings=_trainings(session, principal, seg_class),
    )


def _counts(session: Session, finished: Sequence[ColumnElement[bool]]) -> ReportCounts:
    rows = session.execute(
        select(
            Sample.prompt_kind,
            Sample.mask_source,
            Sample.accepted,
            Sample.rejected_by,
            func.count(),
        )
        .where(*finished)
        .group_by(Sample.prompt_kind, Sample.mask_source, Sample.accepted, Sample.rejected_by)
    ).all()
    by_kind = {kind: [0, 0] for kind in PROMPT_KINDS}
    by_source = {source: [0, 0] for source in MASK_SOURCES}
    rejected = dict.fromkeys(REJECTIONS, 0)
    samples = accepted = 0
    for kind, source, is_accepted, rejected_by, count in rows:
        samples += count
        accepted += count if is_accepted else 0
        for tally in (by_kind.get(kind), by_source.get(source or "")):
            if tally is not None:
                tally[0] += count
                tally[1] += count if is_accepted else 0
        if rejected_by in rejected:
            rejected[rejected_by] += count
    return ReportCounts(
        samples=samples,
        accepted=accepted,
        by_prompt_kind=PromptKindCounts(**_accepted_counts(by_kind)),
        by_mask_source=MaskSourceCounts(**_accepted_counts(by_source)),
        rejected_by=RejectionCounts(**rejected),
    )


def _accepted_counts(tallies: dict[str, list[int]]) -> dict[str, AcceptedCounts]:
    return {
        name: AcceptedCounts(samples=samples, accepted=accepted)
        for name, (samples, accepted) in tallies.items()
    }


def _histograms(session: Session, finished: Sequence[ColumnElement[bool]]) -> dict[str, Histogram]:
    # NOTE: every bin is a conditional count in one SELECT: one pass over the rows, and the
    # same SQL on SQLite and PostgreSQL (no floor(), which SQLite may lack). NULLs fail every
    # comparison, so samples without a signal are in no bin.
    columns = []
    for name, bins in HISTOGRAM_BINS.items():
        column: InstrumentedAttribute[Any] = getattr(Sample, name)
        edges = bins.edges()
        for i in range(bins.count):
            # The end bins take what falls outside the range (rounding, at most).
            conditions = []
            if i > 0:
                conditions.append(column >= edges[i])
            if i < bins.count - 1:
                conditions.append(column < edges[i + 1])
            columns.append(func.count(case((and_(*conditions), 1))))
    counts = list(session.execute(select(*columns).where(*finished)).one())
    histograms = {}
    for name, bins in HISTOGRAM_BINS.items():
        histograms[name] = Histogram(edges=bins.edges(), counts=counts[: bins.count])
        counts = counts[bins.count :]
    return histograms


def _trainings(session: Session, principal: Principal, seg_class: SegClass) -> list[ReportTraining]:
    class_id = str(seg_class.id)
    rows = (
        session.execute(
            select(Training, Job)
            .join(Job, Job.id == Training.job_id)
            .where(
                visible_to(principal, Training.owner_id),
                Job.status == "succeeded",
                # NOTE: a text match on the JSON list, the same on SQLite and PostgreSQL (which
                # have no common JSON containment operator): a class id, a UUID, appears in
                # the list's text only as one of its items.
                cast(Training.class_ids, String).contains(class_id),
            )
            .order_by(Training.created_at.desc(), Training.id.desc())
            .limit(MAX_TRAININGS)
        )
        .tuples()
        .all()
    )
    found = []
    for training, job in rows:
        metrics = training_public(training, job).metrics
        if class_id not in training.class_ids or metrics is None:
            continue
        found.append(
            ReportTraining(
                id=training.id,
                eval_set=metrics.eval_set,
                miou=metrics.miou,
                baseline_miou=metrics.baseline.miou if metrics.baseline is not None else None,
                created_at=training.created_at,
            )
        )
    return found
