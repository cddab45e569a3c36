"""`bg_lambda: auto`: the inversion's background weight chosen per class by short trials.

The reference calls the inversion "quite sensitive" to λ_bg, and the best value depends on the
class (a small object on a busy background wants less of the background than a large one). For
each value of the grid, an inversion runs the first `trial_fraction` of its steps (on the full
run's schedule), draws `trial_samples` samples from the inversion prompt with the token learned
so far, and scores them with the acceptance signals (`aligndiff.acceptance`): the mean of their
prototype similarity and CLIP shot similarity to the shots. The best value's run then goes on
to the full number of steps, so its embedding is exactly what a fixed-λ inversion at that value
learns, and the trials are kept for the class's report.

Cost: with g values, t trial steps and S steps in all, g·t + (S − t) inversion steps plus the
trial samples; the defaults (3 values, 10 %) run 1.2 S steps (`bench/acceptance.py`
measures the whole against a fixed-λ inversion: the budget is 1.6x).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, replace
from typing import Any

import numpy as np
import numpy.typing as npt
import torch

from aligndiff.acceptance import class_prototype, foreground_prototypes
from aligndiff.fss import FewShotSegmenter
from aligndiff.inversion import InversionConfig, InversionResult, InversionRun, encode_for
from aligndiff.masks import BoolMask
from aligndiff.models.diffusion import DiffusionModel
from aligndiff.names import PROMPT_STYLE, PromptStyle, inversion_prompt
from aligndiff.prompts import SampleSpec, derive_seed
from aligndiff.sampling import Sampler, SamplingConfig

Progress = Callable[[int, int], None]


@dataclass(frozen=True)
class TuningConfig:
    """The grid of λ_bg values tried, the share of the inversion's steps each trial runs, and
    the samples drawn to score each trial."""

    grid: tuple[float, ...] = (0.2, 0.6, 1.0)
    trial_fraction: float = 0.1
    trial_samples: int = 2

    def __post_init__(self) -> None:
        if not self.grid:
            raise ValueError("the bg_lambda grid needs at least one value")
        if any(not 0.0 <= value <= 2.0 for value in self.grid):
            raise ValueError(f"bg_lambda grid values must be in [0, 2], got {self.grid}")
        if not 0.0 < self.trial_fraction <= 1.0:
            raise ValueError(f"trial_fraction must be in (0, 1], got {self.trial_fraction}")
        if self.trial_samples < 1:
            raise ValueError(f"trial_samples must be >= 1, got {self.trial_samples}")

    def trial_steps(self, steps: int) -> int:
        return max(1, min(steps, round(steps * self.trial_fraction)))


@dataclass(frozen=True)
class TrialScore:
    """The mean acceptance signals of one trial's samples; `score` is their mean."""

    prototype_similarity: float
    shot_similarity: float

    @property
    def score(self) -> float:
        return (self.prototype_similarity + self.shot_similarity) / 2.0


