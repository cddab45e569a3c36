"""Downstream training: a segmenter fit on the shots and accepted samples, GAPS-style.

SGD (momentum 0.9, weight decay 1e-4) under a poly learning-rate schedule; each batch image is a
random training image with objects copy-pasted onto it (half from shots and inversion samples,
half from text samples), then randomly scaled, cropped and flipped. Training can stop between
steps and resume from a checkpoint to the same weights an uninterrupted run reaches.
"""

from __future__ import annotations

import io
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from aligndiff.copy_paste import (
    IGNORE_INDEX,
    LabeledImage,
    PasteObject,
    UInt8Array,
    choose_objects,
    copy_paste,
)
from aligndiff.models.segmenters import ARCHITECTURES, SegmentationModel

# Random rescaling of a training image around "short side = resolution" before the crop.
AUGMENT_SCALE_RANGE = (0.5, 2.0)
_PREDICT_BATCH = 8


@dataclass(frozen=True)
class TrainingConfig:
    """How to train: `steps` SGD steps of `batch_size` crops of `resolution` pixels.

    The learning rate follows lr · (1 - step / steps) ** poly_power. With `copy_paste`, each crop
    gets `pastes_per_image` objects pasted before augmentation. `checkpoint_every` steps a
    checkpoint is handed to the caller; `seed` fixes the data order, augmentation and dropout.
    """

    architecture: str
    steps: int
    batch_size: int
    learning_rate: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 1e-4
    poly_power: float = 0.9
    resolution: int = 64
    copy_paste: bool = True
    pastes_per_image: int = 1
    checkpoint_every: int = 50
    seed: int = 0

    def __post_init__(self) -> None:
        if self.architecture not in ARCHITECTURES:
            raise ValueError(
                f"unknown architecture {self.architecture!r}; expected one of {ARCHITECTURES}"
            )
        for name in ("steps", "batch_size", "resolution", "checkpoint_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.pastes_per_image < 0:
            raise ValueError(f"pastes_per_image must be >= 0, got {self.pastes_per_image}")
        if self.learning_rate <= 0:
            raise ValueError(f"learning_rate must be > 0, got {self.learning_rate}")
        if not 0 <= self.momentum < 1:
            raise ValueError(f"momentum must be in [0, 1), got {self.momentum}")
        if self.weight_decay < 0 or self.poly_power < 0:
            raise ValueError("weight_decay and poly_power must be >= 0")

    @classmethod
    def tiny(cls, architecture: str = "deeplabv3") -> TrainingConfig:
        """A few seconds on CPU with the tiny models: 20 steps of 4 crops at 64 px."""
        return cls(architecture=architecture, steps=20, batch_size=4, checkpoint_every=10)


@dataclass
class TrainingSet:
    """What to train on: foreground class names (class k is `class_names[k - 1]`), the labeled
    images (shots and accepted samples: 0 background, k class k, 255 ignore) and the same
    objects as paste candidates."""

    class_names: list[str]
    images: list[LabeledImage]
    objects: list[PasteObject] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not self.class_names:
            raise ValueError("a training set needs at least one class")
        if not self.images:
            raise ValueError("a training set needs at least one image")
        top = len(self.class_names)
        for obj in self.objects:
            if obj.class_index > top:
                raise ValueError(f"object class {obj.class_index} beyond the {top} classes")


@dataclass
class TrainingState:
    """Everything needed to resume after `step` steps: model and optimizer state dicts and the
    data (numpy) and dropout (torch) RNG states."""

    step: int
    model: dict[str, Any]
    optimizer: dict[str, Any]
    rng: dict[str, Any]

    def to_bytes(self) -> bytes:
        buffer = io.BytesIO()
        torch.save(
            {
                "step": self.step,
                "model": self.model,
                "optimizer": self.optimizer,
                "rng": self.rng,
            },
            buffer,
        )
        return buffer.getvalue()

    @classmethod
    def from_bytes(cls, data: bytes) -> TrainingState:
        """Read a state written by `to_bytes` (tensors and plain containers only)."""
        loaded = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
        return cls(
            step=int(loaded["step"]),
            model=loaded["model"],
            optimizer=loaded["optimizer"],
            rng=loaded["rng"],
        )


@dataclass
class TrainingOutcome:
    """Per-step losses of this run (resumed runs: only the steps run now), the total number of
    steps done (counting resumed ones), and whether `should_stop` ended it early."""

    losses: list[float]
    steps_done: int
    stopped: bool


@dataclass
class Metrics:
    """IoU of each foreground class by name, and the mean IoU over background and classes."""

    per_class_iou: dict[str, float]
    miou: float


def train_segmenter(
    model: SegmentationModel,
    data: TrainingSet,
    config: TrainingConfig,
    *,
    progress: Callable[[int, int], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
    checkpoint: Callable[[TrainingState], None] | None = None,
    resume: TrainingState | None = None,
) -> TrainingOutcome:
    """Train `model` in place for `config.steps` steps (from `resume.step` when resuming).

    `progress(done, total)` is called after every step; `should_stop()` before every step, and a
    true answer ends training (no checkpoint is forced: resume from the last one);
    `checkpoint(state)` every `config.checkpoint_every` steps and after the last step. The
    global torch RNG is left as it was.
    """
    if model.architecture != config.architecture:
        raise ValueError(
            f"config is for {config.architecture!r} but the model is {model.architecture!r}"
        )
    if model.num_classes != len(data.class_names) + 1:
        raise ValueError(
            f"model has {model.num_classes} outputs for {len(data.class_names)} classes "
            "(background + one per class expected)"
        )
    parameters = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(
        parameters,
        lr=config.learning_rate,
        momentum=config.momentum,
        weight_decay=config.weight_decay,
    )
    rng = np.random.default_rng(config.seed)
    start = 0
    losses: list[float] = []
    stopped = False
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        if resume is not None:
            if not 0 <= resume.step <= config.steps:
                raise ValueError(f"cannot resume at step {resume.step} of {config.steps}")
            model.load_state_dict(resume.model)
            optimizer.load_state_dict(resume.optimizer)
            rng.bit_generator.state = resume.rng["numpy"]
            torch.set_rng_state(resume.rng["torch"])
            start = resume.step
        model.train()
        device = next(model.parameters()).device
        for step in range(start, config.steps):
            if should_stop is not None and should_stop():
                stopped = True
                break
            for group in optimizer.param_groups:
                group["lr"] = config.learning_rate * (1 - step / config.steps) ** config.poly_power
            batch = [_training_crop(data, config, rng) for _ in range(config.batch_size)]
            pixels = _pixel_values([b.image for b in batch], model).to(device)
            labels = torch.from_numpy(np.stack([b.labels for b in batch])).long().to(device)
            logits = model(pixels)
            if bool((labels != IGNORE_INDEX).any()):
                loss = F.cross_entropy(logits, labels, ignore_index=IGNORE_INDEX)
            else:
                # NOTE: cross-entropy over no pixels is NaN; a fully ignored batch teaches nothing.
                loss = logits.sum() * 0.0
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            losses.append(float(loss.detach()))
            done = step + 1
            if progress is not None:
                progress(done, config.steps)
            if checkpoint is not None and (
                done % config.checkpoint_every == 0 or done == config.steps
            ):
                checkpoint(
                    TrainingState(
                        step=done,
                        model=_cpu_copy(model.state_dict()),
                        optimizer=_cpu_copy(optimizer.state_dict()),
                        rng={"numpy": rng.bit_generator.state, "torch": torch.get_rng_state()},
                    )
                )
    model.eval()
    return TrainingOutcome(losses=losses, steps_done=start + len(losses), stopped=stopped)


@torch.inference_mode()
def predict(
    model: SegmentationModel, images: Sequence[UInt8Array], *, resolution: int
) -> list[UInt8Array]:
    """Label maps (0 background, k class k) at each image's own size.

    Each image is resized to `resolution` x `resolution`, and its logits are resized back
    (bilinear) before the arg-max.
    """
    model.eval()
    device = next(model.parameters()).device
    results: list[UInt8Array] = []
    for start in range(0, len(images), _PREDICT_BATCH):
        chunk = images[start : start + _PREDICT_BATCH]
        resized = [
            _resize(image, (resolution, resolution), Image.Resampling.BILINEAR) for image in chunk
        ]
        logits = model(_pixel_values(resized, model).to(device))
        for image, image_logits in zip(chunk, logits, strict=True):
            full = F.interpolate(
                image_logits[None], size=image.shape[:2], mode="bilinear", align_corners=False
            )
            results.append(full[0].argmax(dim=0).to(torch.uint8).cpu().numpy())
    return results


def evaluate(
    model: SegmentationModel,
    images: Sequence[UInt8Array],
    label_maps: Sequence[UInt8Array],
    class_names: Sequence[str],
    *,
    resolution: int,
) -> Metrics:
    """IoU of the model's predictions (see `predict`) against `label_maps` (255 ignored).

    IoU is computed per class from one confusion matrix accumulated over all images, as
    torchmetrics' `MulticlassJaccardIndex(average=None, ignore_index=255)` does: a class absent
    from both prediction and ground truth scores 0 in `per_class_iou`. `miou` averages
    background and every class that occurs in the ground truth or the predictions (torchmetrics'
    `average="macro"`).
    """
    if len(images) != len(label_maps):
        raise ValueError(f"{len(images)} images but {len(label_maps)} label maps")
    predictions = predict(model, images, resolution=resolution)
    per_class, present = iou_from_predictions(predictions, label_maps, len(class_names) + 1)
    names = ["background", *class_names]
    scores = [per_class[k] for k in range(len(names)) if present[k]]
    return Metrics(
        per_class_iou={name: per_class[k] for k, name in enumerate(names) if k > 0},
        miou=float(np.mean(scores)) if scores else 0.0,
    )


def iou_from_predictions(
    predictions: Sequence[UInt8Array], label_maps: Sequence[UInt8Array], num_classes: int
) -> tuple[list[float], list[bool]]:
    """Per-class IoU over all pixels (ground truth 255 ignored) and whether each class occurs.

    Classes 0..num_classes-1; a class with an empty union gets IoU 0.
    """
    confusion = np.zeros((num_classes, num_classes), dtype=np.int64)
    for prediction, truth in zip(predictions, label_maps, strict=True):
        if prediction.shape != truth.shape:
            raise ValueError(f"prediction {prediction.shape} and labels {truth.shape} differ")
        valid = truth != IGNORE_INDEX
        if int(truth[valid].max(initial=0)) >= num_classes:
            raise ValueError(f"labels hold a class beyond {num_classes - 1}")
        index = truth[valid].astype(np.int64) * num_classes + prediction[valid].astype(np.int64)
        confusion += np.bincount(index, minlength=num_classes**2).reshape(num_classes, num_classes)
    intersection = np.diag(confusion)
    union = confusion.sum(axis=0) + confusion.sum(axis=1) - intersection
    iou = np.divide(intersection, union, out=np.zeros(num_classes), where=union > 0)
    return [float(v) for v in iou], [bool(u > 0) for u in union]


def _training_crop(
    data: TrainingSet, config: TrainingConfig, rng: np.random.Generator
) -> LabeledImage:
    """One augmented training crop: copy-paste, random scale, random crop, random flip."""
    sample = data.images[int(rng.integers(len(data.images)))]
    if config.copy_paste and config.pastes_per_image and any(o.mask.any() for o in data.objects):
        chosen = choose_objects(data.objects, config.pastes_per_image, rng)
        sample = copy_paste(sample, chosen, rng)
    size = config.resolution
    height, width = sample.labels.shape
    scale = size / min(height, width) * rng.uniform(*AUGMENT_SCALE_RANGE)
    new_h, new_w = max(1, round(height * scale)), max(1, round(width * scale))
    image = _resize(sample.image, (new_h, new_w), Image.Resampling.BILINEAR)
    labels = _resize(sample.labels, (new_h, new_w), Image.Resampling.NEAREST)
    # Pad to at least the crop size: image with zeros, labels with "ignore".
    pad_h, pad_w = max(size - new_h, 0), max(size - new_w, 0)
    if pad_h or pad_w:
        image = np.pad(image, ((0, pad_h), (0, pad_w), (0, 0)))
        labels = np.pad(labels, ((0, pad_h), (0, pad_w)), constant_values=IGNORE_INDEX)
    top = int(rng.integers(labels.shape[0] - size + 1))
    left = int(rng.integers(labels.shape[1] - size + 1))
    image = image[top : top + size, left : left + size]
    labels = labels[top : top + size, left : left + size]
    if rng.random() < 0.5:
        image, labels = image[:, ::-1], labels[:, ::-1]
    return LabeledImage(image=np.ascontiguousarray(image), labels=np.ascontiguousarray(labels))


def _resize(array: UInt8Array, size: tuple[int, int], resample: Image.Resampling) -> UInt8Array:
    """`array` resized to (height, width)."""
    height, width = size
    if array.shape[:2] == (height, width):
        return array
    resized: UInt8Array = np.asarray(Image.fromarray(array).resize((width, height), resample))
    return resized


def _pixel_values(images: Sequence[UInt8Array], model: SegmentationModel) -> torch.Tensor:
    """uint8 (H, W, 3) images of one size as normalized (B, 3, H, W) float32."""
    batch = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float() / 255.0
    mean = torch.tensor(model.mean).view(1, 3, 1, 1)
    std = torch.tensor(model.std).view(1, 3, 1, 1)
    return (batch - mean) / std


def _cpu_copy(state: dict[str, Any]) -> dict[str, Any]:
    """A deep copy of a state dict with every tensor on the CPU (later steps must not alter it)."""
    copied: dict[str, Any] = {}
    for key, value in state.items():
        if isinstance(value, torch.Tensor):
            copied[key] = value.detach().to("cpu", copy=True)
        elif isinstance(value, dict):
            copied[key] = _cpu_copy(value)
        elif isinstance(value, list):
            copied[key] = [_cpu_copy({"v": v})["v"] for v in value]
        else:
            copied[key] = value
    return copied
