"""Sampling: reproducible per-sample seeds, coarse masks, cooperative stop."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pytest
import torch

from aligndiff.models.diffusion import DiffusionModel
from aligndiff.prompts import SampleSpec, prompt_bank
from aligndiff.sampling import GeneratedSample, Sampler, SamplingConfig

EMBEDDING = torch.linspace(-1, 1, 64)


def draw(
    model: DiffusionModel,
    specs: Sequence[SampleSpec],
    *,
    batch_size: int = 4,
    embedding: torch.Tensor = EMBEDDING,
) -> dict[int, GeneratedSample]:
    config = SamplingConfig(num_steps=3, batch_size=batch_size)
    sampler = Sampler(model, class_name="dog", token_embedding=embedding, config=config)
    return {s.spec.index: s for s in sampler.generate(specs)}


@pytest.fixture(scope="module")
def specs() -> list[SampleSpec]:
    return prompt_bank("dog", num_samples=9, class_seed=5)


def test_a_sample_is_identical_whatever_batch_it_falls_in(tiny_sd, specs) -> None:
    # given: all nine samples drawn in order, four per batch
    everything = draw(tiny_sd, specs)

    # when: sample 2 is drawn alone, with others, and at another position in its batch
    for companions in ([2], [8, 2], [7, 6, 5, 2], [2, 3, 4, 5]):
        again = draw(tiny_sd, [specs[i] for i in companions])

        # then: its pixels and its mask are bit-for-bit the same
        np.testing.assert_array_equal(again[2].image, everything[2].image)
        np.testing.assert_array_equal(again[2].coarse_mask, everything[2].coarse_mask)


def test_different_seeds_give_different_images(tiny_sd, specs) -> None:
    samples = draw(tiny_sd, specs[:4])

    assert not np.array_equal(samples[0].image, samples[2].image)


def test_coarse_masks_are_soft_masks_with_the_image_size(tiny_sd, specs) -> None:
    for sample in draw(tiny_sd, specs[:4]).values():
        assert sample.image.shape == (128, 128, 3) and sample.image.dtype == np.uint8
        assert sample.coarse_mask.shape == (128, 128)
        assert sample.coarse_mask.min() >= 0.0 and sample.coarse_mask.max() <= 1.0
        # each resolution peaks at 1 before they are averaged, so the average peaks above 1/3
        assert sample.coarse_mask.max() > 1 / 3


def test_the_learned_token_changes_only_inversion_samples(tiny_sd, specs) -> None:
    first = draw(tiny_sd, specs[:2], embedding=EMBEDDING)
    second = draw(tiny_sd, specs[:2], embedding=-EMBEDDING)

    assert first[0].spec.prompt_kind == "inversion"
    assert not np.array_equal(first[0].image, second[0].image)
    np.testing.assert_array_equal(first[1].image, second[1].image)


def test_generation_stops_between_batches_when_asked(tiny_sd, specs) -> None:
    config = SamplingConfig(num_steps=2, batch_size=2)
    sampler = Sampler(tiny_sd, class_name="dog", token_embedding=EMBEDDING, config=config)
    produced: list[int] = []

    for sample in sampler.generate(specs, should_stop=lambda: len(produced) >= 2):
        produced.append(sample.spec.index)

    assert produced == [0, 1]


def test_sampling_settings_are_validated() -> None:
    with pytest.raises(ValueError, match="multiple of 64"):
        SamplingConfig(resolution=100)
    with pytest.raises(ValueError, match="num_steps"):
        SamplingConfig(num_steps=0)
