"""The public shapes of the API (../shared/API.md): names and fields are the contract."""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Annotated, Any, Generic, Literal, TypeVar

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, StrictBool

from aligndiff.settings import parse_bg_lambda

T = TypeVar("T")

JobStatus = Literal["queued", "running", "succeeded", "failed", "cancelled"]
Stage = Literal["inversion", "sampling", "annotation", "scoring"]


class Page(BaseModel, Generic[T]):
    items: list[T]
    next_cursor: str | None = Field(
        description="Pass as ?cursor= for the next page; null at the end."
    )


class TuningTrial(BaseModel):
    bg_lambda: float
    score: float = Field(description="The mean of the two similarities below.")
    prototype_similarity: float = Field(
        description="The trial samples' mean prototype similarity to the shots."
    )
    shot_similarity: float = Field(
        description="The trial samples' mean CLIP similarity to the shots."
    )
    steps: int = Field(description="The inversion steps the trial ran.")
    loss: float | None = Field(description="The trial's last inversion loss.")


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
    model: str = Field(
        description="The deployment model (`GET /v1/models`) that synthesizes the class."
    )
    bg_lambda: float | None = Field(
        description="The inversion's background weight the class uses (null while `auto` "
        "has not chosen yet)."
    )
    tuning: list[TuningTrial] | None = Field(
        description="`bg_lambda: auto`: the values tried, each with its trial samples' mean "
        "acceptance signals and score (the best is kept); null for a fixed value."
    )
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
    prototype_similarity: float | None = Field(
        description="Cosine between the sample's foreground prototype (few-shot segmenter "
        "features under its mask) and the shots'."
    )
    consensus_iou: float | None
    ood_iou: float | None
    accepted: bool
    rejected_by: Literal["ood", "similarity", "user"] | None = Field(
        description="Why the sample is not accepted: the OOD filter (`ood`), the semantic "
        "check against the shots (`similarity`) or a reviewer (`user`); null when accepted."
    )
    accepted_by: Literal["filter", "user"] | None = Field(
        description="Who decided `accepted`: the acceptance filters or a reviewer "
        "(`PATCH /v1/samples/{id}`)."
    )
    mask_source: Literal["consensus", "pseudo_label", "human"] = Field(
        description="Where the final mask came from: consensus of the coarse masks, a "
        "pseudo-label of the few-shot segmenter, or a reviewer (`PUT /v1/samples/{id}/mask`)."
    )
    instances: int | None = Field(
        description="Connected objects in the final mask of at least "
        "`ALIGNDIFF_INSTANCE_MIN_AREA` pixels (one annotation each in COCO and YOLO "
        "datasets); null for samples finalized before instances were counted."
    )
    reviewed_at: datetime | None = Field(
        description="When a reviewer last changed the verdict or the mask; null if never."
    )
    image_url: str
    mask_url: str
    created_at: datetime


class SampleReview(BaseModel):
    """The body of `PATCH /v1/samples/{id}`: a reviewer's verdict on a finished sample."""

    model_config = ConfigDict(extra="forbid")

    accepted: StrictBool = Field(
        description="Keep the sample (`true`: in `accepted_only` datasets and trainings) or "
        "reject it (`false`). Overrides the acceptance filters' verdict: the sample's "
        "`accepted_by` becomes `user` (and `rejected_by` `user` when rejected)."
    )


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


def _parse_bg_lambda(value: Any) -> Any:
    """A form field's text ("auto" or a number in [0, 2]) as one error on the field itself,
    rather than one per member of the union."""
    if value is None or isinstance(value, bool):
        return value
    return parse_bg_lambda(str(value))


BgLambda = Annotated[
    Annotated[float, Field(ge=0, le=2)] | Literal["auto"], BeforeValidator(_parse_bg_lambda)
]


class ClassCreate(BaseModel):
    """The fields of `POST /v1/classes` besides its files (sent as multipart form fields)."""

    name: str = Field(min_length=1, max_length=64, description="The class name, e.g. 'pidan'.")
    prompts: list[Annotated[str, Field(min_length=1, max_length=500)]] = Field(
        default_factory=list,
        max_length=50,
        description="Text prompts for the text-conditioned half of the samples (repeat the "
        "field); each must mention the class name (the mask is read at its last mention) and "
        "fit the text encoder (75 tokens on Stable Diffusion 1.x). Default: 'a photo of a "
        "{name}', with 'an' before a vowel sound.",
    )
    num_samples: int = Field(ge=1, description="How many samples to synthesize (server max).")
    seed: int | None = Field(
        default=None, ge=0, le=MAX_SEED, description="The class seed; random when absent."
    )
    model: str | None = Field(
        default=None,
        max_length=64,
        description="One of the deployment's models (`GET /v1/models`). Default: the first.",
    )
    bg_lambda: BgLambda | None = Field(
        default=None,
        description="The inversion's background weight in [0, 2], or `auto`: short trial "
        "inversions at several values, the best kept by the acceptance signals of a few trial "
        "samples. Default: the server's (0.6).",
    )


