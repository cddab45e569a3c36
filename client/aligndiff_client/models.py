"""The service's resources as typed models (API.md, "Resources").

Every model allows extra fields, so an older client keeps working against a newer server, and
enumerations (`status`, `stage`, `kind`, …) are plain strings for the same reason: a value added
later must not make a response unreadable. The values known today are listed in `Literal`
aliases for reference and in the docstrings.
"""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Generic, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field

T = TypeVar("T")

Status = Literal["queued", "running", "succeeded", "failed", "cancelled"]
TERMINAL_STATUSES = frozenset({"succeeded", "failed", "cancelled"})
DatasetFormat = Literal["voc", "coco", "hf", "webdataset"]
Architecture = Literal["deeplabv3", "segformer"]
EvalSet = Literal["validation", "held_out_shots", "training_shots"]


class Resource(BaseModel):
    model_config = ConfigDict(extra="allow", frozen=True)


class Page(Resource, Generic[T]):
    """One page of a list; pass `next_cursor` as `?cursor=` for the next (None at the end)."""

    items: list[T]
    next_cursor: str | None = None


class ClassInfo(Resource):
    """A class and the state of its synthesis job. `status`: queued | running | succeeded |
    failed | cancelled; `stage`: inversion | sampling | annotation | scoring | None."""

    id: uuid.UUID
    name: str
    status: str
    stage: str | None = None
    progress: float = 0.0
    num_shots: int
    num_samples_requested: int
    num_samples_done: int = 0
    num_accepted: int = 0
    clip_score_mean: float | None = None
    job_id: uuid.UUID | None = None
    error: str | None = None
    created_at: datetime
    updated_at: datetime

    @property
    def finished(self) -> bool:
        return self.status in TERMINAL_STATUSES


class Sample(Resource):
    """A synthetic sample. `prompt_kind`: inversion | text; `mask_source`: consensus |
    pseudo_label; `accepted` is False for text samples the OOD filter rejected."""

    id: uuid.UUID
    class_id: uuid.UUID
    index: int
    prompt: str
    prompt_kind: str
    seed: int
    width: int
    height: int
    clip_score: float | None = None
    shot_similarity: float | None = None
    consensus_iou: float | None = None
    ood_iou: float | None = None
    accepted: bool
    mask_source: str
    image_url: str
    mask_url: str
    created_at: datetime


class Job(Resource):
    """The long work behind a class or a training. `kind`: synthesis | training."""

    id: uuid.UUID
    kind: str
    status: str
    stage: str | None = None
    progress: float = 0.0
    attempts: int = 0
    error: str | None = None
    owner_id: uuid.UUID
    target_id: uuid.UUID
    created_at: datetime
    started_at: datetime | None = None
    finished_at: datetime | None = None

    @property
    def finished(self) -> bool:
        return self.status in TERMINAL_STATUSES


class BaselineMetrics(Resource):
    """The same training on the real shots alone; with held-out shots, its fold means and
    `per_class_iou_std`."""

    per_class_iou: dict[str, float] = Field(default_factory=dict)
    miou: float | None = None
    per_class_iou_std: dict[str, float] | None = None


class FoldMetrics(Resource):
    """One leave-one-shot-out fold: trained without `held_out` (class name → the held-out
    shot's position, from 0) and measured on those shots; `baseline` with compare_baseline."""

    fold: int
    held_out: dict[str, int] = Field(default_factory=dict)
    per_class_iou: dict[str, float] = Field(default_factory=dict)
    miou: float | None = None
    baseline: BaselineMetrics | None = None


class BaselineComparison(Resource):
    """The training with synthetic samples minus its baseline (shots alone). With held-out
    shots, `spread` is the standard deviation over folds of the per-fold mIoU difference and
    `exceeds_spread` whether |miou_difference| exceeds it; both None for a validation set."""

    miou_difference: float | None = None
    per_class_difference: dict[str, float] = Field(default_factory=dict)
    spread: float | None = None
    exceeds_spread: bool | None = None


class TrainingMetrics(Resource):
    """Evaluation of a trained segmenter. `eval_set` says what on:

    - `validation`: the validation set uploaded with the training;
    - `held_out_shots`: leave-one-shot-out folds over the classes' shots (no validation set,
      2+ shots in every class); the IoUs are fold means, `per_class_iou_std` their standard
      deviation, `folds` each fold's results;
    - `training_shots`: the very shots the model trained on (no validation set, a class with
      1 shot): optimistic, it says little of how the model does on new images.

    `baseline` (trained on the real shots only) and `comparison` when the training was asked
    to compare."""

    per_class_iou: dict[str, float] = Field(default_factory=dict)
    miou: float | None = None
    eval_set: str | None = None
    per_class_iou_std: dict[str, float] | None = None
    folds: list[FoldMetrics] | None = None
    baseline: BaselineMetrics | None = None
    comparison: BaselineComparison | None = None

    @property
    def optimistic(self) -> bool:
        """Whether the metrics were measured on the images trained on."""
        # NOTE: servers before held-out evaluation named the training shots `shots`.
        return self.eval_set in ("training_shots", "shots")


class Training(Resource):
    """A downstream segmenter trained on classes' shots and samples. `architecture`:
    deeplabv3 | segformer."""

    id: uuid.UUID
    status: str
    progress: float = 0.0
    class_ids: list[uuid.UUID]
    architecture: str
    metrics: TrainingMetrics | None = None
    job_id: uuid.UUID | None = None
    error: str | None = None
    created_at: datetime
    updated_at: datetime

    @property
    def finished(self) -> bool:
        return self.status in TERMINAL_STATUSES