@dataclass(frozen=True)
class Trial:
    """One tried value, as the class's `tuning` lists it."""

    bg_lambda: float
    score: float
    prototype_similarity: float
    shot_similarity: float
    steps: int
    loss: float | None

    def public(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class TuningResult:
    bg_lambda: float
    trials: list[Trial]
    inversion: InversionResult


# Scores the token embedding a trial learned (the trial's λ_bg given for the record).
TrialScorer = Callable[[float, torch.Tensor], TrialScore]


def tune_bg_lambda(
    model: DiffusionModel,
    images: Sequence[npt.NDArray[np.uint8]],
    masks: Sequence[BoolMask],
    *,
    class_name: str,
    config: InversionConfig,
    tuning: TuningConfig,
    score_trial: TrialScorer,
    prompt_style: PromptStyle = PROMPT_STYLE,
    progress: Progress | None = None,
    should_stop: Callable[[], bool] | None = None,
) -> TuningResult | None:
    """Try each λ_bg of the grid for a few steps, keep the best-scoring one (the first of
    equals) and run it to `config.steps`. None when `should_stop` stopped it."""
    data = encode_for(model, images, masks, config)
    trial_steps = tuning.trial_steps(config.steps)
    total = len(tuning.grid) * trial_steps + config.steps - trial_steps
    done = 0

    def advanced(runs_before: int) -> Callable[[int], None] | None:
        if progress is None:
            return None
        return lambda step: progress(runs_before + step, total)

    runs: list[InversionRun] = []
    trials: list[Trial] = []
    for value in tuning.grid:
        run = InversionRun(
            model,
            data,
            class_name=class_name,
            config=replace(config, lambda_bg=value),
            prompt_style=prompt_style,
        )
        if not run.advance(trial_steps, progress=advanced(done), should_stop=should_stop):
            return None
        done += trial_steps
        scored = score_trial(value, run.current().embedding)
        runs.append(run)
        trials.append(
            Trial(
                bg_lambda=value,
                score=scored.score,
                prototype_similarity=scored.prototype_similarity,
                shot_similarity=scored.shot_similarity,
                steps=trial_steps,
                loss=run.result.losses[-1] if run.result.losses else None,
            )
        )
    best = max(range(len(trials)), key=lambda i: (trials[i].score, -i))
    chosen = runs[best]
    if not chosen.advance(
        config.steps, progress=advanced(done - trial_steps), should_stop=should_stop
    ):
        return None
    return TuningResult(bg_lambda=tuning.grid[best], trials=trials, inversion=chosen.current())


def acceptance_scorer(
    model: DiffusionModel,
    segmenter: FewShotSegmenter,
    clip_embed: Callable[[Sequence[npt.NDArray[np.uint8]]], torch.Tensor],
    *,
    class_name: str,
    class_seed: int,
    shot_images: Sequence[npt.NDArray[np.uint8]],
    shot_masks: Sequence[BoolMask],
    sampling: SamplingConfig,
    trial_samples: int,
    fss_threshold: float,
    prompt_style: PromptStyle = PROMPT_STYLE,
) -> TrialScorer:
    """The default trial scorer: `trial_samples` samples from the inversion prompt (the same
    seeds for every trial), each masked by the segmenter calibrated on the shots (> the
    annotation's `fss_threshold`), scored by prototype and CLIP shot similarity."""
    shot_features = segmenter.embed(list(shot_images))
    shot_prototypes = segmenter.calibrate(shot_features, list(shot_masks))
    reference = class_prototype(foreground_prototypes(segmenter, shot_features, shot_masks))
    shot_clip = clip_embed(list(shot_images))
    centroid = torch.nn.functional.normalize(shot_clip.mean(dim=0), dim=-1)
    # NOTE: seeds apart from the class's samples' (negative indices), the same for every trial
    # so the trials differ only in their token.
    specs = [
        SampleSpec(
            index=i,
            prompt=inversion_prompt(class_name, prompt_style),
            prompt_kind="inversion",
            seed=derive_seed(class_seed, -1 - i),
        )
        for i in range(trial_samples)
    ]

    # One batch of exactly the trial samples: a larger configured batch would be padded.
    trial_sampling = replace(sampling, batch_size=trial_samples)

    def score(bg_lambda: float, embedding: torch.Tensor) -> TrialScore:
        sampler = Sampler(
            model, class_name=class_name, token_embedding=embedding, config=trial_sampling
        )
        images = [sample.image for sample in sampler.generate(specs)]
        features = segmenter.embed(images)
        masks = [p > fss_threshold for p in segmenter.predict(shot_prototypes, features)]
        prototypes = foreground_prototypes(segmenter, features, masks)
        return TrialScore(
            prototype_similarity=float((prototypes @ reference).mean()),
            shot_similarity=float((clip_embed(images) @ centroid).mean()),
        )

    return score
