"""SDXL: `aligndiff synth` on an SDXL model end to end, its two-vector embedding in diffusers'
SDXL pipeline, and the class name at the same token positions in both tokenizers."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace
from typing import cast

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionXLPipeline
from PIL import Image
from safetensors.torch import load_file
from transformers import CLIPTokenizer

from aligndiff.conditioning import tokenize_for_model
from aligndiff.inversion import (
    InversionConfig,
    initial_embedding,
    invert,
    load_embedding,
    save_embedding,
)
from aligndiff.models.diffusion import TINY_SDXL, DiffusionModel, load_diffusion_model
from aligndiff.models.tokenizer import write_tiny_tokenizer
from aligndiff.names import inversion_prompt
from aligndiff.prompts import prompt_bank
from aligndiff.sampling import Sampler, SamplingConfig
from aligndiff.synth import SynthConfig
from tests.conftest import SHOTS_DIR
from tests.test_synth import run_cli

QUICK = InversionConfig(steps=2, batch_size=2, gradient_accumulation=1, resolution=64)


@pytest.fixture(scope="module")
def tiny_sdxl(model_cache: Path) -> DiffusionModel:
    return load_diffusion_model(TINY_SDXL, cache_dir=model_cache)


def square_shot(size: int = 64) -> tuple[np.ndarray, np.ndarray]:
    image = np.random.default_rng(0).integers(0, 256, (size, size, 3), dtype=np.uint8)
    mask = np.zeros((size, size), dtype=bool)
    mask[size // 4 : 3 * size // 4, size // 4 : 3 * size // 4] = True
    return image, mask


def test_synth_on_tiny_sdxl_writes_pairs_and_a_two_vector_embedding(
    tmp_path: Path, model_cache: Path
) -> None:
    # when: a user runs the command with the SDXL model
    out = tmp_path / "dog"
    done = run_cli(
        "synth", str(SHOTS_DIR / "dog"), "--class-name", "dog", "--out", str(out),
        "--num-samples", "2", "--model", TINY_SDXL, "--inversion-steps", "2",
        "--sampling-steps", "2", cache=model_cache,
    )  # fmt: skip

    # then: image/mask pairs of the model's size, their records, and the SDXL embedding
    assert done.returncode == 0, done.stderr
    images = sorted((out / "images").glob("*.png"))
    masks = sorted((out / "masks").glob("*.png"))
    assert [p.name for p in images] == [p.name for p in masks] == ["00000.png", "00001.png"]
    assert all(Image.open(p).size == (128, 128) for p in images + masks)
    records = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert [r["prompt_kind"] for r in records] == ["inversion", "text"]
    state = load_file(str(out / "embedding.safetensors"))
    assert {key: tuple(value.shape) for key, value in state.items()} == {
        "clip_l": (1, 32),
        "clip_g": (1, 64),
    }
    token, vector = load_embedding(out / "embedding.safetensors")
    assert token == "<dog>" and vector.shape == (96,)


def test_the_sdxl_embedding_loads_into_diffusers_and_generates(
    tiny_sdxl: DiffusionModel, tmp_path: Path, model_cache: Path
) -> None:
    # given: a token learned on the tiny SDXL and written in the community format
    image, mask = square_shot()
    result = invert(tiny_sdxl, [image], [mask], class_name="dog", config=QUICK)
    path = tmp_path / "embedding.safetensors"
    save_embedding(path, result.token, result.embedding, widths=result.widths)

    # when: diffusers' SDXL pipeline of the same folder loads it, one call per text encoder
    pipeline = StableDiffusionXLPipeline.from_pretrained(str(model_cache / "tiny-sdxl-v1"))
    state = load_file(str(path))
    pipeline.load_textual_inversion(
        state["clip_g"],
        token=result.token,
        text_encoder=pipeline.text_encoder_2,
        tokenizer=pipeline.tokenizer_2,
    )
    pipeline.load_textual_inversion(
        state["clip_l"],
        token=result.token,
        text_encoder=pipeline.text_encoder,
        tokenizer=pipeline.tokenizer,
    )

    # then: each encoder holds its learned vector, and the inversion prompt generates
    clip_l, clip_g = result.embedding.split(result.widths)
    for tokenizer, encoder, vector in (
        (pipeline.tokenizer, pipeline.text_encoder, clip_l),
        (pipeline.tokenizer_2, pipeline.text_encoder_2, clip_g),
    ):
        row = encoder.get_input_embeddings().weight[tokenizer.convert_tokens_to_ids(result.token)]
        torch.testing.assert_close(row, vector)
    generated = pipeline(
        inversion_prompt("dog"),
        num_inference_steps=2,
        height=64,
        width=64,
        output_type="np",
        generator=torch.Generator().manual_seed(0),
    ).images
    assert generated.shape == (1, 64, 64, 3) and np.isfinite(generated).all()


def test_sdxl_masks_come_from_both_cross_attention_resolutions(tiny_sdxl: DiffusionModel) -> None:
    from aligndiff.attention import finest_positions

    # then: cross-attention sits at two resolutions (SDXL's 64 and 32 at 1024 px), both read
    assert finest_positions(tiny_sdxl.unet, (16, 16), 3) == {8 * 8, 4 * 4}
    assert tiny_sdxl.vae.dtype == torch.float32


def sdxl_tokenizers(first: CLIPTokenizer, second: CLIPTokenizer) -> DiffusionModel:
    return cast(DiffusionModel, SimpleNamespace(tokenizers=[first, second]))


def test_the_name_sits_at_the_same_positions_in_both_real_tokenizers(
    real_clip_tokenizer_dir: Path,
) -> None:
    # given: SDXL's two tokenizers: the same CLIP BPE, the second padding with "!"
    first = CLIPTokenizer.from_pretrained(str(real_clip_tokenizer_dir))
    second = CLIPTokenizer.from_pretrained(str(real_clip_tokenizer_dir), pad_token="!")
    assert second.pad_token_id != first.pad_token_id

    # when: the inversion prompt of a multi-token name is tokenized by both
    name = "samarra mosque"
    one, two = tokenize_for_model(sdxl_tokenizers(first, second), [inversion_prompt(name)], name)

    # then: the name and the learned token's slot are at the same positions
    assert torch.equal(one.name_mask, two.name_mask) and int(one.name_mask.sum()) >= 2
    assert torch.equal(one.placeholder_mask, two.placeholder_mask)


def test_tokenizers_that_split_the_name_differently_are_refused(
    real_clip_tokenizer_dir: Path, tmp_path: Path
) -> None:
    # given: a second tokenizer with another vocabulary (the tiny one splits "samarra" apart)
    write_tiny_tokenizer(tmp_path / "tiny", pad_token="!")
    first = CLIPTokenizer.from_pretrained(str(real_clip_tokenizer_dir))
    second = CLIPTokenizer.from_pretrained(str(tmp_path / "tiny"))

    # then: tokenizing for such a model fails with a clear message
    with pytest.raises(ValueError, match="different positions"):
        tokenize_for_model(sdxl_tokenizers(first, second), [inversion_prompt("samarra")], "samarra")


def test_sdxl_defaults_to_its_own_guidance_and_the_model_resolution() -> None:
    # then: SDXL samples at CFG 5.0, SD keeps the reference's 7.5
    assert SynthConfig.for_model(TINY_SDXL).sampling.guidance_scale == 5.0
    assert SynthConfig.for_model("tiny").sampling.guidance_scale == 7.5
    assert SynthConfig.for_model(TINY_SDXL).sampling.resolution is None  # the model's own


def test_an_sdxl_sample_regenerates_alone_bit_for_bit(tiny_sdxl: DiffusionModel) -> None:
    # given: a learned vector pair and two samples drawn together
    embedding = initial_embedding(tiny_sdxl)
    config = SamplingConfig(num_steps=2, batch_size=2, guidance_scale=5.0, resolution=64)
    specs = prompt_bank("dog", num_samples=2, class_seed=3)

    def sampler() -> Sampler:
        return Sampler(tiny_sdxl, class_name="dog", token_embedding=embedding, config=config)

    together = list(sampler().generate(specs))

    # when: the second is drawn on its own
    (alone,) = sampler().generate(specs[1:])

    # then: the same image and mask, and the mask is a soft map in [0, 1]
    assert np.array_equal(alone.image, together[1].image)
    assert np.array_equal(alone.coarse_mask, together[1].coarse_mask)
    assert alone.image.shape == (64, 64, 3)
    assert alone.coarse_mask.min() >= 0 and alone.coarse_mask.max() <= 1


def test_a_worker_stores_an_sdxl_class_s_token_in_the_format_diffusers_loads(
    tmp_path: Path, model_cache: Path
) -> None:
    # given a worker serving the tiny SDXL model, and a class of two samples
    from aligndiff.settings import Settings
    from aligndiff.synth import load_models
    from tests.worker_support import create_class, in_process_app, run_job

    models = load_models(Settings(diffusion_model=TINY_SDXL, model_cache_dir=model_cache))
    app, queue, service = in_process_app(
        tmp_path, models, sample_chunk_size=2, diffusion_model=TINY_SDXL
    )
    created = create_class(service, SHOTS_DIR / "dog", name="dog", num_samples=2)

    # when the class is synthesized
    run_job(app, queue, created.job_id)

    # then the job succeeded and its embedding is the two-encoder community format
    assert service.job(created.job_id).status == "succeeded"
    segclass = service.segclass(created.class_id)
    assert segclass.embedding_key is not None
    path = tmp_path / "embedding.safetensors"
    path.write_bytes(service.storage.get(segclass.embedding_key))
    state = load_file(str(path))
    widths = models.diffusion.embedding_widths
    assert {name: tuple(t.shape) for name, t in state.items()} == {
        "clip_l": (1, widths[0]),
        "clip_g": (1, widths[1]),
    }
