"""`bg_lambda: auto`: trial inversions at a grid of values, the best kept by its trial samples'
acceptance signals, and the full inversion continued from it."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
import torch

from aligndiff.inversion import InversionConfig, invert
from aligndiff.shots import load_shots
from aligndiff.synth import Models, SynthConfig, learn_token
from aligndiff.tuning import TrialScore, TuningConfig, tune_bg_lambda

CONFIG = replace(InversionConfig.tiny(), steps=10)
GRID = (0.2, 0.6, 1.0)


def scores_by_value(scores: dict[float, float]):  # type: ignore[no-untyped-def]
    """An injected trial scorer: each value's score, whatever its samples show."""
    calls: list[float] = []

    def score(bg_lambda: float, embedding: torch.Tensor) -> TrialScore:
        calls.append(bg_lambda)
        value = scores[bg_lambda]
        return TrialScore(prototype_similarity=value, shot_similarity=value)

    return score, calls


@pytest.mark.parametrize("best", GRID)
def test_auto_keeps_the_value_whose_trial_scores_best_and_goes_on_to_its_full_inversion(
    tiny_models: Models, dog_shots_dir: Path, best: float
) -> None:
    # given shots and trial scores that favour `best`
    (shot,) = load_shots(dog_shots_dir)
    score, calls = scores_by_value({value: 0.9 if value == best else 0.3 for value in GRID})
    steps: list[tuple[int, int]] = []

    # when bg_lambda is tuned over the grid
    tuned = tune_bg_lambda(
        tiny_models.diffusion,
        [shot.image_array],
        [shot.mask],
        class_name="dog",
        config=CONFIG,
        tuning=TuningConfig(grid=GRID, trial_fraction=0.2),
        score_trial=score,
        progress=lambda done, total: steps.append((done, total)),
    )

    # then every value was tried for 2 of the 10 steps and scored once, `best` was kept, and
    # its embedding is exactly what a fixed inversion at `best` learns
    assert tuned is not None
    assert calls == list(GRID)
    assert tuned.bg_lambda == best
    assert [(t.bg_lambda, t.steps, t.score) for t in tuned.trials] == [
        (value, 2, pytest.approx(0.9 if value == best else 0.3)) for value in GRID
    ]
    fixed = invert(
        tiny_models.diffusion,
        [shot.image_array],
        [shot.mask],
        class_name="dog",
        config=replace(CONFIG, lambda_bg=best),
    )
    assert torch.equal(tuned.inversion.embedding, fixed.embedding)
    assert tuned.inversion.losses == fixed.losses
    # progress counts every step run: 3 trials of 2, then the 8 left of the kept one
    assert steps[-1] == (14, 14)
    assert [done for done, _ in steps] == list(range(1, 15))


def test_a_tie_keeps_the_first_value_of_the_grid(tiny_models: Models, dog_shots_dir: Path) -> None:
    (shot,) = load_shots(dog_shots_dir)
    score, _ = scores_by_value(dict.fromkeys(GRID, 0.5))

    tuned = tune_bg_lambda(
        tiny_models.diffusion, [shot.image_array], [shot.mask], class_name="dog",
        config=CONFIG, tuning=TuningConfig(grid=GRID), score_trial=score,
    )  # fmt: skip

    assert tuned is not None and tuned.bg_lambda == GRID[0]


def test_a_stop_request_during_the_trials_ends_tuning_with_nothing(
    tiny_models: Models, dog_shots_dir: Path
) -> None:
    (shot,) = load_shots(dog_shots_dir)
    score, calls = scores_by_value(dict.fromkeys(GRID, 0.5))
    asked = iter([False, False, False, True])

    tuned = tune_bg_lambda(
        tiny_models.diffusion, [shot.image_array], [shot.mask], class_name="dog",
        config=CONFIG, tuning=TuningConfig(grid=GRID, trial_fraction=0.2), score_trial=score,
        should_stop=lambda: next(asked, True),
    )  # fmt: skip

    assert tuned is None
    assert calls == [GRID[0]]


def test_the_default_scorer_draws_trial_samples_and_records_each_trial(
    tiny_models: Models, dog_shots_dir: Path
) -> None:
    # given the tiny models' own trial scorer (samples, FSS masks, CLIP)
    (shot,) = load_shots(dog_shots_dir)
    config = replace(
        SynthConfig.for_model("tiny"),
        inversion=CONFIG,
        tuning=TuningConfig(grid=(0.2, 1.0), trial_samples=1),
    )

    # when a class's token is learned with bg_lambda "auto"
    learned = learn_token(
        tiny_models, [shot.image_array], [shot.mask], class_name="dog", class_seed=7,
        bg_lambda="auto", config=config,
    )  # fmt: skip

    # then the kept value is the best-scoring trial's, each trial's score is the mean of its
    # two signals, and the trials are recorded for the class
    assert learned is not None and learned.tuning is not None
    assert [trial["bg_lambda"] for trial in learned.tuning] == [0.2, 1.0]
    best = max(learned.tuning, key=lambda trial: trial["score"])
    assert learned.bg_lambda == best["bg_lambda"]
    for trial in learned.tuning:
        assert trial["score"] == pytest.approx(
            (trial["prototype_similarity"] + trial["shot_similarity"]) / 2
        )
        assert -1.0 <= trial["prototype_similarity"] <= 1.0


def test_bad_grids_are_refused() -> None:
    with pytest.raises(ValueError, match="at least one value"):
        TuningConfig(grid=())
    with pytest.raises(ValueError, match=r"\[0, 2\]"):
        TuningConfig(grid=(0.5, 2.5))
