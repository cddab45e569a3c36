"""Model loading: tiny models from config, and the real from_pretrained path they go through."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from diffusers import StableDiffusionPipeline

from aligndiff.conditioning import encode_prompts
from aligndiff.inversion import InversionData, InversionObjective, initial_embedding
from aligndiff.models.diffusion import (
    TINY_SD2,
    TINY_SDXL,
    DiffusionModel,
    load_diffusion_model,
    resolve_device,
    resolve_dtype,
    save_tiny_diffusion,
)
from aligndiff.models.family import UnsupportedModelError, model_family


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
    # A path says it is no folder, rather than the hub's complaint about a repo id's characters.
    with pytest.raises(OSError, match=f"^{re.escape(str(tmp_path / 'nowhere'))}: no such folder$"):
        load_diffusion_model(str(tmp_path / "nowhere"), cache_dir=tmp_path)


@pytest.mark.skipif(torch.cuda.is_available(), reason="a machine with a CUDA GPU has cuda")
def test_a_device_this_machine_lacks_is_refused_saying_why() -> None:
    assert resolve_device("cpu") == torch.device("cpu")
    with pytest.raises(ValueError, match="device 'cuda' is not available: "):
        resolve_device("cuda")
    with pytest.raises(ValueError, match="unknown device 'gpu0'"):
        resolve_device("gpu0")


def test_dtype_names_resolve_and_unknown_ones_are_refused() -> None:
    assert resolve_dtype("fp16") is torch.float16
    assert resolve_dtype("bfloat16") is torch.bfloat16
    with pytest.raises(ValueError, match="unknown dtype"):
        resolve_dtype("float8")


def test_a_model_of_an_unsupported_family_fails_at_load_naming_it(tmp_path: Path) -> None:
    # given: a diffusers folder of another pipeline family (the tiny SD, relabelled)
    folder = tmp_path / "flux-like"
    save_tiny_diffusion(folder)
    index = json.loads((folder / "model_index.json").read_text())
    index["_class_name"] = "FluxPipeline"
    (folder / "model_index.json").write_text(json.dumps(index))

    # then: loading it says which family it is and which ones are supported
    with pytest.raises(UnsupportedModelError, match="FluxPipeline") as raised:
        load_diffusion_model(str(folder), cache_dir=tmp_path / "unused")
    assert "StableDiffusionPipeline" in str(raised.value)
    assert "StableDiffusionXLPipeline" in str(raised.value)


def test_tiny_models_have_their_family(model_cache: Path, tiny_sd: DiffusionModel) -> None:
    # then: the family comes from the folder's model_index.json
    assert tiny_sd.family == "sd" and model_family("tiny") == "sd"
    sd2 = load_diffusion_model(TINY_SD2, cache_dir=model_cache)
    assert sd2.family == "sd" and sd2.scheduler.config.prediction_type == "v_prediction"
    sdxl = load_diffusion_model(TINY_SDXL, cache_dir=model_cache)
    assert model_family(str(model_cache / "tiny-sdxl-v1")) == "sdxl"
    assert sdxl.family == "sdxl" and sdxl.embedding_widths == [32, 64]
    assert sdxl.unet.config.addition_embed_type == "text_time"
    assert sdxl.vae.config.force_upcast and sdxl.tokenizer_2 is not None
    assert sdxl.tokenizer_2.pad_token == "!"


def test_the_v_prediction_inversion_loss_is_the_velocity_error(model_cache: Path) -> None:
    # given: the tiny SD 2-style model and one toy latent whose left half is foreground
    model = load_diffusion_model(TINY_SD2, cache_dir=model_cache)
    generator = torch.Generator().manual_seed(0)
    mean = torch.randn((1, 4, 16, 16), generator=generator)
    foreground = torch.zeros((1, 16, 16), dtype=torch.bool)
    foreground[:, :, :8] = True
    data = InversionData(latent_mean=mean, latent_std=torch.zeros_like(mean), foreground=foreground)
    objective = InversionObjective(model, data, class_name="dog", lambda_bg=0.6)
    embedding = initial_embedding(model)
    noise = torch.randn((1, 4, 16, 16), generator=generator)
    timestep = torch.tensor([700])

    # when: the objective's loss is computed
    loss = objective.loss(embedding, torch.tensor([0]), noise, timestep, torch.zeros_like(noise))

    # then: it is the masked error against v = alpha_t·noise − sigma_t·x0, by hand
    x0 = mean * model.vae.config.scaling_factor
    alpha_bar = model.scheduler.alphas_cumprod[700]
    alpha, sigma = alpha_bar.sqrt(), (1 - alpha_bar).sqrt()
    states = encode_prompts(model.text_encoder, objective.tokens[0], embedding)
    with torch.no_grad():
        prediction = model.unet(alpha * x0 + sigma * noise, timestep, states).sample
    error = (prediction - (alpha * noise - sigma * x0)).pow(2).mean(dim=1)[0]
    by_hand = error[:, :8].mean() + 0.6 * error[:, 8:].mean()
    torch.testing.assert_close(loss.detach(), by_hand, rtol=1e-5, atol=1e-6)