class ModelPublic(BaseModel):
    """One of the deployment's diffusion models."""

    name: str = Field(description="What a class's `model` field names it by.")
    family: Literal["sd", "sdxl"] = Field(description="Stable Diffusion 1.x/2.x, or SDXL.")
    default_resolution: int = Field(description="The side its UNet was trained at, in pixels.")


class ModelsPublic(BaseModel):
    """`GET /v1/models`: the deployment's models, the default first."""

    items: list[ModelPublic]


class ServiceIndex(BaseModel):
    """`GET /`: what this service is, and where its parts are."""

    name: str = Field(examples=["AlignDiff"])
    version: str = Field(examples=["0.1.0"])
    docs: str = Field(description="The interactive API docs.", examples=["/docs"])
    openapi: str = Field(description="This OpenAPI document.", examples=["/openapi.json"])
    dashboard: str = Field(description="The admins' dashboard.", examples=["/admin"])
    health: str = Field(description="The liveness probe.", examples=["/healthz"])


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
        description="Also train on the shots alone and report its metrics as `baseline`, "
        "and the difference as `comparison`. Needs images neither model trains on: a "
        "validation set, or 2+ shots in every class (else 422).",
    )


class IoUMetrics(BaseModel):
    per_class_iou: dict[str, float] = Field(description="IoU per class name.")
    miou: float = Field(description="The mean of the per-class IoUs.")


class TrainingBaseline(IoUMetrics):
    per_class_iou_std: dict[str, float] | None = Field(
        default=None,
        description="Held-out shots only: the standard deviation over folds of each class's "
        "IoU (`per_class_iou` and `miou` are then fold means).",
    )


class TrainingFold(IoUMetrics):
    """One leave-one-shot-out fold: trained without its held-out shots, measured on them."""

    fold: int = Field(ge=0, description="The fold's number, from 0.")
    held_out: dict[str, int] = Field(
        description="The shot held out of each class (by class name): its position among the "
        "class's shots, from 0."
    )
    baseline: IoUMetrics | None = Field(
        description="The fold trained on its remaining shots alone (compare_baseline)."
    )


class TrainingComparison(BaseModel):
    """The training with synthetic samples against its baseline (shots alone)."""

    miou_difference: float = Field(description="`miou` minus the baseline's.")
    per_class_difference: dict[str, float] = Field(
        description="Each class's IoU minus the baseline's, by class name."
    )
    spread: float | None = Field(
        description="Held-out shots: the standard deviation over folds of the per-fold mIoU "
        "difference; null for a validation set (a single measure)."
    )
    exceeds_spread: bool | None = Field(
        description="Whether |miou_difference| exceeds `spread`: a difference larger than "
        "the folds disagree by; null when `spread` is."
    )


