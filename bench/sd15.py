"""Stable Diffusion 1.5 architectures with random weights, for benchmarks at full size.

FLOPs and memory traffic do not depend on weight values, so these stand in for the real
checkpoint where it is absent. The configs are SD 1.5's own (UNet, VAE, CLIP ViT-L/14 text
encoder); the tokenizer is the tiny local one, whose ids all fall inside CLIP's 49408-token
vocabulary, so prompts encode with the real sequence length (77) and width (768).
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import torch
from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from aligndiff.models.diffusion import SD_SCHEDULER_CONFIG, DiffusionModel, resolve_dtype
from aligndiff.models.tokenizer import BOS, CONTEXT_LENGTH, EOS, write_tiny_tokenizer

SD15_MODEL_ID = "sd15-architecture-random-weights"


# The `config.json` values of runwayml/stable-diffusion-v1-5's unet/ and vae/ folders.
SD15_UNET_CONFIG: dict[str, Any] = {
    "sample_size": 64,
    "in_channels": 4,
    "out_channels": 4,
    "down_block_types": ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
    "up_block_types": ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3,
    "block_out_channels": [320, 640, 1280, 1280],
    "layers_per_block": 2,
    "downsample_padding": 1,
    "mid_block_scale_factor": 1,
    "act_fn": "silu",
    "norm_num_groups": 32,
    "norm_eps": 1e-5,
    "cross_attention_dim": 768,
    "attention_head_dim": 8,
}
SD15_VAE_CONFIG: dict[str, Any] = {
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
    "block_out_channels": [128, 256, 512, 512],
    "layers_per_block": 2,
    "act_fn": "silu",
    "latent_channels": 4,
    "norm_num_groups": 32,
    "sample_size": 512,
    "scaling_factor": 0.18215,
}
# openai/clip-vit-large-patch14's text tower (SD 1.5's text encoder); the special-token ids
# come from the tokenizer in use.
CLIP_VIT_L14_TEXT_CONFIG: dict[str, Any] = {
    "vocab_size": 49408,
    "hidden_size": 768,
    "intermediate_size": 3072,
    "num_hidden_layers": 12,
    "num_attention_heads": 12,
    "max_position_embeddings": CONTEXT_LENGTH,
    "hidden_act": "quick_gelu",
    "layer_norm_eps": 1e-5,
    "projection_dim": 768,
}


def special_token_ids(tokenizer: CLIPTokenizer) -> dict[str, Any]:
    """The tokenizer's start/end-of-text ids as CLIP text-config entries (CLIP pads with EOS)."""
    bos, eos = (int(tokenizer.convert_tokens_to_ids(t)) for t in (BOS, EOS))  # type: ignore[arg-type]
    return {"bos_token_id": bos, "eos_token_id": eos, "pad_token_id": eos}


def tiny_tokenizer(*, pad_token: str = EOS) -> CLIPTokenizer:
    with tempfile.TemporaryDirectory() as folder:
        write_tiny_tokenizer(Path(folder), pad_token=pad_token)
        return CLIPTokenizer.from_pretrained(folder)


def build_sd15(*, device: str | torch.device, dtype: str | torch.dtype) -> DiffusionModel:
    """SD 1.5 shapes with random weights, frozen like `load_diffusion_model` leaves a model."""
    torch_device, torch_dtype = torch.device(device), resolve_dtype(dtype)
    tokenizer = tiny_tokenizer()
    # NOTE: built directly on the target device: initializing ~1.1 B parameters on a GPU takes
    # a second, on a CPU (then copied over) most of a minute.
    text_config = CLIPTextConfig(**CLIP_VIT_L14_TEXT_CONFIG, **special_token_ids(tokenizer))
    with torch_device:
        unet = UNet2DConditionModel(**SD15_UNET_CONFIG)
        vae = AutoencoderKL(**SD15_VAE_CONFIG)
        text_encoder = CLIPTextModel(text_config)
    for module in (unet, vae, text_encoder):
        module.requires_grad_(False)
        module.eval()
        if torch_dtype != torch.float32:
            module.to(dtype=torch_dtype)  # type: ignore[call-arg]
    return DiffusionModel(
        unet=unet,
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        scheduler=DDIMScheduler(**SD_SCHEDULER_CONFIG),
        model_id=SD15_MODEL_ID,
        device=torch_device,
        dtype=torch_dtype,
    )
