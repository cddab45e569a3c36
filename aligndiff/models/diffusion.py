"""Stable Diffusion components: real weights by local path or hub id, or a tiny random SD.

Both go through one loading path (`from_pretrained` on a diffusers-layout folder or hub id):
`tiny` is built once from config, saved in that layout under the model cache, then loaded
like any other checkpoint.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from aligndiff.acceleration import Acceleration, prepare
from aligndiff.models.cache import cached_build
from aligndiff.models.tokenizer import BOS, CONTEXT_LENGTH, EOS, write_tiny_tokenizer
from aligndiff.settings import TINY

TINY_CACHE_NAME = "tiny-sd-v1"
TINY_SEED = 0

# Stable Diffusion 1.x noise schedule; DDIM (eta 0) makes sampling a deterministic function of
# the initial noise, which is what lets any sample be regenerated from its seed.
SD_SCHEDULER_CONFIG = {
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "clip_sample": False,
    "set_alpha_to_one": False,
    "steps_offset": 1,
    "prediction_type": "epsilon",
}


@dataclass
class DiffusionModel:
    """The frozen parts of a Stable Diffusion checkpoint, on one device and dtype."""

    unet: UNet2DConditionModel
    vae: AutoencoderKL
    text_encoder: CLIPTextModel
    tokenizer: CLIPTokenizer
    scheduler: DDIMScheduler
    model_id: str
    device: torch.device
    dtype: torch.dtype
    acceleration: Acceleration = field(default_factory=Acceleration)
    # The UNet as `denoise` runs it when it is not called directly (a compiled one, bucketed).
    runner: Callable[[torch.Tensor, torch.Tensor | float, torch.Tensor], torch.Tensor] | None = None
    # Device memory per sampled image, by (resolution, guided): measured once ("auto" batch).
    image_bytes: dict[tuple[int, bool], int] = field(default_factory=dict)

    def denoise(
        self, sample: torch.Tensor, timestep: torch.Tensor | float, states: torch.Tensor
    ) -> torch.Tensor:
        """The UNet's noise prediction for `sample` at `timestep` given text `states`."""
        if self.runner is not None:
            return self.runner(sample, timestep, states)
        return self.unet(sample, timestep, encoder_hidden_states=states).sample

    @property
    def vae_scale_factor(self) -> int:
        return int(2 ** (len(self.vae.config.block_out_channels) - 1))

    @property
    def default_resolution(self) -> int:
        """The resolution the UNet was trained at (512 for SD 1.5, 128 for tiny)."""
        return int(self.unet.config.sample_size) * self.vae_scale_factor


def tiny_unet() -> UNet2DConditionModel:
    """SD-shaped UNet: cross-attention at three resolutions plus the mid block."""
    return UNet2DConditionModel(
        sample_size=16,
        in_channels=4,
        out_channels=4,
        down_block_types=(
            "CrossAttnDownBlock2D",
            "CrossAttnDownBlock2D",
            "CrossAttnDownBlock2D",
            "DownBlock2D",
        ),
        up_block_types=(
            "UpBlock2D",
            "CrossAttnUpBlock2D",
            "CrossAttnUpBlock2D",
            "CrossAttnUpBlock2D",
        ),
        block_out_channels=(32, 32, 64, 64),
        layers_per_block=1,
        cross_attention_dim=64,
        attention_head_dim=2,
        norm_num_groups=32,
    )


def tiny_vae() -> AutoencoderKL:
    """SD-shaped VAE: four blocks, so the same 8x downscale and 4 latent channels."""
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(32, 32, 32, 32),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=32,
        sample_size=128,
        scaling_factor=0.18215,
    )


def tiny_text_encoder(tokenizer: CLIPTokenizer) -> CLIPTextModel:
    bos, eos = (int(tokenizer.convert_tokens_to_ids(t)) for t in (BOS, EOS))  # type: ignore[arg-type]
    config = CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=2,
        max_position_embeddings=CONTEXT_LENGTH,
        projection_dim=64,
        bos_token_id=bos,
        eos_token_id=eos,
        pad_token_id=eos,
    )
    return CLIPTextModel(config)


def save_tiny_diffusion(directory: Path) -> None:
    """Build the tiny random SD (deterministically) and save it in the diffusers layout."""
    write_tiny_tokenizer(directory / "tokenizer")
    tokenizer = CLIPTokenizer.from_pretrained(str(directory / "tokenizer"))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(TINY_SEED)
        parts: dict[str, Any] = {
            "unet": tiny_unet(),
            "vae": tiny_vae(),
            "text_encoder": tiny_text_encoder(tokenizer),
        }
    for name, part in parts.items():
        part.save_pretrained(str(directory / name))
    DDIMScheduler(**SD_SCHEDULER_CONFIG).save_pretrained(str(directory / "scheduler"))
    index = {
        "_class_name": "StableDiffusionPipeline",
        "_diffusers_version": "0.35.0",
        "feature_extractor": [None, None],
        "requires_safety_checker": False,
        "safety_checker": [None, None],
        "scheduler": ["diffusers", "DDIMScheduler"],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
    }
    (directory / "model_index.json").write_text(json.dumps(index, indent=2), encoding="utf-8")


def resolve_dtype(name: str | torch.dtype) -> torch.dtype:
    """`"float16"`, `"bf16"`, `torch.float32`, … → a torch dtype; raises on anything else."""
    if isinstance(name, torch.dtype):
        return name
    aliases = {
        "float32": torch.float32,
        "fp32": torch.float32,
        "float16": torch.float16,
        "fp16": torch.float16,
        "half": torch.float16,
        "bfloat16": torch.bfloat16,
        "bf16": torch.bfloat16,
    }
    if name not in aliases:
        raise ValueError(f"unknown dtype {name!r}; use one of {sorted(aliases)}")
    return aliases[name]


def load_diffusion_model(
    spec: str,
    *,
    device: str | torch.device = "cpu",
    dtype: str | torch.dtype = torch.float32,
    cache_dir: Path,
    acceleration: Acceleration | None = None,
) -> DiffusionModel:
    """Load a Stable Diffusion checkpoint (`tiny`, a local diffusers folder or a hub id).

    Every module is frozen (eval mode, no gradients) and placed on `device` in `dtype`;
    `acceleration` (default: none) is applied last.
    """
    source = (
        str(cached_build(cache_dir, TINY_CACHE_NAME, save_tiny_diffusion)) if spec == TINY else spec
    )
    torch_dtype = resolve_dtype(dtype)
    torch_device = torch.device(device)
    unet = UNet2DConditionModel.from_pretrained(source, subfolder="unet", torch_dtype=torch_dtype)
    vae = AutoencoderKL.from_pretrained(source, subfolder="vae", torch_dtype=torch_dtype)
    text_encoder = CLIPTextModel.from_pretrained(
        source, subfolder="text_encoder", torch_dtype=torch_dtype
    )
    tokenizer = CLIPTokenizer.from_pretrained(source, subfolder="tokenizer")
    # NOTE: whatever scheduler the checkpoint ships (PNDM for SD 1.5), sampling uses DDIM with
    # the checkpoint's noise schedule: deterministic, and the reference's sampler.
    scheduler = DDIMScheduler.from_pretrained(source, subfolder="scheduler")
    for module in (unet, vae, text_encoder):
        module.requires_grad_(False)
        module.eval()
        module.to(torch_device)  # type: ignore[arg-type]
    model = DiffusionModel(
        unet=unet,
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        scheduler=scheduler,
        model_id=spec,
        device=torch_device,
        dtype=torch_dtype,
    )
    return prepare(model, acceleration or Acceleration())
