"""Model loading: tiny models from config, and the real from_pretrained path they go through."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from diffusers import StableDiffusionPipeline

from aligndiff.models.diffusion import (
    DiffusionModel,
    load_diffusion_model,
    resolve_dtype,
    save_tiny_diffusion,
)


def unet_output(model: DiffusionModel) -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    latents = torch.randn((1, 4, 16, 16), generator=generator)
    states = torch.randn((1, 77, 64), generator=generator)
    with torch.inference_mode():
        return model.unet(latents, torch.tensor([500]), encoder_hidden_states=states).sample


def test_tiny_model_is_built_deterministically(tmp_path: Path, tiny_sd: DiffusionModel) -> None:
    # given: a second, independent build in another cache
    rebuilt = load_diffusion_model("tiny", cache_dir=tmp_path)

    # then: the weights are the same, so every machine's "tiny" is the same model
    for name in ("unet", "vae", "text_encoder"):
        ours, theirs = getattr(tiny_sd, name).state_dict(), getattr(rebuilt, name).state_dict()
        assert ours.keys() == theirs.keys()
        assert all(torch.equal(ours[k], theirs[k]) for k in ours)


def test_a_saved_model_loads_back_from_its_folder(tmp_path: Path, tiny_sd: DiffusionModel) -> None:
    # given: the tiny model written to a folder, as a real checkpoint would be
    folder = tmp_path / "my-checkpoint"
    save_tiny_diffusion(folder)

    # when: it is loaded by path (the code path real weights take)
    loaded = load_diffusion_model(str(folder), cache_dir=tmp_path / "unused")

    # then: it computes what the in-memory model computes, and diffusers reads the layout too
    assert loaded.model_id == str(folder)
    assert torch.allclose(unet_output(loaded), unet_output(tiny_sd), atol=1e-6)
    pipeline = StableDiffusionPipeline.from_pretrained(str(folder), safety_checker=None)
    assert pipeline.unet.config.cross_attention_dim == 64
    assert not (tmp_path / "unused").exists()


def test_tiny_model_is_stable_diffusion_shaped(tiny_sd: DiffusionModel) -> None:
    # then: 8x VAE downscale, 4 latent channels, cross-attention at three resolutions + mid block
    assert tiny_sd.vae_scale_factor == 8
    assert tiny_sd.default_resolution == 128
    cross = [n for n in tiny_sd.unet.attn_processors if n.endswith("attn2.processor")]
    blocks = {n.split(".attentions")[0] for n in cross}
    assert {"down_blocks.0", "down_blocks.1", "down_blocks.2", "mid_block"} <= blocks
    assert not any(p.requires_grad for p in tiny_sd.unet.parameters())


def test_a_missing_checkpoint_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(OSError):
        load_diffusion_model(str(tmp_path / "nowhere"), cache_dir=tmp_path)


def test_dtype_names_resolve_and_unknown_ones_are_refused() -> None:
    assert resolve_dtype("fp16") is torch.float16
    assert resolve_dtype("bfloat16") is torch.bfloat16
    with pytest.raises(ValueError, match="unknown dtype"):
        resolve_dtype("float8")
