"""Normalized masked textual inversion: learn one token embedding from a few image+mask shots.

The prompt is "a photo of a <tok> {name}" ("an" before a vowel sound, `aligndiff.names`), with
<tok> initialized from an adjective so the noun keeps the concept even when the object is small.
The loss averages the denoising error over foreground and background latent pixels separately
(that is the normalization) and weights the background by λ_bg. Images are fixed, so their VAE
latents are computed once per image and flip; only the new token vector is a parameter, so a
step is one text-encoder and one UNet pass.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import numpy.typing as npt
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from aligndiff.conditioning import added_conditioning, encode_for_model, tokenize_for_model
from aligndiff.masks import BoolMask
from aligndiff.models.diffusion import DiffusionModel
from aligndiff.names import PROMPT_STYLE, PromptStyle, inversion_prompt, inversion_token
from aligndiff.prompts import INITIALIZER_WORD

Progress = Callable[[int, int], None]


@dataclass(frozen=True)
class InversionConfig:
    """Inversion hyper-parameters. The defaults are the reference's."""

    steps: int = 500
    batch_size: int = 4
    gradient_accumulation: int = 2
    learning_rate: float = 5e-4
    weight_decay: float = 1e-2
    lambda_bg: float = 0.6
    mask_threshold: float = 0.3
    flip: bool = True
    resolution: int | None = None  # None: the model's native resolution
    seed: int = 0

    def __post_init__(self) -> None:
        if self.steps < 1 or self.batch_size < 1 or self.gradient_accumulation < 1:
            raise ValueError("steps, batch_size and gradient_accumulation must be >= 1")
        if self.lambda_bg < 0:
            raise ValueError("lambda_bg must be >= 0")
        if not 0 <= self.mask_threshold < 1:
            raise ValueError("mask_threshold must be in [0, 1)")

    @classmethod
    def tiny(cls) -> InversionConfig:
        """Scaled-down defaults for the tiny random model."""
        return cls(steps=20, batch_size=2, gradient_accumulation=1, learning_rate=5e-3)


@dataclass
class InversionResult:
    token: str
    # (D,) float32, on the CPU; SDXL: one vector per text encoder, concatenated (768 + 1280)
    embedding: torch.Tensor
    losses: list[float] = field(default_factory=list)  # one per optimizer step
    # Width per text encoder (`save_embedding`'s `widths`); empty: one encoder.
    widths: list[int] = field(default_factory=list)


def masked_diffusion_loss(
    prediction: torch.Tensor, target: torch.Tensor, foreground: torch.Tensor, lambda_bg: float
) -> torch.Tensor:
    """mean over images of [mean SE over fg pixels + λ_bg · mean SE over bg pixels].

    `prediction`/`target`: (B, C, h, w); `foreground`: (B, h, w) bool. The squared error is
    averaged over channels, then over each region on its own; an empty region adds 0.
    """
    error = (prediction.float() - target.float()).pow(2).mean(dim=1)
    fg = foreground.float()
    bg = 1.0 - fg
    fg_term = (error * fg).sum(dim=(1, 2)) / fg.sum(dim=(1, 2)).clamp_min(1.0)
    bg_term = (error * bg).sum(dim=(1, 2)) / bg.sum(dim=(1, 2)).clamp_min(1.0)
    return (fg_term + lambda_bg * bg_term).mean()


@dataclass
class InversionData:
    """Shots encoded once: VAE posterior parameters and latent-size masks, per image and flip."""

    latent_mean: torch.Tensor  # (N, 4, h, w)
    latent_std: torch.Tensor  # (N, 4, h, w)
    foreground: torch.Tensor  # (N, h, w) bool


def latent_masks(masks: torch.Tensor, size: tuple[int, int], threshold: float) -> torch.Tensor:
    """Masks (N, H, W) → latent-size foreground (N, h, w): nearest, then > threshold.

    An object so small that nearest sampling misses it falls back to "any foreground in the
    cell" (max pooling), so no shot loses its foreground term.
    """
    soft = masks.float()[:, None]
    nearest = F.interpolate(soft, size=size, mode="nearest")[:, 0] > threshold
    pooled = F.adaptive_max_pool2d(soft, size)[:, 0] > threshold
    empty = ~nearest.flatten(1).any(dim=1)
    return torch.where(empty[:, None, None], pooled, nearest)


