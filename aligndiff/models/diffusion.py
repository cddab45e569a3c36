"""Stable Diffusion components: real weights by local path or hub id, or a tiny random SD.

Two pipeline families are run (`aligndiff.models.family`): "sd" (1.x, and 2.x with its
v-prediction) and "sdxl" (two text encoders, pooled text and size conditioning). Every model
goes through one loading path (`from_pretrained` on a diffusers-layout folder or hub id): the
tiny ones (`tiny`, `tiny-sd2`, `tiny-sdxl`) are built once from config, saved in that layout
under the model cache, then loaded like any other checkpoint.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
from transformers import (
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTextModelWithProjection,
    CLIPTokenizer,
)

from aligndiff.acceleration import Acceleration, prepare
from aligndiff.models.cache import cached_build
from aligndiff.models.family import ModelFamily, model_family
from aligndiff.models.tokenizer import BOS, CONTEXT_LENGTH, EOS, write_tiny_tokenizer
from aligndiff.settings import TINY

TINY_CACHE_NAME = "tiny-sd-v1"
TINY_SD2 = "tiny-sd2"
TINY_SDXL = "tiny-sdxl"
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
# Stable Diffusion 2.x (768-v): the same schedule, the UNet predicts the velocity.
SD2_SCHEDULER_CONFIG = {**SD_SCHEDULER_CONFIG, "prediction_type": "v_prediction"}


@dataclass
class DiffusionModel:
    """The frozen parts of a Stable Diffusion checkpoint, on one device and dtype.

    SDXL models (`family` "sdxl") also have a second text encoder and tokenizer (OpenCLIP
    bigG, with a projection); their UNet takes pooled text and size conditioning as well.
    """

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
    family: ModelFamily = "sd"
    text_encoder_2: CLIPTextModelWithProjection | None = None
    tokenizer_2: CLIPTokenizer | None = None

    def denoise(
        self,
        sample: torch.Tensor,
        timestep: torch.Tensor | float,
        states: torch.Tensor,
        added_cond: dict[str, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """The UNet's prediction (noise, or velocity for v-prediction models) for `sample` at
        `timestep` given text `states` (and, for SDXL, `added_cond`: pooled text and time ids)."""
        if added_cond is not None:
            # NOTE: the compiled, bucketed runner is built for SD's signature; SDXL's extra
            # conditioning goes to the UNet itself.
            return self.unet(
                sample, timestep, encoder_hidden_states=states, added_cond_kwargs=added_cond
            ).sample
        if self.runner is not None:
            return self.runner(sample, timestep, states)
        return self.unet(sample, timestep, encoder_hidden_states=states).sample

    @property
    def text_encoders(self) -> list[CLIPTextModel]:
        """The text encoders, in the order their states are concatenated."""
        encoders: list[CLIPTextModel] = [self.text_encoder]
        if self.text_encoder_2 is not None:
            encoders.append(self.text_encoder_2)  # type: ignore[arg-type]
        return encoders

    @property
    def tokenizers(self) -> list[CLIPTokenizer]:
        """The tokenizers, one per text encoder."""
        tokenizers = [self.tokenizer]
        if self.tokenizer_2 is not None:
            tokenizers.append(self.tokenizer_2)
        return tokenizers

    @property
    def embedding_widths(self) -> list[int]:
        """Token-embedding width per text encoder: a learned token is one vector per encoder,
        concatenated in this order ([768] for SD 1.5, [768, 1280] for SDXL)."""
        return [int(encoder.config.hidden_size) for encoder in self.text_encoders]

    @property
    def vae_scale_factor(self) -> int:
        return int(2 ** (len(self.vae.config.block_out_channels) - 1))

    @property
    def default_resolution(self) -> int:
        """The resolution the UNet was trained at (512 for SD 1.5, 128 for tiny)."""
        return int(self.unet.config.sample_size) * self.vae_scale_factor


def tiny_unet(**overrides: Any) -> UNet2DConditionModel:
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
        **overrides,
    )


def tiny_sdxl_unet(*, cross_attention_dim: int, pooled_dim: int) -> UNet2DConditionModel:
    """SDXL-shaped UNet: no attention at the finest level, cross-attention at the next two
    (64 and 32 latent positions a side at 1024 px) plus the mid block, and "text_time" added
    conditioning (pooled text + six size ids)."""
    time_embed_dim = 8
    return UNet2DConditionModel(
        sample_size=16,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        block_out_channels=(32, 32, 64),
        layers_per_block=1,
        cross_attention_dim=cross_attention_dim,
        attention_head_dim=2,
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=time_embed_dim,
        projection_class_embeddings_input_dim=6 * time_embed_dim + pooled_dim,
        norm_num_groups=32,
    )


def tiny_vae(**overrides: Any) -> AutoencoderKL:
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
        **{"sample_size": 128, "scaling_factor": 0.18215, **overrides},
    )


def tiny_text_config(tokenizer: CLIPTokenizer, **overrides: Any) -> CLIPTextConfig:
    bos, eos = (int(tokenizer.convert_tokens_to_ids(t)) for t in (BOS, EOS))  # type: ignore[arg-type]
    settings: dict[str, Any] = {
        "vocab_size": len(tokenizer),
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "max_position_embeddings": CONTEXT_LENGTH,
        "projection_dim": 64,
        "bos_token_id": bos,
        "eos_token_id": eos,
        "pad_token_id": eos,
    }
    return CLIPTextConfig(**{**settings, **overrides})


def tiny_text_encoder(tokenizer: CLIPTokenizer, **overrides: Any) -> CLIPTextModel:
    return CLIPTextModel(tiny_text_config(tokenizer, **overrides))


def save_tiny_diffusion(directory: Path) -> None:
    """Build the tiny random SD (deterministically) and save it in the diffusers layout."""
    _save_tiny_sd(directory, v_prediction=False)


def save_tiny_sd2(directory: Path) -> None:
    """The tiny random SD 2.x-style model: v-prediction, linear attention projections and an
    OpenCLIP-style (GELU) text encoder, saved in the diffusers layout."""
    _save_tiny_sd(directory, v_prediction=True)


def _save_tiny_sd(directory: Path, *, v_prediction: bool) -> None:
    write_tiny_tokenizer(directory / "tokenizer")
    tokenizer = CLIPTokenizer.from_pretrained(str(directory / "tokenizer"))
    unet_options: dict[str, Any] = {"use_linear_projection": True} if v_prediction else {}
    text_options: dict[str, Any] = {"hidden_act": "gelu"} if v_prediction else {}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(TINY_SEED)
        parts: dict[str, Any] = {
            "unet": tiny_unet(**unet_options),
            "vae": tiny_vae(),
            "text_encoder": tiny_text_encoder(tokenizer, **text_options),
        }
    for name, part in parts.items():
        part.save_pretrained(str(directory / name))
    scheduler_config = SD2_SCHEDULER_CONFIG if v_prediction else SD_SCHEDULER_CONFIG
    DDIMScheduler(**scheduler_config).save_pretrained(str(directory / "scheduler"))
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


def save_tiny_sdxl(directory: Path) -> None:
    """Build the tiny random SDXL (deterministically) and save it in the diffusers layout: two
    CLIP text encoders (the second with a projection, its tokenizer padding with "!"), a
    "text_time" UNet, a VAE that asks for float32 decoding, and DDIM (deterministic sampling)."""
    write_tiny_tokenizer(directory / "tokenizer")
    write_tiny_tokenizer(directory / "tokenizer_2", pad_token="!")
    tokenizer = CLIPTokenizer.from_pretrained(str(directory / "tokenizer"))
    tokenizer_2 = CLIPTokenizer.from_pretrained(str(directory / "tokenizer_2"))
    pad_2 = int(tokenizer_2.pad_token_id)  # type: ignore[arg-type]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(TINY_SEED)
        text_encoder = tiny_text_encoder(tokenizer, hidden_size=32, intermediate_size=64)
        text_encoder_2 = CLIPTextModelWithProjection(
            tiny_text_config(tokenizer_2, hidden_act="gelu", pad_token_id=pad_2)
        )
        parts: dict[str, Any] = {
            "unet": tiny_sdxl_unet(
                cross_attention_dim=32 + 64,
                pooled_dim=int(text_encoder_2.config.projection_dim or 0),
            ),
            "vae": tiny_vae(force_upcast=True, scaling_factor=0.13025),
            "text_encoder": text_encoder,
            "text_encoder_2": text_encoder_2,
        }
    for name, part in parts.items():
        part.save_pretrained(str(directory / name))
    DDIMScheduler(**SD_SCHEDULER_CONFIG).save_pretrained(str(directory / "scheduler"))
    index = {
        "_class_name": "StableDiffusionXLPipeline",
        "_diffusers_version": "0.35.0",
        "feature_extractor": [None, None],
        "force_zeros_for_empty_prompt": True,
        "image_encoder": [None, None],
        "scheduler": ["diffusers", "DDIMScheduler"],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "tokenizer_2": ["transformers", "CLIPTokenizer"],
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
    }
    (directory / "model_index.json").write_text(json.dumps(index, indent=2), encoding="utf-8")


# The tiny models by name: (cache folder, builder).
TINY_BUILDS: dict[str, tuple[str, Callable[[Path], None]]] = {
    TINY: (TINY_CACHE_NAME, save_tiny_diffusion),
    TINY_SD2: ("tiny-sd2-v1", save_tiny_sd2),
    TINY_SDXL: ("tiny-sdxl-v1", save_tiny_sdxl),
}


def resolve_device(name: str | torch.device) -> torch.device:
    """`"cpu"`, `"cuda"`, `"cuda:1"`, … → a torch device this process can use; ValueError
    saying why not for one it cannot (PyTorch would fail later, deep in a model's `.to`)."""
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError) as error:
        raise ValueError(f"unknown device {name!r}: {error}") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            why = (
                "no CUDA GPU is visible"
                if torch.version.cuda
                else f"this PyTorch ({torch.__version__}) is built without CUDA"
            )
            raise ValueError(f"device {str(name)!r} is not available: {why}")
        count = torch.cuda.device_count()
        if device.index is not None and device.index >= count:
            raise ValueError(f"device {str(name)!r} is not available: {count} CUDA GPU(s) visible")
    elif device.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"device {str(name)!r} is not available on this machine")
    return device


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
    """Load a Stable Diffusion or SDXL checkpoint (`tiny`, `tiny-sd2`, `tiny-sdxl`, a local
    diffusers folder or a hub id).

    Every module is frozen (eval mode, no gradients) and placed on `device` in `dtype` (an SDXL
    VAE whose config asks for `force_upcast` stays float32); `acceleration` (default: none) is
    applied last. Raises `aligndiff.models.family.UnsupportedModelError` (a ValueError) for a
    pipeline family other than SD and SDXL, naming it and the supported ones.
    """
    if spec in TINY_BUILDS:
        name, build = TINY_BUILDS[spec]
        source = str(cached_build(cache_dir, name, build))
    else:
        source = spec
    family = model_family(source)
    torch_dtype = resolve_dtype(dtype)
    torch_device = torch.device(device)
    unet = UNet2DConditionModel.from_pretrained(source, subfolder="unet", torch_dtype=torch_dtype)
    vae_dtype = torch_dtype
    if family == "sdxl" and AutoencoderKL.load_config(source, subfolder="vae").get(
        "force_upcast", False
    ):
        # NOTE: SDXL's VAE overflows in float16; its pipeline decodes in float32, and so do we.
        vae_dtype = torch.float32
    vae = AutoencoderKL.from_pretrained(source, subfolder="vae", torch_dtype=vae_dtype)
    text_encoder = CLIPTextModel.from_pretrained(
        source, subfolder="text_encoder", torch_dtype=torch_dtype
    )
    tokenizer = CLIPTokenizer.from_pretrained(source, subfolder="tokenizer")
    text_encoder_2 = tokenizer_2 = None
    if family == "sdxl":
        text_encoder_2 = CLIPTextModelWithProjection.from_pretrained(
            source, subfolder="text_encoder_2", torch_dtype=torch_dtype
        )
        tokenizer_2 = CLIPTokenizer.from_pretrained(source, subfolder="tokenizer_2")
    # NOTE: whatever scheduler the checkpoint ships (PNDM for SD 1.5), sampling uses DDIM with
    # the checkpoint's noise schedule: deterministic, and the reference's sampler.
    scheduler = DDIMScheduler.from_pretrained(source, subfolder="scheduler")
    modules: list[torch.nn.Module] = [unet, vae, text_encoder]
    if text_encoder_2 is not None:
        modules.append(text_encoder_2)
    for module in modules:
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
        family=family,
        text_encoder_2=text_encoder_2,
        tokenizer_2=tokenizer_2,
    )
    return prepare(model, acceleration or Acceleration())
