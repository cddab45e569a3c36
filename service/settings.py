"""The service's settings: the core's settings plus database, broker, storage and limits."""

from __future__ import annotations

import re
from pathlib import Path

from pydantic import Field, SecretStr, ValidationError, model_validator

from aligndiff.settings import Settings as CoreSettings

# The one model's name in a deployment that does not set ALIGNDIFF_MODELS.
DEFAULT_MODEL = "default"
MODEL_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")


def _data_dir() -> Path:
    return Path.cwd() / "aligndiff-data"


class Settings(CoreSettings):
    """Everything configurable, from `ALIGNDIFF_*` environment variables.

    Unset URLs default to the embedded single-machine setup under `data_dir`: SQLite, a local
    blob folder, and a broker that needs no server.
    """

    data_dir: Path = Field(default_factory=_data_dir)
    database_url: str | None = None
    database_pool_size: int = 32  # per process; cover the API's concurrent requests
    # Per API process: PostgreSQL connections of the async pool that serves the hot reads
    # (`service.reads`); a read takes one for a query's round trip only. More connections
    # than cores make PostgreSQL's backends fight the API for them (bench/RESULTS.md: 4 gave
    # a p99 of 26-30 ms where 8 gave 36-47 ms, 2 workers at 32 connections on 2 cores).
    read_pool_size: int = Field(default=4, ge=1)
    broker_url: str | None = None
    # How long a Redis broker that does not answer is waited for, per connect and per command
    # (and for data sent and not acknowledged, TCP_USER_TIMEOUT): a send to a broker cut off
    # fails then, and the job it started stays queued for the sweeper to start again.
    broker_socket_timeout_seconds: float = Field(default=5.0, gt=0)
    # Where workers store the answers the API waits for (predict); unset: see
    # `resolved_result_backend_url`.
    result_backend_url: str | None = None
    storage_url: str | None = None
    s3_endpoint_url: str | None = None
    # Where clients reach the S3 store, when not at `s3_endpoint_url` (e.g. a name only the
    # containers resolve): presigned download URLs are signed for it. Unset: the same.
    s3_public_endpoint_url: str | None = None
    s3_region: str = "us-east-1"
    presign_seconds: int = 900
    # How long a process trusts a key it verified (a revoked key works that much longer there).
    auth_cache_seconds: float = 10.0
    # The dashboard's signed session cookies. Unset, a secret is generated once and kept in
    # `data_dir/session-secret`; several API replicas must share one, so set it for them.
    session_secret: SecretStr | None = None
    session_max_age_seconds: int = Field(default=12 * 3600, ge=60)
    # Mark the session cookie Secure (sent over HTTPS only): set it behind TLS.
    session_cookie_secure: bool = False
    # How often a worker process writes its heartbeat; it counts as online for 3 intervals.
    worker_heartbeat_seconds: float = Field(default=5.0, gt=0)
    # A worker not heard from for this long is taken as dead: the sweep takes over the job it
    # was working on at once, without waiting for the job's lease to run out.
    worker_lost_after_seconds: float = Field(default=60.0, gt=0)

    # Limits
    max_upload_bytes: int = 64 * 1024 * 1024
    max_image_pixels: int = 40_000_000
    max_shots: int = 10
    max_num_samples: int = 1000
    max_training_steps: int = 20_000
    max_validation_images: int = Field(default=50, ge=1)

    # Rate limits per API key (token buckets; 0 turns one off): every /v1 request, and the
    # POSTs that queue GPU work (create a class or training, retry a job). Shared by every API
    # process through Redis (`rate_limit_url`, else the broker when it is redis://), else kept
    # in this process ("memory://").
    rate_limit_per_second: float = Field(default=20.0, ge=0)
    rate_limit_burst: int = Field(default=100, ge=1)
    job_rate_limit_per_minute: float = Field(default=60.0, ge=0)
    job_rate_limit_burst: int = Field(default=30, ge=1)
    rate_limit_url: str | None = None
    # Quotas per owner (0: none; admin keys are exempt), checked in the transaction that
    # queues the job: queued + running jobs, samples per class (under `max_num_samples`), and
    # the bytes of every upload its classes and trainings keep.
    quota_concurrent_jobs: int = Field(default=4, ge=0)
    quota_samples_per_class: int = Field(default=500, ge=0)
    quota_upload_bytes: int = Field(default=1024**3, ge=0)
    quota_retry_after_seconds: int = Field(default=30, ge=1)
    # When set, GET /metrics needs `Authorization: Bearer <metrics_token>`.
    metrics_token: SecretStr | None = None

    # Trainings: the segmenters' backbone ("tiny": random weights built from config) and how
    # many trained segmenters a worker keeps loaded for `predict`.
    segmenter_backbone: str = "tiny"
    predict_cache_size: int = Field(default=4, ge=1)
    # How long `POST /v1/trainings/{id}/predict` waits for a worker's answer before a 503.
    predict_timeout_seconds: float = Field(default=30.0, gt=0)
    training_resolution: int = Field(default=64, ge=16)
    training_checkpoint_every: int = Field(default=50, ge=1)
    # How often a training job writes its progress (and sees a cancel), at most.
    training_report_seconds: float = Field(default=1.0, ge=0)
    # Held-out evaluation (no validation set, 2+ shots in every class): at most this many
    # leave-one-shot-out folds, each one more training of the segmenter.
    eval_max_folds: int = Field(default=5, ge=2)

    # The deployment's diffusion models, name → spec (`tiny`, a local folder or a hub id), as
    # JSON: `{"sd15": "tiny", "sdxl": "tiny-sdxl"}`; the first is the default for new classes.
    # Unset: one model, "default", whose spec is ALIGNDIFF_DIFFUSION_MODEL.
    models: dict[str, str] | None = None
    # The model a worker process serves (a name in `models`; unset: the default): it loads that
    # model only and draws only its classes' synthesis tasks (`aligndiff worker --model`).
    worker_model: str | None = None

    # Workers
    sample_chunk_size: int = 8
    annotation_chunk_size: int = 32
    task_visibility_timeout: int = 7200
    job_lease_seconds: int = 600
    max_job_attempts: int = 3

    # The sweeper (`aligndiff sweep`, and every worker periodically): job recovery, orphaned
    # blobs, stale rows. A blob is written before the row that names it, so only blobs older
    # than the grace period can be orphans; a failed or cancelled job's unfinished samples are
    # kept for a retry that long; idempotency records are replayed that long.
    sweep_interval_seconds: float = Field(default=60.0, gt=0)
    orphan_grace_seconds: int = Field(default=3600, ge=0)
    pending_retention_seconds: int = Field(default=7 * 24 * 3600, ge=0)
    idempotency_ttl_seconds: int = Field(default=24 * 3600, ge=0)

    @model_validator(mode="after")
    def _lost_workers_are_silent_for_several_beats(self) -> Settings:
        if self.worker_lost_after_seconds < 3 * self.worker_heartbeat_seconds:
            raise ValueError(
                "ALIGNDIFF_WORKER_LOST_AFTER_SECONDS must be at least 3 heartbeats (3 × "
                f"ALIGNDIFF_WORKER_HEARTBEAT_SECONDS = {3 * self.worker_heartbeat_seconds:g} s): "
                "a live worker's late beat would have its job taken over"
            )
        return self

    @model_validator(mode="after")
    def _worker_loads_the_model_it_serves(self) -> Settings:
        if self.models is not None and not self.models:
            raise ValueError("ALIGNDIFF_MODELS must name at least one model")
        # A model's name is part of its queue's name and of URLs' query strings.
        bad = [name for name in self.models or () if not MODEL_NAME.fullmatch(name)]
        if bad:
            raise ValueError(f"model names must match {MODEL_NAME.pattern}, got {bad}")
        served = self.served_models
        if self.worker_model is not None and self.worker_model not in served:
            raise ValueError(
                f"unknown model {self.worker_model!r}: this deployment serves {', '.join(served)}"
            )
        # NOTE: the worker's model is what `diffusion_model` names everywhere else (model
        # loading, tokenizer, defaults), so one process loads one model.
        self.diffusion_model = served[self.served_model]
        return self

    @property
    def served_models(self) -> dict[str, str]:
        """The deployment's models, name → spec, the default first."""
        return dict(self.models) if self.models else {DEFAULT_MODEL: self.diffusion_model}

    @property
    def default_model(self) -> str:
        """The name of the model a class gets when it names none."""
        return next(iter(self.served_models))

    @property
    def served_model(self) -> str:
        """The name of the model this process serves as a worker."""
        return self.worker_model or self.default_model

    @property
    def resolved_database_url(self) -> str:
        return self.database_url or f"sqlite:///{self.data_dir / 'aligndiff.db'}"

    @property
    def resolved_broker_url(self) -> str:
        return self.broker_url or f"sqla+sqlite:///{self.data_dir / 'broker.db'}"

    @property
    def resolved_result_backend_url(self) -> str:
        """The broker's own Redis; Celery's database backend beside a SQLAlchemy broker (a
        file of its own for SQLite, which locks the whole file per write); in-memory for the
        in-memory broker; else answers as AMQP messages to the caller (`rpc://`)."""
        if self.result_backend_url:
            return self.result_backend_url
        broker = self.resolved_broker_url
        if broker.startswith(("redis://", "rediss://")):
            return broker
        if broker.startswith("sqla+sqlite"):
            return f"db+sqlite:///{self.data_dir / 'results.db'}"
        if broker.startswith("sqla+"):
            return "db+" + broker.removeprefix("sqla+")
        if broker.startswith("memory://"):
            return "cache+memory://"
        return "rpc://"

    @property
    def resolved_storage_url(self) -> str:
        return self.storage_url or f"file://{self.data_dir / 'blobs'}"


def describe_invalid_settings(error: ValidationError) -> str:
    """What a user should read when the settings do not validate: one line per problem, naming
    the environment variable to fix."""
    prefix = str(Settings.model_config.get("env_prefix", ""))
    lines = []
    for problem in error.errors():
        message = str(problem["msg"]).removeprefix("Value error, ")
        field = problem["loc"][0] if problem["loc"] else None
        lines.append(f"{prefix}{str(field).upper()}: {message}" if field else message)
    return "invalid settings:\n  " + "\n  ".join(lines)
