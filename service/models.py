"""SQLAlchemy models: the metadata of owners, keys, classes, shots, samples, trainings and
jobs.

The job row is the truth about long work (status, stage, progress, attempts, lease, cancel
request); blobs live in object storage under keys derived from ids (see `service.storage`).
"""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from typing import Any, ClassVar

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Text,
    TypeDecorator,
    UniqueConstraint,
    Uuid,
    false,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from aligndiff.names import LEGACY_PROMPT_STYLE, PROMPT_STYLE


def utcnow() -> datetime:
    return datetime.now(UTC)


class UTCDateTime(TypeDecorator[datetime]):
    """A timezone-aware UTC datetime on every backend (SQLite stores naive values)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Any) -> datetime | None:
        if value is not None and value.tzinfo is None:
            raise ValueError("naive datetime")
        return value.astimezone(UTC) if value is not None else None

    def process_result_value(self, value: datetime | None, dialect: Any) -> datetime | None:
        if value is not None and value.tzinfo is None:
            return value.replace(tzinfo=UTC)
        return value

    def result_processor(self, dialect: Any, coltype: Any) -> Any:
        # PostgreSQL's `timestamp with time zone` comes back aware: nothing to do per value
        # (a call per value, per row, on the hot reads).
        if dialect.name == "postgresql":
            return None
        return super().result_processor(dialect, coltype)


# Named constraints, so later migrations can drop or alter them on every backend.
NAMING_CONVENTION = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)
    type_annotation_map: ClassVar[dict[Any, Any]] = {
        datetime: UTCDateTime(),
        uuid.UUID: Uuid(),
        dict[str, Any]: JSON(),
    }


class Owner(Base):
    __tablename__ = "owners"

    id: Mapped[uuid.UUID] = mapped_column(primary_key=True, default=uuid.uuid4)
    name: Mapped[str] = mapped_column(String(128))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class ApiKey(Base):
    """An API key, stored as a prefix (for lookup) and a SHA-256 of the whole key."""

    __tablename__ = "api_keys"

    id: Mapped[uuid.UUID] = mapped_column(primary_key=True, default=uuid.uuid4)
    owner_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("owners.id", ondelete="CASCADE"))
    name: Mapped[str] = mapped_column(String(128))
    prefix: Mapped[str] = mapped_column(String(16), unique=True)
    key_hash: Mapped[str] = mapped_column(String(64))
    is_admin: Mapped[bool] = mapped_column(Boolean, default=False)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    revoked_at: Mapped[datetime | None] = mapped_column(default=None)
    # When the key was last verified, kept to within `auth.LAST_USED_GRANULARITY_SECONDS`: it
    # is written at most once per that interval, never per request.
    last_used_at: Mapped[datetime | None] = mapped_column(default=None)
    # Dashboard sessions signed in with this key before this moment are over (signing out
    # sets it): a copy of a signed-out cookie is refused.
    sessions_not_before: Mapped[datetime | None] = mapped_column(default=None)


class Job(Base):
    __tablename__ = "jobs"
    __table_args__ = (
        Index("ix_jobs_owner_created", "owner_id", "created_at"),
        Index("ix_jobs_status", "status"),
        # Everyone's newest jobs first (the dashboard).
        Index("ix_jobs_created", "created_at", "id"),
    )

    id: Mapped[uuid.UUID] = mapped_column(primary_key=True, default=uuid.uuid4)
    kind: Mapped[str] = mapped_column(String(16))  # synthesis | training
    status: Mapped[str] = mapped_column(String(16), default="queued")
    stage: Mapped[str | None] = mapped_column(String(16), default=None)
    progress: Mapped[float] = mapped_column(Float, default=0.0)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    error: Mapped[str | None] = mapped_column(Text, default=None)
    # The failing task's formatted traceback: for admins (the dashboard), never in the public
    # Job, whose `error` is one line.
    traceback: Mapped[str | None] = mapped_column(Text, default=None)
    owner_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("owners.id", ondelete="CASCADE"))
    target_id: Mapped[uuid.UUID] = mapped_column()
    cancel_requested: Mapped[bool] = mapped_column(Boolean, default=False)
    lease_expires_at: Mapped[datetime | None] = mapped_column(default=None)
    worker: Mapped[str | None] = mapped_column(String(255), default=None)
    # The fencing token: counts every claim of the job (never reset, unlike `attempts`). A
    # worker's writes name the claim it works under and are refused once the job was
    # claimed again (`service.contexts.jobs.Fenced`).
    claim: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    started_at: Mapped[datetime | None] = mapped_column(default=None)
    finished_at: Mapped[datetime | None] = mapped_column(default=None)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow, onupdate=utcnow)


class SegClass(Base):
    """A class being synthesized (named SegClass: `class` is a Python keyword)."""

    __tablename__ = "classes"
    __table_args__ = (Index("ix_classes_owner_created", "owner_id", "created_at"),)

    id: Mapped[uuid.UUID] = mapped_column(primary_key=True, default=uuid.uuid4)
    owner_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("owners.id", ondelete="CASCADE"))
    name: Mapped[str] = mapped_column(String(64))
    seed: Mapped[int] = mapped_column(BigInteger)
    prompts: Mapped[list[str]] = mapped_column(JSON, default=list)
    # How its template prompts are worded (`aligndiff.names.PromptStyle`), fixed when it is
    # created so that its job draws every sample, on any retry, with the same prompts. Rows
    # from before the styles were recorded are "always-a" (their prompts said "a" to any name).
    prompt_style: Mapped[str] = mapped_column(
        String(16), default=PROMPT_STYLE, server_default=LEGACY_PROMPT_STYLE
    )
    num_shots: Mapped[int] = mapped_column(Integer)
    num_samples_requested: Mapped[int] = mapped_column(Integer)
    num_samples_done: Mapped[int] = mapped_column(Integer, default=0)
    num_accepted: Mapped[int] = mapped_column(Integer, default=0)
    clip_score_mean: Mapped[float | None] = mapped_column(Float, default=None)
    token: Mapped[str | None] = mapped_column(String(80), default=None)
    embedding_key: Mapped[str | None] = mapped_column(String(512), default=None)
    prototypes_key: Mapped[str | None] = mapped_column(String(512), default=None)
    model_ids: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    # The deployment model (a name in ALIGNDIFF_MODELS) whose workers synthesize it; null for
    # classes from before models were named: the deployment's default model.
    model: Mapped[str | None] = mapped_column(String(64), default=None)
    # The background weight of the inversion loss: the value used (None while `auto` has not
    # chosen yet), and whether it is chosen per class by trial inversions (`tuning` holds them).
    bg_lambda: Mapped[float | None] = mapped_column(Float, default=None)
    bg_lambda_auto: Mapped[bool] = mapped_column(Boolean, default=False, server_default=false())
    tuning: Mapped[list[dict[str, Any]] | None] = mapped_column(JSON, default=None)
    # The acceptance thresholds used for this class's samples (calibrated on its shots, or
    # from the settings), as `aligndiff.acceptance.AcceptanceThresholds.to_dict` writes them.
    acceptance: Mapped[dict[str, Any] | None] = mapped_column(JSON, default=None)
    job_id: Mapped[uuid.UUID | None] = mapped_column(default=None)
    # The bytes its owner uploaded for it (shots and masks as received): the storage quota.
    upload_bytes: Mapped[int] = mapped_column(BigInteger, default=0, server_default="0")
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow, onupdate=utcnow)


class Shot(Base):
    __tablename__ = "shots"
    __table_args__ = (UniqueConstraint("class_id", "position"),)

    id: Mapped[uuid.UUID] = mapped_column(primary_key=True, default=uuid.uuid4)
    class_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("classes.id", ondelete="CASCADE"))
    position: Mapped[int] = mapped_column(Integer)
    filename: Mapped[str] = mapped_column(String(255))
    width: Mapped[int] = mapped_column(Integer)
    height: Mapped[int] = mapped_column(Integer)
    original_key: Mapped[str] = mapped_column(String(512))
    original_mask_key: Mapped[str] = mapped_column(String(512))
    image_key: Mapped[str] = mapped_column(String(512))
    mask_key: Mapped[str] = mapped_column(String(512))


class Sample(Base):
    """One synthetic sample. `finalized_at` is set once its mask and scores are final; only
    finalized samples are listed."""

    __tablename__ = "samples"
    # NOTE: the unique (class_id, index) index also serves the listing's keyset pagination.
    __table_args__ = (UniqueConstraint("class_id", "index"),)

    id: Mapped[uuid.UUID] = mapped_column(primary_key=True, default=uuid.uuid4)
    class_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("classes.id", ondelete="CASCADE"))
    index: Mapped[int] = mapped_column(Integer)
    prompt: Mapped[str] = mapped_column(Text)
    prompt_kind: Mapped[str] = mapped_column(String(16))
    seed: Mapped[int] = mapped_column(BigInteger)  # 63-bit per-sample seeds
    width: Mapped[int] = mapped_column(Integer)
    height: Mapped[int] = mapped_column(Integer)
    image_key: Mapped[str] = mapped_column(String(512))
    coarse_mask_key: Mapped[str] = mapped_column(String(512))
    mask_key: Mapped[str | None] = mapped_column(String(512), default=None)
    consensus_iou: Mapped[float | None] = mapped_column(Float, default=None)
    mask_source: Mapped[str | None] = mapped_column(String(16), default=None)
    ood_iou: Mapped[float | None] = mapped_column(Float, default=None)
    clip_score: Mapped[float | None] = mapped_column(Float, default=None)
    shot_similarity: Mapped[float | None] = mapped_column(Float, default=None)
    # Cosine between the sample's foreground prototype (FSS features under its final mask) and
    # the shots'; one of the acceptance signals.
    prototype_similarity: Mapped[float | None] = mapped_column(Float, default=None)
    accepted: Mapped[bool | None] = mapped_column(Boolean, default=None)
    # Why a sample is not accepted: "ood", "similarity" (or "user", a reviewer's verdict).
    rejected_by: Mapped[str | None] = mapped_column(String(16), default=None)
    # Who decided `accepted`: "filter" (the acceptance filters) or "user" (a reviewer).
    accepted_by: Mapped[str | None] = mapped_column(String(16), default=None)
    # When a reviewer last changed the verdict or the mask.
    reviewed_at: Mapped[datetime | None] = mapped_column(default=None)
    # Connected objects in the final mask (aligndiff.instances); NULL if finalized before they
    # were counted.
    instances: Mapped[int | None] = mapped_column(Integer, default=None)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    finalized_at: Mapped[datetime | None] = mapped_column(default=None)


class IdempotencyRecord(Base):
    """The first answer to a POST with an Idempotency-Key, replayed for the same key and body."""

    __tablename__ = "idempotency_records"

    owner_id: Mapped[uuid.UUID] = mapped_column(
        ForeignKey("owners.id", ondelete="CASCADE"), primary_key=True
    )
    key: Mapped[str] = mapped_column(String(255), primary_key=True)
    request_hash: Mapped[str] = mapped_column(String(64))
    status_code: Mapped[int] = mapped_column(Integer)
    body: Mapped[str] = mapped_column(Text)
    location: Mapped[str | None] = mapped_column(String(512), default=None)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class Training(Base):
    """A segmenter trained on classes' shots and (optionally) their accepted samples.

    Its state is its job's; the blobs (weights, baseline weights, the latest checkpoint) are
    named here once stored, each written before the row names it.
    """

    __tablename__ = "trainings"
    __table_args__ = (Index("ix_trainings_owner_created", "owner_id", "created_at"),)

    id: Mapped[uuid.UUID] = mapped_column(primary_key=True, default=uuid.uuid4)
    owner_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("owners.id", ondelete="CASCADE"))
    class_ids: Mapped[list[str]] = mapped_column(JSON)  # label k is class_ids[k - 1]
    architecture: Mapped[str] = mapped_column(String(32))
    steps: Mapped[int] = mapped_column(Integer)
    batch_size: Mapped[int] = mapped_column(Integer)
    use_synthetic: Mapped[bool] = mapped_column(Boolean)
    copy_paste: Mapped[bool] = mapped_column(Boolean)
    compare_baseline: Mapped[bool] = mapped_column(Boolean)
    # validation | held_out_shots | training_shots
    eval_set: Mapped[str] = mapped_column(String(16), default="training_shots")
    # The uploaded validation set, [image key, label map key] per pair (None: evaluate on the
    # shots); the blobs are written before the row.
    validation_keys: Mapped[list[list[str]] | None] = mapped_column(JSON, default=None)
    metrics: Mapped[dict[str, Any] | None] = mapped_column(JSON, default=None)
    # Held-out evaluation: each finished fold run's metrics by run name, written as each run
    # ends, so a resumed job goes on at the first fold without a result.
    fold_results: Mapped[dict[str, Any] | None] = mapped_column(JSON, default=None)
    weights_key: Mapped[str | None] = mapped_column(String(512), default=None)
    baseline_weights_key: Mapped[str | None] = mapped_column(String(512), default=None)
    checkpoint_key: Mapped[str | None] = mapped_column(String(512), default=None)
    # The bytes its owner uploaded for it (the validation set): the storage quota.
    upload_bytes: Mapped[int] = mapped_column(BigInteger, default=0, server_default="0")
    job_id: Mapped[uuid.UUID | None] = mapped_column(default=None)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow, onupdate=utcnow)


class WorkerHeartbeat(Base):
    """A worker process that is (or was) online: it writes `last_seen_at` every few seconds,
    so the dashboard can tell live workers from dead ones without asking the broker."""

    __tablename__ = "worker_heartbeats"

    # The process that runs tasks, named as `Job.worker` names it ("host:pid").
    name: Mapped[str] = mapped_column(String(255), primary_key=True)
    hostname: Mapped[str] = mapped_column(String(255))
    pid: Mapped[int] = mapped_column(Integer)
    started_at: Mapped[datetime] = mapped_column(default=utcnow)
    last_seen_at: Mapped[datetime] = mapped_column(default=utcnow)
    current_job_id: Mapped[uuid.UUID | None] = mapped_column(default=None)
    # The model whose classes it draws (`Settings.served_model`); null for a worker of
    # predictions only, and for rows from before models were named.
    model: Mapped[str | None] = mapped_column(String(64), default=None)
