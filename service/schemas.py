"""The public shapes of the API (../shared/API.md): names and fields are the contract."""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Annotated, Generic, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field

T = TypeVar("T")

JobStatus = Literal["queued", "running", "succeeded", "failed", "cancelled"]
Stage = Literal["inversion", "sampling", "annotation", "scoring"]


class Page(BaseModel, Generic[T]):
    items: list[T]
    next_cursor: str | None = Field(
        description="Pass as ?cursor= for the next page; null at the end."
    )


class ClassPublic(BaseModel):
    id: uuid.UUID
    name: str
    status: JobStatus
    stage: Stage | None
    progress: float = Field(ge=0, le=1)
    num_shots: int
    num_samples_requested: int
    num_samples_done: int
    num_accepted: int
    clip_score_mean: float | None
    job_id: uuid.UUID | None
    error: str | None
    created_at: datetime
    updated_at: datetime


class SamplePublic(BaseModel):
    id: uuid.UUID
    class_id: uuid.UUID
    index: int
    prompt: str
    prompt_kind: Literal["inversion", "text"]
    seed: int
    width: int
    height: int
    clip_score: float | None
    shot_similarity: float | None
    consensus_iou: float | None
    ood_iou: float | None
    accepted: bool
    mask_source: Literal["consensus", "pseudo_label"]
    image_url: str
    mask_url: str
    created_at: datetime


class JobPublic(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: uuid.UUID
    kind: Literal["synthesis", "training"]
    status: JobStatus
    stage: str | None
    progress: float
    attempts: int
    error: str | None
    owner_id: uuid.UUID
    target_id: uuid.UUID
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None


class ProblemDetail(BaseModel):
    """RFC 9457 problem details, as every error is answered."""

    type: str = "about:blank"
    title: str
    status: int
    detail: str
    errors: list[dict[str, str]] | None = None


MAX_SEED = 2**63 - 1


class ClassCreate(BaseModel):
    """The fields of `POST /v1/classes` besides its files (sent as multipart form fields)."""

    name: str = Field(min_length=1, max_length=64, description="The class name, e.g. 'pidan'.")
    prompts: list[Annotated[str, Field(min_length=1, max_length=500)]] = Field(
        default_factory=list,
        max_length=50,
        description="Text prompts for the text-conditioned half of the samples (repeat the "
        "field); each must mention the class name. Default: 'a photo of a {name}'.",
    )
    num_samples: int = Field(ge=1, description="How many samples to synthesize (server max).")
    seed: int | None = Field(
        default=None, ge=0, le=MAX_SEED, description="The class seed; random when absent."
    )


class Health(BaseModel):
    status: Literal["ok"] = "ok"


class Readiness(BaseModel):
    status: Literal["ok"] = "ok"
    checks: dict[str, str] = Field(description="Each dependency checked, with its state.")


Architecture = Literal["deeplabv3", "segformer"]
MAX_TRAINING_CLASSES = 20


class TrainingCreate(BaseModel):
    """The body of `POST /v1/trainings`."""

    model_config = ConfigDict(extra="forbid")

    class_ids: list[uuid.UUID] = Field(
        min_length=1,
        max_length=MAX_TRAINING_CLASSES,
        description="The classes to segment, each with its synthesis succeeded; label k of "
        "the trained model (and of `predict`'s mask) is the k-th class, 0 is background.",
    )
    architecture: Architecture = Field(description="The segmenter to train.")
    steps: int = Field(default=200, ge=1, description="Optimizer steps (server max).")
    batch_size: int = Field(default=8, ge=1, le=64)
    use_synthetic: bool = Field(
        default=True, description="Train on the classes' accepted samples besides the shots."
    )
    copy_paste: bool = Field(
        default=True, description="Paste the classes' objects onto other training images."
    )
    compare_baseline: bool = Field(
        default=False,
        description="Also train on the shots alone and report its metrics as `baseline`.",
    )


class IoUMetrics(BaseModel):
    per_class_iou: dict[str, float] = Field(description="IoU per class name.")
    miou: float = Field(description="The mean of the per-class IoUs.")


class TrainingMetrics(IoUMetrics):
    eval_set: Literal["validation", "shots"] = Field(
        description="What the metrics are measured on. `validation`: the validation set "
        "uploaded with the request; `shots`: the classes' real shots, which are trained on "
        "too (an optimistic measure), when none was uploaded."
    )
    baseline: IoUMetrics | None = Field(
        default=None, description="The same training on the shots alone (compare_baseline)."
    )


class TrainingPublic(BaseModel):
    id: uuid.UUID
    status: JobStatus
    progress: float = Field(ge=0, le=1)
    class_ids: list[uuid.UUID]
    architecture: Architecture
    steps: int
    batch_size: int
    use_synthetic: bool
    copy_paste: bool
    compare_baseline: bool
    metrics: TrainingMetrics | None = Field(description="Set once the training succeeded.")
    job_id: uuid.UUID | None
    error: str | None
    created_at: datetime
    updated_at: datetime
