"""Stable Diffusion XL base architectures with random weights, for benchmarks at full size.

Like `bench.sd15`: FLOPs and memory traffic do not depend on weight values, so these stand in
for the real checkpoint. The configs are stabilityai/stable-diffusion-xl-base-1.0's (UNet, VAE,
CLIP ViT-L/14 and OpenCLIP ViT-bigG/14 text towers); both tokenizers are the tiny local one
(the second padding with "!", as SDXL's does), whose ids fall inside CLIP's vocabulary, so
prompts encode with the real sequence length (77) and widths (768 + 1280 = 2048).

NOTE: ~3.5 B parameters (UNet 2.6 B, bigG 0.7 B): 14 GB in float32. Modules are created on
the meta device and filled with N(0, 0.02) on the target device, which takes seconds where
torch's default initializers take minutes on a CPU.
"""

from __future__ import annotations

from typing import Any

import torch
from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

from aligndiff.models.diffusion import SD_SCHEDULER_CONFIG, DiffusionModel, resolve_dtype
from bench.sd15 import CLIP_VIT_L14_TEXT_CONFIG, SD15_VAE_CONFIG, special_token_ids
from bench.sd15 import tiny_tokenizer as _tiny_tokenizer

SDXL_MODEL_ID = "sdxl-base-architecture-random-weights"

# The `config.json` values of stable-diffusion-xl-base-1.0's unet/ folder. NOTE: diffusers'
# `attention_head_dim` is the number of heads here (5, 10, 20 heads of 64 channels).
SDXL_UNET_CONFIG: dict[str, Any] = {
    "sample_size": 128,
    "in_channels": 4,
    "out_channels": 4,
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    "block_out_channels": [320, 640, 1280],
    "layers_per_block": 2,
    "transformer_layers_per_block": [1, 2, 10],
    "downsample_padding": 1,
    "mid_block_scale_factor": 1,
    "act_fn": "silu",
    "norm_num_groups": 32,
    "norm_eps": 1e-5,
    "cross_attention_dim": 2048,
    "attention_head_dim": [5, 10, 20],
    "use_linear_projection": True,
    "addition_embed_type": "text_time",
    "addition_embed_type_num_heads": 64,
    "addition_time_embed_dim": 256,
    "projection_class_embeddings_input_dim": 2816,  # 6 size ids x 256 + pooled 1280
    "flip_sin_to_cos": True,
    "freq_shift": 0,
}
SDXL_VAE_CONFIG: dict[str, Any] = {
    **SD15_VAE_CONFIG,
    "sample_size": 1024,
    "scaling_factor": 0.13025,
    "force_upcast": True,
}
# laion/CLIP-ViT-bigG-14's text tower as SDXL's text_encoder_2 config has it.
OPENCLIP_BIGG_TEXT_CONFIG: dict[str, Any] = {
    **CLIP_VIT_L14_TEXT_CONFIG,
    "hidden_size": 1280,
    "intermediate_size": 5120,
    "num_hidden_layers": 32,
    "num_attention_heads": 20,
    "hidden_act": "gelu",
    "projection_dim": 1280,
}


def _random_init(module: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """A meta-device module materialized on `device`: weights N(0, 0.02), norms' scales 1."""
    module = module.to_empty(device=device)
    with torch.no_grad():
        for name, parameter in module.named_parameters():
            if name.endswith("bias"):
                parameter.zero_()
            elif parameter.ndim == 1:
                parameter.fill_(1.0)
            else:
                parameter.normal_(0.0, 0.02)
        for buffer_name, buffer in module.named_buffers():
            if buffer_name.endswith("position_ids"):
                buffer.copy_(torch.arange(buffer.shape[-1], device=device).expand_as(buffer))
    return module


def build_sdxl(*, device: str | torch.device, dtype: str | torch.dtype) -> DiffusionModel:
    """SDXL base shapes with random weights, frozen like `load_diffusion_model` leaves a model
    (its VAE in float32 whatever `dtype`, as `force_upcast` asks)."""
    torch_device, torch_dtype = torch.device(device), resolve_dtype(dtype)
    tokenizer = _tiny_tokenizer()
    tokenizer_2 = _tiny_tokenizer(pad_token="!")
    config_1 = CLIPTextConfig(**CLIP_VIT_L14_TEXT_CONFIG, **special_token_ids(tokenizer))
    config_2 = CLIPTextConfig(**OPENCLIP_BIGG_TEXT_CONFIG, **special_token_ids(tokenizer_2))
    config_2.pad_token_id = int(tokenizer_2.pad_token_id)  # type: ignore[arg-type]
    with torch.device("meta"):
        unet = UNet2DConditionModel(**SDXL_UNET_CONFIG)
        vae = AutoencoderKL(**SDXL_VAE_CONFIG)
        text_encoder = CLIPTextModel(config_1)
        text_encoder_2 = CLIPTextModelWithProjection(config_2)
    modules: list[torch.nn.Module] = []
    for module in (unet, vae, text_encoder, text_encoder_2):
        if module is not vae:
            # Cast while on meta: the weights are then created in the target dtype (half the
            # memory of float32 ones converted after).
            module.to(dtype=torch_dtype)  # type: ignore[call-arg]
        module = _random_init(module, torch_device)
        module.requires_grad_(False)
        module.eval()
        modules.append(module)
    unet, vae, text_encoder, text_encoder_2 = modules
    return DiffusionModel(
        unet=unet,  # type: ignore[arg-type]
        vae=vae,  # type: ignore[arg-type]
        text_encoder=text_encoder,  # type: ignore[arg-type]
        tokenizer=tokenizer,
        scheduler=DDIMScheduler(**SD_SCHEDULER_CONFIG),
        model_id=SDXL_MODEL_ID,
        device=torch_device,
        dtype=torch_dtype,
        family="sdxl",
        text_encoder_2=text_encoder_2,  # type: ignore[arg-type]
        tokenizer_2=tokenizer_2,
    )