@torch.no_grad()
def encode_shots(
    model: DiffusionModel,
    images: Sequence[npt.NDArray[np.uint8]],
    masks: Sequence[BoolMask],
    *,
    resolution: int,
    flip: bool,
    mask_threshold: float,
) -> InversionData:
    """Resize shots to the training resolution and VAE-encode them (and their flips) once."""
    pixels = (
        torch.stack(
            [
                torch.from_numpy(np.array(img, copy=True)).permute(2, 0, 1)
                for img in _resized(images, resolution)
            ]
        ).float()
        / 127.5
        - 1.0
    )
    mask_tensor = torch.stack(
        [torch.from_numpy(m.astype(np.float32)) for m in _resized_masks(masks, resolution)]
    )
    if flip:
        pixels = torch.cat([pixels, pixels.flip(-1)])
        mask_tensor = torch.cat([mask_tensor, mask_tensor.flip(-1)])
    posterior = model.vae.encode(pixels.to(model.device, model.vae.dtype)).latent_dist
    latent_size = tuple(posterior.mean.shape[-2:])
    return InversionData(
        latent_mean=posterior.mean.float(),
        latent_std=posterior.std.float(),
        foreground=latent_masks(mask_tensor, latent_size, mask_threshold).to(model.device),  # type: ignore[arg-type]
    )


def _resized(images: Sequence[npt.NDArray[np.uint8]], size: int) -> list[npt.NDArray[np.uint8]]:
    return [
        np.asarray(
            Image.fromarray(img).convert("RGB").resize((size, size), Image.Resampling.BICUBIC)
        )
        for img in images
    ]


def _resized_masks(masks: Sequence[BoolMask], size: int) -> list[BoolMask]:
    return [
        np.asarray(
            Image.fromarray(m.astype(np.uint8) * 255).resize((size, size), Image.Resampling.NEAREST)
        )
        >= 128
        for m in masks
    ]


class InversionObjective:
    """The loss of a candidate token vector on a batch of cached shots (differentiable)."""

    def __init__(
        self,
        model: DiffusionModel,
        data: InversionData,
        *,
        class_name: str,
        lambda_bg: float,
        prompt_style: PromptStyle = PROMPT_STYLE,
    ):
        self.model = model
        self.data = data
        self.lambda_bg = lambda_bg
        self.tokens = tokenize_for_model(
            model, [inversion_prompt(class_name, prompt_style)], class_name
        )
        self.resolution = int(data.latent_mean.shape[-1]) * model.vae_scale_factor
        self.prediction_type = model.scheduler.config.get("prediction_type", "epsilon")

    def loss(
        self,
        embedding: torch.Tensor,
        indices: torch.Tensor,
        noise: torch.Tensor,
        timesteps: torch.Tensor,
        latent_noise: torch.Tensor,
    ) -> torch.Tensor:
        """Loss for shots `indices` at `timesteps` with diffusion `noise` (all (B, …))."""
        model, data = self.model, self.data
        device = model.device
        indices = indices.to(device)
        latents = data.latent_mean[indices] + data.latent_std[indices] * latent_noise.to(device)
        latents = latents * model.vae.config.scaling_factor
        noise = noise.to(device)
        timesteps = timesteps.to(device)
        noisy = model.scheduler.add_noise(latents, noise, timesteps)
        states, pooled = encode_for_model(model, self.tokens, embedding.to(model.dtype))
        states = states.expand(len(indices), -1, -1)
        if pooled is not None:
            pooled = pooled.expand(len(indices), -1)
        added = added_conditioning(pooled, resolution=self.resolution, dtype=model.dtype)
        prediction = model.denoise(noisy.to(model.dtype), timesteps, states, added)
        if self.prediction_type == "v_prediction":
            target = model.scheduler.get_velocity(latents, noise, timesteps)
        else:
            target = noise
        return masked_diffusion_loss(prediction, target, data.foreground[indices], self.lambda_bg)


