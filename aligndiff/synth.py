"""The whole pipeline in one process: shots in, a folder of scored samples out."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

import numpy as np
from PIL import Image

from aligndiff import __version__
from aligndiff.acceleration import Acceleration, resolve_batch_size
from aligndiff.acceptance import (
    AcceptanceConfig,
    AcceptanceThresholds,
    SemanticCheck,
    calibrate,
    final_signals,
    verdict,
)
from aligndiff.annotation import AnnotationConfig, annotate
from aligndiff.fss import FewShotSegmenter, PrototypeSegmenter
from aligndiff.inversion import InversionConfig, InversionResult, invert, save_embedding
from aligndiff.masks import mask_to_image
from aligndiff.models.backbone import load_backbone
from aligndiff.models.clip import load_clip
from aligndiff.models.diffusion import (
    DiffusionModel,
    load_diffusion_model,
    resolve_device,
    resolve_dtype,
)
from aligndiff.models.family import TINY_FAMILIES, model_family
from aligndiff.names import PROMPT_STYLE, PromptStyle
from aligndiff.ood import OodConfig
from aligndiff.prompts import prompt_bank
from aligndiff.sampling import Sampler, SamplingConfig
from aligndiff.scoring import ClipScorer
from aligndiff.settings import Settings
from aligndiff.shots import Shot
from aligndiff.tuning import TrialScorer, TuningConfig, acceptance_scorer, tune_bg_lambda

# (stage, done, total): stages are "inversion", "sampling", "annotation", "scoring".
StageProgress = Callable[[str, int, int], None]


@dataclass(frozen=True)
class SynthConfig:
    """Every stage's settings; the defaults are the reference's."""

    inversion: InversionConfig = field(default_factory=InversionConfig)
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    annotation: AnnotationConfig = field(default_factory=AnnotationConfig)
    ood: OodConfig = field(default_factory=OodConfig)
    acceptance: AcceptanceConfig = field(default_factory=AcceptanceConfig)
    tuning: TuningConfig = field(default_factory=TuningConfig)

    @classmethod
    def for_model(cls, diffusion_model: str) -> SynthConfig:
        """Reference defaults per model family (SDXL: CFG 5.0), scaled down for the tiny random
        models (whose random features cannot tell classes apart: their semantic check is off)."""
        try:
            family = model_family(diffusion_model)
        except (OSError, ValueError):
            # NOTE: loading the model raises the real error (unreadable, unsupported family).
            family = "sd"
        sampling = SamplingConfig.sdxl() if family == "sdxl" else SamplingConfig()
        if diffusion_model in TINY_FAMILIES:
            return cls(
                inversion=InversionConfig.tiny(),
                sampling=replace(SamplingConfig.tiny(), guidance_scale=sampling.guidance_scale),
                acceptance=AcceptanceConfig(enabled=False),
            )
        return cls(sampling=sampling)

    @classmethod
    def from_settings(cls, settings: Settings) -> SynthConfig:
        """`for_model`, with the acceptance and `bg_lambda` settings of `settings`."""
        config = cls.for_model(settings.diffusion_model)
        fixed = (settings.accept_min_prototype_similarity, settings.accept_min_shot_similarity)
        enabled = settings.accept_semantic_check
        if enabled is None:
            # Off by default for the tiny models only; a threshold fixed by hand turns it on.
            enabled = config.acceptance.enabled or any(value is not None for value in fixed)
        acceptance = AcceptanceConfig(
            distance_factor=settings.accept_distance_factor,
            min_prototype_similarity=fixed[0],
            min_shot_similarity=fixed[1],
            enabled=enabled,
        )
        return replace(
            config,
            inversion=replace(config.inversion, lambda_bg=settings.bg_lambda),
            acceptance=acceptance,
            tuning=TuningConfig(
                grid=settings.bg_lambda_grid,
                trial_fraction=settings.bg_lambda_trial_fraction,
                trial_samples=settings.bg_lambda_trial_samples,
            ),
        )

    @classmethod
    def for_settings(cls, settings: Settings, diffusion: DiffusionModel) -> SynthConfig:
        """`from_settings`, with the sampling batch size of `settings` (`batch_size`: a number,
        or "auto" to fit the free memory of `diffusion`'s device)."""
        config = cls.from_settings(settings)
        sampling = config.sampling
        size = resolve_batch_size(
            settings.batch_size,
            configured=sampling.batch_size,
            model=diffusion,
            resolution=sampling.resolution or diffusion.default_resolution,
            guided=sampling.guidance_scale > 1.0,
            fraction=settings.memory_fraction,
        )
        return replace(config, sampling=replace(sampling, batch_size=size))


@dataclass
class Models:
    """Everything the pipeline runs, loaded once per process."""

    diffusion: DiffusionModel
    segmenter: FewShotSegmenter
    scorer: ClipScorer

    @property
    def model_ids(self) -> dict[str, str]:
        segmenter_id = getattr(getattr(self.segmenter, "backbone", None), "model_id", "custom")
        return {
            "diffusion": self.diffusion.model_id,
            "clip": self.scorer.bundle.model_id,
            "fss_backbone": segmenter_id,
        }


def load_models(
    settings: Settings, *, device: str | None = None, dtype: str | None = None
) -> Models:
    """Load the diffusion model, the FSS backbone and CLIP named by `settings`; the
    diffusion model is prepared with the settings' fast path (`Acceleration`)."""
    # Both checked before anything loads: a device or dtype this machine lacks is a message.
    torch_device = resolve_device(device or settings.device)
    torch_dtype = resolve_dtype(dtype or settings.dtype)
    cache = settings.model_cache_dir
    return Models(
        diffusion=load_diffusion_model(
            settings.diffusion_model,
            device=torch_device,
            dtype=torch_dtype,
            cache_dir=cache,
            acceleration=Acceleration.from_settings(settings),
        ),
        segmenter=PrototypeSegmenter(
            load_backbone(
                settings.fss_backbone, device=torch_device, dtype=torch_dtype, cache_dir=cache
            )
        ),
        scorer=ClipScorer(
            load_clip(settings.clip_model, device=torch_device, dtype=torch_dtype, cache_dir=cache)
        ),
    )


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
    prototype_similarity: float | None
    consensus_iou: float | None
    ood_iou: float | None
    accepted: bool
    rejected_by: str | None
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
    bg_lambda: float
    tuning: list[dict[str, Any]] | None
    acceptance: AcceptanceThresholds


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
    models: Models,
    shots: Sequence[Shot],
    *,
    class_name: str,
    num_samples: int,
    seed: int,
    prompts: Sequence[str] = (),
    config: SynthConfig,
    bg_lambda: float | Literal["auto"] | None = None,
    progress: StageProgress | None = None,
) -> SynthesisResult:
    """Run inversion → sampling → scoring → annotation (+ OOD filter and semantic check) on
    `shots`. `bg_lambda`: the inversion's background weight, "auto" to choose it by trials
    (`aligndiff.tuning`), or None for `config.inversion.lambda_bg`.

    Every sample comes back with its final mask, its mask source, all its scores and its
    verdict (`accepted`, `rejected_by`).
    """
    if not shots:
        raise ValueError("at least one shot is needed")
    specs = prompt_bank(class_name, num_samples=num_samples, class_seed=seed, prompts=prompts)
    shot_images = [shot.image_array for shot in shots]
    shot_masks = [shot.mask for shot in shots]
    segmenter, scorer = models.segmenter, models.scorer
    clock = _StageClock()

    def report(stage: str) -> Callable[[int, int], None] | None:
        if progress is None:
            return None
        return lambda done, total: progress(stage, done, total)

    with clock.stage("inversion"):
        learned = learn_token(
            models,
            shot_images,
            shot_masks,
            class_name=class_name,
            class_seed=seed,
            bg_lambda=bg_lambda,
            config=config,
            progress=report("inversion"),
        )
        assert learned is not None  # nothing asks it to stop
        inversion = learned.inversion
    with clock.stage("sampling"):
        sampler = Sampler(
            models.diffusion,
            class_name=class_name,
            token_embedding=inversion.embedding,
            config=config.sampling,
        )
        generated = list(sampler.generate(specs, progress=report("sampling")))
    images = [g.image for g in generated]

    with clock.stage("scoring"):
        # NOTE: scored before annotation: the CLIP shot similarity is one of the signals of
        # the semantic check that a consensus sample must pass.
        reference = scorer.reference(class_name=class_name, shot_images=shot_images)
        scores = scorer.score(images, reference)
        thresholds = calibrate(
            segmenter, scorer.embed_images, shot_images, shot_masks, config.acceptance
        )
        if progress is not None:
            progress("scoring", len(images), len(images))

    with clock.stage("annotation"):
        shot_features = segmenter.embed(shot_images)
        sample_features = segmenter.embed(images)
        semantic = SemanticCheck.for_shots(segmenter, shot_features, shot_masks, thresholds)
        annotations = annotate(
            segmenter,
            shots=shot_features,
            shot_masks=shot_masks,
            samples=sample_features,
            coarse_masks=[g.coarse_mask for g in generated],
            config=config.annotation,
            semantic=semantic,
            shot_similarities=[score.shot_similarity for score in scores],
            progress=report("annotation"),
        )
        signals = final_signals(
            segmenter,
            samples=sample_features,
            sample_masks=[a.mask for a in annotations],
            shots=shot_features,
            shot_masks=shot_masks,
            semantic=semantic,
            ood=config.ood,
        )

    class_id = str(uuid.uuid4())
    created_at = _now()
    samples = []
    for sample, annotation, ood_iou, score, similarity in zip(
        generated,
        annotations,
        signals.ood_iou,
        scores,
        signals.prototype_similarity,
        strict=True,
    ):
        spec = sample.spec
        height, width = sample.image.shape[:2]
        accepted, rejected_by = verdict(
            prompt_kind=spec.prompt_kind,
            ood_iou=ood_iou,
            prototype_similarity=similarity,
            shot_similarity=score.shot_similarity,
            ood=config.ood,
            thresholds=thresholds,
        )
        samples.append(
            SampleRecord(
                id=str(uuid.uuid4()),
                class_id=class_id,
                index=spec.index,
                prompt=spec.prompt,
                prompt_kind=spec.prompt_kind,
                seed=spec.seed,
                width=width,
                height=height,
                clip_score=score.clip_score,
                shot_similarity=score.shot_similarity,
                prototype_similarity=similarity,
                consensus_iou=annotation.consensus_iou,
                ood_iou=ood_iou,
                accepted=accepted,
                rejected_by=rejected_by,
                mask_source=annotation.mask_source,
                created_at=created_at,
                image=sample.image,
                mask=annotation.mask,
            )
        )
    return SynthesisResult(
        class_id=class_id,
        class_name=class_name,
        inversion=inversion,
        samples=samples,
        stage_seconds=clock.seconds,
        model_ids=models.model_ids,
        bg_lambda=learned.bg_lambda,
        tuning=learned.tuning,
        acceptance=thresholds,
    )