class TrainingMetrics(IoUMetrics):
    eval_set: Literal["validation", "held_out_shots", "training_shots"] = Field(
        description="What the metrics are measured on. `validation`: the validation set "
        "uploaded with the request. `held_out_shots` (no validation set, 2+ shots in every "
        "class): leave-one-shot-out folds, each trained without one shot of every class and "
        "measured on those; `per_class_iou` and `miou` are fold means. `training_shots` (no "
        "validation set, a class with 1 shot): the very shots trained on, an optimistic "
        "measure that says little of how the model does on new images."
    )
    per_class_iou_std: dict[str, float] | None = Field(
        default=None,
        description="Held-out shots only: the standard deviation over folds of each class's IoU.",
    )
    folds: list[TrainingFold] | None = Field(
        default=None, description="Held-out shots only: each fold's results."
    )
    baseline: TrainingBaseline | None = Field(
        default=None,
        description="The same training on the shots alone, without synthetic samples "
        "(compare_baseline); with held-out shots, its fold means.",
    )
    comparison: TrainingComparison | None = Field(
        default=None, description="With compare_baseline: this training against its baseline."
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


# --- the report per class (`GET /v1/classes/{id}/report`) ------------------------------------


class Histogram(BaseModel):
    """Counts of one signal's values in fixed bins, the same for every class: bin i counts the
    values v with edges[i] <= v < edges[i + 1], the last bin its upper edge too. Samples
    without the signal are left out."""

    edges: list[float] = Field(description="The bins' edges, ascending: one more than counts.")
    counts: list[int] = Field(description="The samples in each bin.")


class ReportHistograms(BaseModel):
    clip_score: Histogram = Field(description="0 to 100 in 20 bins.")
    shot_similarity: Histogram = Field(description="A cosine: -1 to 1 in 20 bins.")
    prototype_similarity: Histogram = Field(description="A cosine: -1 to 1 in 20 bins.")
    ood_iou: Histogram = Field(description="0 to 1 in 10 bins.")
    consensus_iou: Histogram = Field(description="0 to 1 in 10 bins.")


class AcceptedCounts(BaseModel):
    samples: int = Field(ge=0)
    accepted: int = Field(ge=0)


class PromptKindCounts(BaseModel):
    inversion: AcceptedCounts
    text: AcceptedCounts


class MaskSourceCounts(BaseModel):
    consensus: AcceptedCounts
    pseudo_label: AcceptedCounts
    human: AcceptedCounts = Field(description="Masks a reviewer uploaded.")


class RejectionCounts(BaseModel):
    ood: int = Field(ge=0, description="Rejected by the OOD filter.")
    similarity: int = Field(ge=0, description="Rejected by the semantic check against the shots.")
    user: int = Field(ge=0, description="Rejected by a reviewer.")


class ReportCounts(BaseModel):
    """The class's finished samples (those listed by `GET /v1/classes/{id}/samples`)."""

    samples: int = Field(ge=0)
    accepted: int = Field(ge=0)
    by_prompt_kind: PromptKindCounts
    by_mask_source: MaskSourceCounts
    rejected_by: RejectionCounts = Field(
        description="The rejected samples by reason (samples judged before reasons were "
        "recorded have none, and are in no count here)."
    )


class ClassAcceptance(BaseModel):
    """The acceptance thresholds of the class's samples: a sample is accepted when both of
    its similarities reach them (and the OOD filter keeps it)."""

    prototype_similarity: float = Field(description="The lowest accepted prototype similarity.")
    shot_similarity: float = Field(description="The lowest accepted shot similarity.")
    source: dict[str, Literal["calibrated", "settings", "disabled"]] = Field(
        description="Where each threshold came from: calibrated on the class's shots, fixed "
        "by the server's settings, or the check disabled."
    )
    calibration: dict[str, list[float]] = Field(
        description="Each signal's values for the shots' calibration copies (flipped, cropped "
        "and colour-jittered shots) the thresholds were derived from."
    )


class ReportTraining(BaseModel):
    """A succeeded training on the class, as measured."""

    id: uuid.UUID
    eval_set: Literal["validation", "held_out_shots", "training_shots"] = Field(
        description="What the metrics are measured on (see Training's `metrics.eval_set`; "
        "`training_shots` is optimistic)."
    )
    miou: float = Field(description="The training's mIoU over all its classes.")
    baseline_miou: float | None = Field(
        description="The same training on the shots alone (compare_baseline); else null."
    )
    created_at: datetime


class ClassReport(BaseModel):
    """What a class's synthesis produced and how it was judged: its finished samples counted
    by prompt kind, mask source and verdict, histograms of their scores, the acceptance
    thresholds, the background weight (and its tuning trials), and the trainings on it."""

    class_id: uuid.UUID
    counts: ReportCounts
    histograms: ReportHistograms
    acceptance: ClassAcceptance | None = Field(
        description="The thresholds the samples were judged by; null until they are set."
    )
    bg_lambda: float | None = Field(
        description="The inversion's background weight used (null while `auto` has not chosen yet)."
    )
    tuning: list[TuningTrial] | None = Field(
        description="`bg_lambda: auto`: the trials, the chosen value among them; else null."
    )
    trainings: list[ReportTraining] = Field(
        description="The caller's succeeded trainings that include the class (an admin: "
        "everyone's), newest first, at most 100."
    )


class KeyCreate(BaseModel):
    """The body of `POST /v1/keys`."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(
        min_length=1,
        max_length=128,
        # At least one visible character and no control characters (PostgreSQL refuses NUL).
        pattern=r"^[^\x00-\x1f\x7f]*[^\s\x00-\x1f\x7f][^\x00-\x1f\x7f]*$",
        description="What the key is for, e.g. 'ci' or 'alice's laptop' (not unique); "
        "surrounding spaces are dropped.",
    )
    admin: bool = Field(
        default=False,
        description="An admin key: sees every owner's data, manages every key. Admin keys only.",
    )
    owner_id: uuid.UUID | None = Field(
        default=None,
        description="Whose key it is. A user key may name only its own owner (another answers "
        "403), and gets its own owner when it names none. An admin key may name any owner "
        "(an unknown one answers 422), or none: a new owner, named like the key.",
    )


class KeyPublic(BaseModel):
    """An API key as listed: never its secret, which is shown once, when it is created."""

    id: uuid.UUID
    name: str
    admin: bool
    owner_id: uuid.UUID
    created_at: datetime
    last_used_at: datetime | None = Field(
        description="When the key was last used, to within about a minute: it is recorded at "
        "most once a minute per key, not on every request. Null if it never was."
    )
    revoked_at: datetime | None = Field(
        description="When the key was revoked (`DELETE /v1/keys/{id}`); null while it works."
    )


class KeyCreated(BaseModel):
    """A new API key, with its secret: `key` is shown this once and cannot be read again."""

    id: uuid.UUID
    name: str
    admin: bool
    owner_id: uuid.UUID
    key: str = Field(description="The key to send as `Authorization: Bearer <key>`.")
    created_at: datetime
