"""Factories of the report tests (API, dashboard, browser): a class as a finished synthesis
leaves it (acceptance thresholds, bg_lambda tuning), samples of every verdict, prompt kind and
mask source, and succeeded trainings with their metrics.

They write through a `Session` and a `Storage`, so the browser test can seed a live server's
database and blob folder as the API tests seed theirs; the caller commits.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import datetime, timedelta
from io import BytesIO
from typing import Any

import numpy as np
from PIL import Image
from sqlalchemy.orm import Session

from service.models import Job, Sample, SegClass, Shot, Training, utcnow
from service.storage import Storage, sample_key, shot_key
from tests.api_support import insert_class

ACCEPTANCE = {
    "prototype_similarity": 0.42,
    "shot_similarity": 0.61,
    "source": {"prototype_similarity": "calibrated", "shot_similarity": "settings"},
    "calibration": {"prototype_similarity": [0.71, 0.66, 0.69], "shot_similarity": []},
}
TUNING = [
    {"bg_lambda": lam, "score": score, "prototype_similarity": proto, "shot_similarity": shot,
     "steps": 40, "loss": loss}
    for lam, score, proto, shot, loss in [
        (0.3, 0.61, 0.58, 0.64, 0.21), (0.6, 0.70, 0.69, 0.71, 0.19), (1.2, 0.55, 0.49, 0.61, 0.25)
    ]
]  # fmt: skip
TUNED_BG_LAMBDA = 0.6


@dataclass(frozen=True)
class SampleSpec:
    """One sample's verdict, prompt kind, mask source and scores (None: not measured)."""

    prompt_kind: str = "inversion"
    mask_source: str = "consensus"
    accepted: bool = True
    rejected_by: str | None = None
    clip_score: float | None = 30.0
    shot_similarity: float | None = 0.8
    prototype_similarity: float | None = 0.7
    ood_iou: float | None = None
    consensus_iou: float | None = 0.9
    finalized: bool = True


def rejected(by: str, **fields: Any) -> SampleSpec:
    return SampleSpec(accepted=False, rejected_by=by, **fields)


# A class's samples of every kind: 10 finished (6 accepted; 2 rejected by the OOD filter, 1 by
# the similarity check, 1 by a reviewer), with scores on the histograms' edges and some not
# measured (inversion samples have no OOD IoU), and 2 still being worked on.
MIXED_SAMPLES = [
    SampleSpec(clip_score=0.0, shot_similarity=-1.0, prototype_similarity=0.95),
    SampleSpec(clip_score=31.5, shot_similarity=0.83, prototype_similarity=0.74),
    SampleSpec(clip_score=100.0, shot_similarity=1.0, prototype_similarity=0.71),
    SampleSpec(mask_source="pseudo_label", clip_score=None, consensus_iou=None),
    rejected("similarity", mask_source="pseudo_label", shot_similarity=0.32,
             prototype_similarity=0.21, consensus_iou=0.4),
    SampleSpec(prompt_kind="text", clip_score=27.0, ood_iou=0.66, consensus_iou=1.0),
    SampleSpec(prompt_kind="text", mask_source="pseudo_label", clip_score=24.0, ood_iou=0.58),
    rejected("ood", prompt_kind="text", clip_score=18.0, ood_iou=0.12),
    rejected("ood", prompt_kind="text", mask_source="pseudo_label", clip_score=22.5,
             ood_iou=0.0, prototype_similarity=-0.05),
    rejected("user", prompt_kind="text", clip_score=29.0, ood_iou=0.71),
    SampleSpec(prompt_kind="text", clip_score=35.0, ood_iou=0.9, finalized=False),
    rejected("ood", prompt_kind="text", clip_score=5.0, ood_iou=0.1, finalized=False),
]  # fmt: skip


def add_report_class(
    session: Session,
    *,
    owner_id: uuid.UUID,
    name: str = "pidan",
    status: str = "succeeded",
    num_shots: int = 3,
    acceptance: dict[str, Any] | None = None,
    tuning: list[dict[str, Any]] | None = None,
    bg_lambda: float | None = TUNED_BG_LAMBDA,
) -> uuid.UUID:
    """A class and its synthesis job; `tuning` makes it a `bg_lambda: auto` class."""
    class_id, _ = insert_class(
        session,
        owner_id=owner_id,
        name=name,
        status=status,
        job_fields={"progress": 1.0},
        num_shots=num_shots,
        num_samples_requested=len(MIXED_SAMPLES),
        bg_lambda=bg_lambda,
        bg_lambda_auto=tuning is not None,
        tuning=tuning,
        acceptance=acceptance,
    )
    return class_id


def add_samples(
    session: Session, storage: Storage, class_id: uuid.UUID, specs: list[SampleSpec]
) -> list[uuid.UUID]:
    """The samples, indexed in order, each with a small image and mask blob; the class's
    `num_samples_done` and `num_accepted` count the finished ones."""
    ids = []
    for index, spec in enumerate(specs):
        image_key = sample_key(class_id, index, "image.png")
        mask_key = sample_key(class_id, index, "mask.png")
        image, mask = _picture(index)
        storage.put(image_key, image, content_type="image/png")
        storage.put(mask_key, mask, content_type="image/png")
        sample = Sample(
            class_id=class_id,
            index=index,
            prompt="a photo of a <pidan>" if spec.prompt_kind == "inversion" else "a pidan",
            prompt_kind=spec.prompt_kind,
            seed=1000 + index,
            width=32,
            height=32,
            image_key=image_key,
            coarse_mask_key=sample_key(class_id, index, "coarse.png"),
            mask_key=mask_key,
            consensus_iou=spec.consensus_iou,
            mask_source=spec.mask_source,
            ood_iou=spec.ood_iou,
            clip_score=spec.clip_score,
            shot_similarity=spec.shot_similarity,
            prototype_similarity=spec.prototype_similarity,
            accepted=spec.accepted,
            rejected_by=spec.rejected_by,
            finalized_at=utcnow() if spec.finalized else None,
        )
        session.add(sample)
        session.flush()
        ids.append(sample.id)
    seg_class = session.get(SegClass, class_id)
    assert seg_class is not None
    finished = [spec for spec in specs if spec.finalized]
    seg_class.num_samples_done = len(finished)
    seg_class.num_accepted = sum(spec.accepted for spec in finished)
    scores = [spec.clip_score for spec in finished if spec.clip_score is not None]
    seg_class.clip_score_mean = sum(scores) / len(scores) if scores else None
    return ids