@dataclass
class LearnedToken:
    """The class token, the λ_bg it was learned with and, for `auto`, the trials."""

    inversion: InversionResult
    bg_lambda: float
    tuning: list[dict[str, Any]] | None


def learn_token(
    models: Models,
    shot_images: Sequence[np.ndarray],
    shot_masks: Sequence[np.ndarray],
    *,
    class_name: str,
    class_seed: int,
    bg_lambda: float | Literal["auto"] | None,
    config: SynthConfig,
    prompt_style: PromptStyle = PROMPT_STYLE,
    progress: Callable[[int, int], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
) -> LearnedToken | None:
    """The inversion of a class at `bg_lambda` (None: `config.inversion.lambda_bg`), or with
    λ_bg chosen by trials ("auto"), from the inversion prompt in the class's `prompt_style`.
    None when `should_stop` stopped it."""
    if bg_lambda == "auto":
        tuned = tune_bg_lambda(
            models.diffusion,
            shot_images,
            shot_masks,
            class_name=class_name,
            config=config.inversion,
            tuning=config.tuning,
            score_trial=trial_scorer(
                models,
                config,
                class_name,
                class_seed,
                shot_images,
                shot_masks,
                prompt_style=prompt_style,
            ),
            prompt_style=prompt_style,
            progress=progress,
            should_stop=should_stop,
        )
        if tuned is None:
            return None
        return LearnedToken(
            inversion=tuned.inversion,
            bg_lambda=tuned.bg_lambda,
            tuning=[trial.public() for trial in tuned.trials],
        )
    value = config.inversion.lambda_bg if bg_lambda is None else bg_lambda
    stopped = False

    def stop() -> bool:
        nonlocal stopped
        stopped = stopped or (should_stop is not None and should_stop())
        return stopped

    inversion = invert(
        models.diffusion,
        shot_images,
        shot_masks,
        class_name=class_name,
        config=replace(config.inversion, lambda_bg=value),
        prompt_style=prompt_style,
        progress=progress,
        should_stop=stop,
    )
    return None if stopped else LearnedToken(inversion=inversion, bg_lambda=value, tuning=None)


def trial_scorer(
    models: Models,
    config: SynthConfig,
    class_name: str,
    class_seed: int,
    shot_images: Sequence[np.ndarray],
    shot_masks: Sequence[np.ndarray],
    prompt_style: PromptStyle = PROMPT_STYLE,
) -> TrialScorer:
    """The acceptance-signal scorer of `bg_lambda=auto`'s trials, on these models."""
    return acceptance_scorer(
        models.diffusion,
        models.segmenter,
        models.scorer.embed_images,
        class_name=class_name,
        class_seed=class_seed,
        shot_images=shot_images,
        shot_masks=shot_masks,
        sampling=config.sampling,
        trial_samples=config.tuning.trial_samples,
        fss_threshold=config.annotation.fss_threshold,
        prompt_style=prompt_style,
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
        out / "embedding.safetensors",
        result.inversion.token,
        result.inversion.embedding,
        widths=result.inversion.widths,
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
        "rejected_by": {
            k: sum(s.rejected_by == k for s in samples)
            for k in sorted({s.rejected_by for s in samples if s.rejected_by})
        },
        "bg_lambda": result.bg_lambda,
        "tuning": result.tuning,
        "acceptance": result.acceptance.to_dict(),
        "mask_sources": {
            k: sum(s.mask_source == k for s in samples)
            for k in sorted({s.mask_source for s in samples})
        },
        "clip_score_mean": mean([s.clip_score for s in samples]),
        "shot_similarity_mean": mean([s.shot_similarity for s in samples]),
        "prototype_similarity_mean": mean([s.prototype_similarity for s in samples]),
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
