"""The whole pipeline in one process: shots in, a folder of scored samples out."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from aligndiff import __version__
from aligndiff.inversion import InversionConfig, InversionResult, invert, save_embedding
from aligndiff.masks import mask_to_image
from aligndiff.models.diffusion import DiffusionModel
from aligndiff.prompts import prompt_bank
from aligndiff.sampling import GeneratedSample, Sampler, SamplingConfig
from aligndiff.shots import Shot

# (stage, done, total): stages are "inversion", "sampling", "annotation", "scoring".
StageProgress = Callable[[str, int, int], None]

COARSE_MASK_THRESHOLD = 0.4


@dataclass(frozen=True)
class SynthConfig:
    inversion: InversionConfig = field(default_factory=InversionConfig)
    sampling: SamplingConfig = field(default_factory=SamplingConfig)

    @classmethod
    def tiny(cls) -> SynthConfig:
        return cls(inversion=InversionConfig.tiny(), sampling=SamplingConfig.tiny())


@dataclass
class SampleRecord:
    """One sample as the public contract describes it (minus URLs), plus its pixels."""

    id: str
    class_id: str
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
    accepted: bool
    mask_source: str
    created_at: str
    image: np.ndarray = field(repr=False)
    mask: np.ndarray = field(repr=False)

    def public(self) -> dict[str, Any]:
        data = asdict(self)
        del data["image"], data["mask"]
        return data


@dataclass
class SynthesisResult:
    class_id: str
    class_name: str
    inversion: InversionResult
    samples: list[SampleRecord]
    stage_seconds: dict[str, float]
    model_ids: dict[str, str]


def _now() -> str:
    return datetime.now(UTC).isoformat().replace("+00:00", "Z")


class _StageClock:
    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - start


def synthesize(
    model: DiffusionModel,
    shots: Sequence[Shot],
    *,
    class_name: str,
    num_samples: int,
    seed: int,
    prompts: Sequence[str] = (),
    config: SynthConfig,
    progress: StageProgress | None = None,
) -> SynthesisResult:
    """Run inversion → sampling on `shots` and return every sample with its mask."""
    if not shots:
        raise ValueError("at least one shot is needed")
    specs = prompt_bank(class_name, num_samples=num_samples, class_seed=seed, prompts=prompts)
    clock = _StageClock()

    def report(stage: str) -> Callable[[int, int], None] | None:
        if progress is None:
            return None
        return lambda done, total: progress(stage, done, total)

    with clock.stage("inversion"):
        inversion = invert(
            model,
            [shot.image_array for shot in shots],
            [shot.mask for shot in shots],
            class_name=class_name,
            config=config.inversion,
            progress=report("inversion"),
        )
    with clock.stage("sampling"):
        sampler = Sampler(
            model,
            class_name=class_name,
            token_embedding=inversion.embedding,
            config=config.sampling,
        )
        generated = list(sampler.generate(specs, progress=report("sampling")))

    class_id = str(uuid.uuid4())
    samples = [_coarse_record(class_id, g) for g in generated]
    return SynthesisResult(
        class_id=class_id,
        class_name=class_name,
        inversion=inversion,
        samples=samples,
        stage_seconds=clock.seconds,
        model_ids={"diffusion": model.model_id},
    )


def _coarse_record(class_id: str, sample: GeneratedSample) -> SampleRecord:
    height, width = sample.image.shape[:2]
    return SampleRecord(
        id=str(uuid.uuid4()),
        class_id=class_id,
        index=sample.spec.index,
        prompt=sample.spec.prompt,
        prompt_kind=sample.spec.prompt_kind,
        seed=sample.spec.seed,
        width=width,
        height=height,
        clip_score=None,
        shot_similarity=None,
        consensus_iou=None,
        ood_iou=None,
        accepted=True,
        mask_source="coarse",
        created_at=_now(),
        image=sample.image,
        mask=sample.coarse_mask > COARSE_MASK_THRESHOLD,
    )


def write_synthesis(result: SynthesisResult, out: Path) -> None:
    """Write images/, masks/, samples.jsonl, embedding.safetensors and summary.json to `out`.

    Files are written under temporary names and renamed, so an interrupted run never leaves a
    half-written image or a samples.jsonl that names missing files.
    """
    (out / "images").mkdir(parents=True, exist_ok=True)
    (out / "masks").mkdir(parents=True, exist_ok=True)
    for sample in result.samples:
        stem = f"{sample.index:05d}"
        _atomic_png(Image.fromarray(sample.image), out / "images" / f"{stem}.png")
        _atomic_png(mask_to_image(sample.mask), out / "masks" / f"{stem}.png")
    save_embedding(
        out / "embedding.safetensors", result.inversion.token, result.inversion.embedding
    )
    lines = "".join(json.dumps(s.public()) + "\n" for s in result.samples)
    _atomic_text(out / "samples.jsonl", lines)
    _atomic_text(out / "summary.json", json.dumps(summarize(result), indent=2) + "\n")


def summarize(result: SynthesisResult) -> dict[str, Any]:
    """Counts, accepted share, mean scores and time per stage of one synthesis."""
    samples = result.samples
    accepted = [s for s in samples if s.accepted]

    def mean(values: list[float | None]) -> float | None:
        present = [v for v in values if v is not None]
        return float(np.mean(present)) if present else None

    return {
        "class_id": result.class_id,
        "class_name": result.class_name,
        "token": result.inversion.token,
        "num_samples": len(samples),
        "num_accepted": len(accepted),
        "accepted_share": len(accepted) / len(samples) if samples else None,
        "mask_sources": {
            k: sum(s.mask_source == k for s in samples)
            for k in sorted({s.mask_source for s in samples})
        },
        "clip_score_mean": mean([s.clip_score for s in samples]),
        "shot_similarity_mean": mean([s.shot_similarity for s in samples]),
        "consensus_iou_mean": mean([s.consensus_iou for s in samples]),
        "ood_iou_mean": mean([s.ood_iou for s in samples]),
        "inversion_final_loss": result.inversion.losses[-1] if result.inversion.losses else None,
        "stage_seconds": {k: round(v, 3) for k, v in result.stage_seconds.items()},
        "models": result.model_ids,
        "aligndiff_version": __version__,
    }


def _atomic_png(image: Image.Image, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    image.save(tmp, format="PNG")
    tmp.replace(path)


def _atomic_text(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(path)