def add_shots(session: Session, storage: Storage, class_id: uuid.UUID, count: int) -> None:
    """The class's real shots, each an image and mask blob."""
    for position in range(count):
        image, mask = _picture(100 + position)
        keys = {name: shot_key(class_id, position, name) for name in ("image.png", "mask.png")}
        storage.put(keys["image.png"], image, content_type="image/png")
        storage.put(keys["mask.png"], mask, content_type="image/png")
        session.add(
            Shot(
                class_id=class_id,
                position=position,
                filename=f"shot-{position}.png",
                width=32,
                height=32,
                original_key=keys["image.png"],
                original_mask_key=keys["mask.png"],
                image_key=keys["image.png"],
                mask_key=keys["mask.png"],
            )
        )
    session.flush()


def _picture(index: int) -> tuple[bytes, bytes]:
    """A 32×32 gradient of a hue of its own and a disc mask, as PNGs."""
    ramp = np.linspace(60, 230, 32)
    rgb = np.stack(
        [
            np.broadcast_to(ramp, (32, 32)),
            np.broadcast_to(ramp[:, None], (32, 32)),
            np.full((32, 32), (index * 47) % 256),
        ],
        axis=-1,
    ).astype(np.uint8)
    y, x = np.mgrid[:32, :32]
    disc = ((x - 16) ** 2 + (y - 16) ** 2 < 100).astype(np.uint8) * 255
    return _png(Image.fromarray(rgb)), _png(Image.fromarray(disc))


def _png(image: Image.Image) -> bytes:
    buffer = BytesIO()
    image.save(buffer, "PNG")
    return buffer.getvalue()


def held_out_metrics(
    names: list[str], *, miou: float, baseline_miou: float | None, folds: int = 2
) -> dict[str, Any]:
    """Metrics as a held-out-shots training stores them: fold means, each fold, and with a
    baseline the comparison."""
    per_class = {name: round(miou + 0.02 * (i - (len(names) - 1) / 2), 4) for i, name in
                 enumerate(names)}  # fmt: skip
    metrics: dict[str, Any] = {
        "per_class_iou": per_class,
        "miou": miou,
        "eval_set": "held_out_shots",
        "per_class_iou_std": dict.fromkeys(names, 0.04),
        "folds": [
            {
                "fold": fold,
                "held_out": dict.fromkeys(names, fold),
                "per_class_iou": {n: round(v + 0.01 * (2 * fold - folds + 1), 4) for n, v in
                                  per_class.items()},
                "miou": round(miou + 0.01 * (2 * fold - folds + 1), 4),
                "baseline": None
                if baseline_miou is None
                else {"per_class_iou": dict.fromkeys(names, baseline_miou), "miou": baseline_miou},
            }
            for fold in range(folds)
        ],
    }  # fmt: skip
    if baseline_miou is not None:
        metrics["baseline"] = {
            "per_class_iou": dict.fromkeys(names, baseline_miou),
            "miou": baseline_miou,
            "per_class_iou_std": dict.fromkeys(names, 0.05),
        }
        metrics["comparison"] = {
            "miou_difference": round(miou - baseline_miou, 4),
            "per_class_difference": {n: round(v - baseline_miou, 4) for n, v in per_class.items()},
            "spread": 0.03,
            "exceeds_spread": abs(miou - baseline_miou) > 0.03,
        }
    return metrics


def training_shots_metrics(names: list[str], *, miou: float) -> dict[str, Any]:
    """Metrics measured on the training shots (a class of one shot): optimistic."""
    return {"per_class_iou": dict.fromkeys(names, miou), "miou": miou, "eval_set": "training_shots"}


def add_training(
    session: Session,
    *,
    owner_id: uuid.UUID,
    class_ids: list[uuid.UUID],
    metrics: dict[str, Any] | None,
    status: str = "succeeded",
    age: timedelta = timedelta(0),
) -> uuid.UUID:
    """A training and its job, as a finished (or unfinished) training job leaves them."""
    training_id = uuid.uuid4()
    created: datetime = utcnow() - age
    job = Job(
        kind="training",
        owner_id=owner_id,
        target_id=training_id,
        status=status,
        progress=1.0 if status == "succeeded" else 0.3,
        created_at=created,
    )
    session.add(job)
    session.flush()
    eval_set = metrics["eval_set"] if metrics is not None else "training_shots"
    session.add(
        Training(
            id=training_id,
            owner_id=owner_id,
            class_ids=[str(c) for c in class_ids],
            architecture="deeplabv3",
            steps=200,
            batch_size=8,
            use_synthetic=True,
            copy_paste=True,
            compare_baseline=metrics is not None and "baseline" in metrics,
            eval_set=eval_set,
            metrics=metrics,
            job_id=job.id,
            created_at=created,
        )
    )
    session.flush()
    return training_id