def initial_embedding(model: DiffusionModel) -> torch.Tensor:
    """The initializer word's input embedding (a copy), shape (D,); SDXL: its row in each text
    encoder (by each tokenizer's id), concatenated, so both vectors train jointly."""
    rows = []
    for tokenizer, encoder in zip(model.tokenizers, model.text_encoders, strict=True):
        (token_id,) = tokenizer(INITIALIZER_WORD, add_special_tokens=False).input_ids
        weight = encoder.get_input_embeddings().weight
        assert isinstance(weight, torch.Tensor)
        rows.append(weight[token_id].detach().float().clone())
    return rows[0] if len(rows) == 1 else torch.cat(rows)


class InversionRun:
    """One inversion that can be advanced in steps: `advance(until)` runs its steps up to
    `until`, and its state (token row, AdamW moments, the cosine schedule's position, the data
    RNG) carries on from there. Running to `config.steps` at once or in several calls gives the
    same embedding, which is how a trial of `bg_lambda=auto` goes on into the full inversion.

    `data` (the shots encoded once) may be shared by several runs on the same shots.
    """

    def __init__(
        self,
        model: DiffusionModel,
        data: InversionData,
        *,
        class_name: str,
        config: InversionConfig,
        prompt_style: PromptStyle = PROMPT_STYLE,
    ) -> None:
        self.model = model
        self.config = config
        self.data = data
        self.objective = InversionObjective(
            model,
            data,
            class_name=class_name,
            lambda_bg=config.lambda_bg,
            prompt_style=prompt_style,
        )
        # The trained row is a float32 master copy whatever the model's dtype: it is cast to the
        # model's dtype inside the loss, so AdamW's update (lr 5e-4 on entries near 0.01) does
        # not round away in float16 or bfloat16.
        self.embedding = torch.nn.Parameter(initial_embedding(model).to(model.device))
        self.optimizer = torch.optim.AdamW(
            [self.embedding], lr=config.learning_rate, weight_decay=config.weight_decay
        )
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda step: 0.5 * (1 + math.cos(math.pi * step / config.steps))
        )
        # float16 gradients of one row underflow to zero: scale the loss up (dynamically; a step
        # whose gradient overflowed is skipped). bfloat16 has float32's range and needs none.
        self.scaler = torch.amp.GradScaler(model.device.type, enabled=model.dtype == torch.float16)
        self.generator = torch.Generator(device="cpu").manual_seed(config.seed)
        self.step = 0
        self.result = InversionResult(
            token=inversion_token(class_name), embedding=self.embedding.detach()
        )

    def advance(
        self,
        until: int,
        *,
        progress: Callable[[int], None] | None = None,
        should_stop: Callable[[], bool] | None = None,
    ) -> bool:
        """Run the steps up to `until` (at most `config.steps`); `progress(step)` after each.
        False when `should_stop` stopped it first."""
        config, objective, data = self.config, self.objective, self.data
        num_train_timesteps = self.model.scheduler.config.num_train_timesteps
        shape = tuple(data.latent_mean.shape[1:])
        while self.step < min(until, config.steps):
            if should_stop is not None and should_stop():
                return False
            self.optimizer.zero_grad(set_to_none=True)
            total = 0.0
            for _ in range(config.gradient_accumulation):
                # Indices span images and their flips: image and mask are flipped together.
                indices = torch.randint(
                    0, len(data.latent_mean), (config.batch_size,), generator=self.generator
                )
                noise = torch.randn((config.batch_size, *shape), generator=self.generator)
                latent_noise = torch.randn((config.batch_size, *shape), generator=self.generator)
                timesteps = torch.randint(
                    0, num_train_timesteps, (config.batch_size,), generator=self.generator
                )
                loss = objective.loss(self.embedding, indices, noise, timesteps, latent_noise)
                self.scaler.scale(loss / config.gradient_accumulation).backward()
                total += loss.item() / config.gradient_accumulation
            self.scaler.step(self.optimizer)
            self.scaler.update()
            self.scheduler.step()
            self.result.losses.append(total)
            self.step += 1
            if progress is not None:
                progress(self.step)
        return True

    def current(self) -> InversionResult:
        """The token and a CPU copy of its embedding as trained so far."""
        return InversionResult(
            token=self.result.token,
            embedding=self.embedding.detach().float().cpu().clone(),
            losses=list(self.result.losses),
            widths=self.model.embedding_widths if self.model.family == "sdxl" else [],
        )


