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
DatasetFormat = Literal["voc", "coco", "hf", "webdataset", "yolo"]
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
    # The deployment model that synthesizes it (`Client.models()`); None from older servers.
    model: str | None = None
    bg_lambda: float | None = None
    tuning: list[TuningTrial] | None = None
    job_id: uuid.UUID | None = None
    error: str | None = None
    created_at: datetime
    updated_at: datetime

    @property
    def finished(self) -> bool:
        return self.status in TERMINAL_STATUSES


class Sample(Resource):
    """A synthetic sample. `prompt_kind`: inversion | text; `mask_source`: consensus |
    pseudo_label | human (a reviewer replaced it); `accepted` is False when a check refused it,
    and `rejected_by` says which: ood (the OOD filter, text samples), similarity (the semantic
    check against the shots) or user; `accepted_by`: filter | user. `instances`: the objects
    (connected components) in its mask."""

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
    prototype_similarity: float | None = None
    consensus_iou: float | None = None
    ood_iou: float | None = None
    accepted: bool
    rejected_by: str | None = None
    accepted_by: str | None = None
    mask_source: str
    instances: int | None = None
    reviewed_at: datetime | None = None
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


class ModelInfo(Resource):
    """One of the deployment's diffusion models: `name` is what `create_class(model=...)`
    takes; `family`: "sd" (Stable Diffusion 1.x/2.x) or "sdxl"; `default_resolution` in
    pixels."""

    name: str
    family: str
    default_resolution: int


class KeyInfo(Resource):
    """An API key, without its secret: `owner_id` is whose classes and jobs it sees (an
    `admin` key sees everyone's); `last_used_at` and `revoked_at` are None until it is used or
    revoked."""

    id: uuid.UUID
    name: str
    admin: bool = False
    owner_id: uuid.UUID
    created_at: datetime
    last_used_at: datetime | None = None
    revoked_at: datetime | None = None


class KeyCreated(Resource):
    """A key just created, with its secret `key`: shown this once, the service keeps only a
    hash of it."""

    id: uuid.UUID
    name: str
    admin: bool = False
    owner_id: uuid.UUID
    key: str
    created_at: datetime


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


class AcceptedCount(Resource):
    """Finished samples of one prompt kind or mask source, and how many were accepted."""

    samples: int = 0
    accepted: int = 0

    @property
    def share(self) -> float | None:
        """The accepted share; None without samples."""
        return self.accepted / self.samples if self.samples else None


class ReportCounts(Resource):
    """A class's finished samples and the accepted ones, in all and by `prompt_kind`
    (inversion | text) and `mask_source` (consensus | pseudo_label | human); `rejected_by`
    counts the rejected ones by reason: ood | similarity | user."""

    samples: int = 0
    accepted: int = 0
    by_prompt_kind: dict[str, AcceptedCount] = Field(default_factory=dict)
    by_mask_source: dict[str, AcceptedCount] = Field(default_factory=dict)
    rejected_by: dict[str, int] = Field(default_factory=dict)


class Histogram(Resource):
    """Counts of one signal's values in bins fixed per signal (the same for every class): bin
    i counts the values v with edges[i] <= v < edges[i + 1], the last bin its upper edge too.
    Samples without the signal are left out."""

    edges: list[float]
    counts: list[int]

    @property
    def total(self) -> int:
        return sum(self.counts)


class AcceptanceThresholds(Resource):
    """The lowest prototype and shot similarities a class's samples are accepted with;
    `source` says where each came from (calibrated | settings | disabled), `calibration` holds
    the shots' calibration copies' similarities they were derived from."""

    prototype_similarity: float | None = None
    shot_similarity: float | None = None
    source: dict[str, str] = Field(default_factory=dict)
    calibration: dict[str, list[float]] = Field(default_factory=dict)


class TuningTrial(Resource):
    """One trial inversion of `bg_lambda: auto`, scored by its trial samples' mean
    similarities to the shots (the best score is kept)."""

    bg_lambda: float
    score: float | None = None
    prototype_similarity: float | None = None
    shot_similarity: float | None = None
    steps: int | None = None
    loss: float | None = None


class ReportTraining(Resource):
    """A succeeded training on a class: its mIoU, and its baseline's (None without one).
    `eval_set` as in `TrainingMetrics`."""

    id: uuid.UUID
    eval_set: str | None = None
    miou: float | None = None
    baseline_miou: float | None = None
    created_at: datetime | None = None

    @property
    def optimistic(self) -> bool:
        """Whether the mIoU was measured on the images trained on."""
        return self.eval_set in ("training_shots", "shots")


class ClassReport(Resource):
    """What a class's synthesis produced and how it was judged: the counts of its finished
    samples, `histograms` of their scores by signal (clip_score, shot_similarity,
    prototype_similarity, ood_iou, consensus_iou), the acceptance thresholds, the background
    weight used (`tuning`: the trials of `bg_lambda: auto`), and the key's trainings on it,
    newest first."""

    class_id: uuid.UUID
    counts: ReportCounts
    histograms: dict[str, Histogram] = Field(default_factory=dict)
    acceptance: AcceptanceThresholds | None = None
    bg_lambda: float | None = None
    tuning: list[TuningTrial] | None = None
    trainings: list[ReportTraining] = Field(default_factory=list)
