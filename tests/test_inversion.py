"""Normalized masked textual inversion."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionPipeline

from aligndiff.inversion import (
    InversionConfig,
    InversionObjective,
    encode_shots,
    initial_embedding,
    invert,
    latent_masks,
    load_embedding,
    masked_diffusion_loss,
    save_embedding,
)
from aligndiff.models.diffusion import TINY_CACHE_NAME, DiffusionModel
from aligndiff.shots import load_shots
from tests.conftest import SHOTS_DIR

QUICK = InversionConfig(steps=4, batch_size=2, gradient_accumulation=2, learning_rate=1e-2)


@pytest.fixture(scope="module")
def dog() -> tuple[list[np.ndarray], list[np.ndarray]]:
    shots = load_shots(SHOTS_DIR / "dog")
    return [s.image_array for s in shots], [s.mask for s in shots]


def test_loss_equals_a_hand_computation() -> None:
    # given: a 1×1×2×2 toy where the error is 1 on the single foreground pixel and 2 elsewhere
    prediction = torch.tensor([[[[1.0, 2.0], [2.0, 2.0]]]])
    target = torch.zeros_like(prediction)
    foreground = torch.tensor([[[True, False], [False, False]]])

    loss = masked_diffusion_loss(prediction, target, foreground, lambda_bg=0.6)

    # then: fg mean (1²) + 0.6 · bg mean ((4 + 4 + 4) / 3)
    assert loss.item() == pytest.approx(1.0 + 0.6 * 4.0)


def test_each_region_is_averaged_on_its_own_and_images_are_averaged() -> None:
    prediction = torch.ones((2, 4, 4, 4))
    prediction[1] *= 3
    target = torch.zeros_like(prediction)
    foreground = torch.zeros((2, 4, 4), dtype=torch.bool)
    foreground[0, 0, 0] = True  # one pixel of sixteen
    foreground[1] = True  # an image with no background adds no background term

    loss = masked_diffusion_loss(prediction, target, foreground, lambda_bg=0.5)

    assert loss.item() == pytest.approx(((1 + 0.5 * 1) + 9) / 2)


def test_learning_reduces_the_loss_on_a_fixed_evaluation_batch(tiny_sd: DiffusionModel, dog):
    # given: a fixed batch of noise and timesteps to evaluate candidate embeddings on
    images, masks = dog
    data = encode_shots(tiny_sd, images, masks, resolution=128, flip=True, mask_threshold=0.3)
    objective = InversionObjective(tiny_sd, data, class_name="dog", lambda_bg=0.6)
    generator = torch.Generator().manual_seed(3)
    indices = torch.tensor([0, 1, 0, 1])
    noise = torch.randn((4, 4, 16, 16), generator=generator)
    latent_noise = torch.randn((4, 4, 16, 16), generator=generator)
    timesteps = torch.tensor([100, 300, 500, 700])

    def evaluate(embedding: torch.Tensor) -> float:
        with torch.no_grad():
            return objective.loss(embedding, indices, noise, timesteps, latent_noise).item()

    # when: the token is learned
    result = invert(
        tiny_sd,
        images,
        masks,
        class_name="dog",
        config=InversionConfig(steps=25, batch_size=4, gradient_accumulation=1, learning_rate=5e-2),
    )

    # then: it denoises the shots better than the initializer word did
    assert evaluate(result.embedding) < evaluate(initial_embedding(tiny_sd))
    assert len(result.losses) == 25


def test_nothing_but_the_new_token_changes(tiny_sd: DiffusionModel, dog) -> None:
    images, masks = dog
    before = {
        name: {k: v.clone() for k, v in getattr(tiny_sd, name).state_dict().items()}
        for name in ("unet", "vae", "text_encoder")
    }
    vocabulary = len(tiny_sd.tokenizer)

    result = invert(tiny_sd, images, masks, class_name="dog", config=QUICK)

    for name, state in before.items():
        after = getattr(tiny_sd, name).state_dict()
        assert all(torch.equal(state[k], after[k]) for k in state), name
    assert len(tiny_sd.tokenizer) == vocabulary
    assert not torch.equal(result.embedding, initial_embedding(tiny_sd))
    assert not any(p.requires_grad for p in tiny_sd.text_encoder.parameters())


def test_an_empty_foreground_is_refused_before_any_work(tiny_sd: DiffusionModel, dog) -> None:
    images, masks = dog
    empty = np.zeros_like(masks[0])
    calls = []
    with pytest.raises(ValueError, match="no foreground"):
        invert(
            tiny_sd,
            images,
            [empty],
            class_name="dog",
            config=QUICK,
            progress=lambda done, total: calls.append(done),
        )
    assert calls == []


def test_images_and_masks_are_flipped_together(tiny_sd: DiffusionModel) -> None:
    # given: a 128² shot whose object sits in the left third
    image = np.zeros((128, 128, 3), dtype=np.uint8)
    image[:, :40] = 255
    mask = np.zeros((128, 128), dtype=bool)
    mask[30:90, 5:40] = True

    data = encode_shots(tiny_sd, [image], [mask], resolution=128, flip=True, mask_threshold=0.3)

    # then: the flipped copy's mask is the flipped mask, on the right, beside the flipped image
    flipped = latent_masks(torch.from_numpy(mask[:, ::-1].copy())[None], (16, 16), 0.3)[0]
    assert torch.equal(data.foreground[1], flipped)
    assert data.foreground[0][:, :8].any() and not data.foreground[0][:, 8:].any()
    assert data.foreground[1][:, 8:].any() and not data.foreground[1][:, :8].any()
    mirrored = encode_shots(
        tiny_sd, [image[:, ::-1].copy()], [mask], resolution=128, flip=False, mask_threshold=0.3
    )
    torch.testing.assert_close(data.latent_mean[1], mirrored.latent_mean[0])


def test_a_tiny_object_keeps_a_foreground_at_latent_size() -> None:
    mask = torch.zeros((1, 128, 128))
    mask[0, 3, 5] = 1  # one pixel that nearest sampling to 16×16 skips

    latent = latent_masks(mask, (16, 16), threshold=0.3)

    assert int(latent.sum()) == 1


def test_the_embedding_loads_with_diffusers_textual_inversion(
    tiny_sd: DiffusionModel, dog, tmp_path: Path, model_cache: Path
) -> None:
    # given: a learned token written to disk
    images, masks = dog
    result = invert(tiny_sd, images, masks, class_name="dog", config=QUICK)
    path = tmp_path / "embedding.safetensors"
    save_embedding(path, result.token, result.embedding)

    # when: a diffusers pipeline of the same checkpoint loads it
    pipeline = StableDiffusionPipeline.from_pretrained(
        str(model_cache / TINY_CACHE_NAME), safety_checker=None
    )
    vocabulary = len(pipeline.tokenizer)
    pipeline.load_textual_inversion(str(path))

    # then: the token is in its vocabulary with exactly the learned vector
    token_id = pipeline.tokenizer.convert_tokens_to_ids("<dog>")
    row = pipeline.text_encoder.get_input_embeddings().weight[token_id]
    assert len(pipeline.tokenizer) == vocabulary + 1
    torch.testing.assert_close(row, result.embedding)
    token, vector = load_embedding(path)
    assert token == "<dog>"
    torch.testing.assert_close(vector, result.embedding)