def check_shots(images: Sequence[npt.NDArray[np.uint8]], masks: Sequence[BoolMask]) -> None:
    """Raise ValueError on shots inversion cannot use: none, unpaired, a mask of another size
    than its image, or one without foreground."""
    if not images:
        raise ValueError("at least one shot is needed")
    if len(images) != len(masks):
        raise ValueError(f"{len(images)} images but {len(masks)} masks")
    for i, (image, mask) in enumerate(zip(images, masks, strict=True)):
        if image.shape[:2] != mask.shape:
            raise ValueError(f"shot {i}: mask {mask.shape} does not match image {image.shape[:2]}")
        if not mask.any():
            raise ValueError(f"shot {i}: the mask has no foreground pixel")


def encode_for(
    model: DiffusionModel,
    images: Sequence[npt.NDArray[np.uint8]],
    masks: Sequence[BoolMask],
    config: InversionConfig,
) -> InversionData:
    """The shots encoded as `config` trains on them (resolution, flips, mask threshold)."""
    check_shots(images, masks)
    return encode_shots(
        model,
        images,
        masks,
        resolution=config.resolution or model.default_resolution,
        flip=config.flip,
        mask_threshold=config.mask_threshold,
    )


def invert(
    model: DiffusionModel,
    images: Sequence[npt.NDArray[np.uint8]],
    masks: Sequence[BoolMask],
    *,
    class_name: str,
    config: InversionConfig,
    prompt_style: PromptStyle = PROMPT_STYLE,
    progress: Progress | None = None,
    should_stop: Callable[[], bool] | None = None,
) -> InversionResult:
    """Learn the class token from shots (RGB uint8 images and boolean masks, paired).

    Raises ValueError on unusable input (no shots, unpaired lists, a mask without foreground)
    before any work is done. Nothing of `model` is modified.
    """
    data = encode_for(model, images, masks, config)
    run = InversionRun(model, data, class_name=class_name, config=config, prompt_style=prompt_style)
    run.advance(
        config.steps,
        progress=None if progress is None else (lambda step: progress(step, config.steps)),
        should_stop=should_stop,
    )
    return run.current()


# SDXL's community embedding format: one (1, D) tensor per text encoder under these keys.
SDXL_EMBEDDING_KEYS = ("clip_l", "clip_g")


def save_embedding(
    path: Path, token: str, embedding: torch.Tensor, *, widths: Sequence[int] = ()
) -> None:
    """Write the learned token as safetensors that diffusers' `load_textual_inversion` reads.

    SD (`widths` empty or one width): `{token: (1, D)}`. SDXL (`widths` of its two encoders,
    `DiffusionModel.embedding_widths`): `{"clip_l": (1, 768), "clip_g": (1, 1280)}`, loaded with
    one `load_textual_inversion` call per encoder; the token is kept in the file's metadata.
    """
    vector = embedding.detach().float().cpu().reshape(-1)
    if len(widths) < 2:
        save_file({token: vector.reshape(1, -1).contiguous()}, str(path))
        return
    if len(widths) != len(SDXL_EMBEDDING_KEYS) or sum(widths) != len(vector):
        raise ValueError(f"a {len(vector)}-wide embedding does not split into widths {widths}")
    parts = vector.split(list(widths))
    state = {
        key: part.reshape(1, -1).contiguous()
        for key, part in zip(SDXL_EMBEDDING_KEYS, parts, strict=True)
    }
    save_file(state, str(path), metadata={"token": token})


def load_embedding(path: Path) -> tuple[str, torch.Tensor]:
    """Read an embedding written by `save_embedding`: (token, (D,) tensor); for the SDXL
    format the two vectors concatenated (clip_l, then clip_g), as inversion learns them."""
    state = load_file(str(path))
    if set(state) == set(SDXL_EMBEDDING_KEYS):
        with safe_open(str(path), framework="pt") as handle:
            token = (handle.metadata() or {}).get("token")
        if not token:
            raise ValueError(f"{path} is an SDXL embedding without its token in the metadata")
        return token, torch.cat([state[key].reshape(-1) for key in SDXL_EMBEDDING_KEYS])
    if len(state) != 1:
        raise ValueError(f"{path} holds {len(state)} tensors; expected one learned token")
    ((token, tensor),) = state.items()
    return token, tensor.reshape(-1)
