"""Sampling: batched Stable Diffusion generation with coarse masks from cross-attention."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
import torch
from diffusers import DDIMScheduler

from aligndiff.attention import AttentionCapture, capturing_cross_attention, finest_positions
from aligndiff.conditioning import (
    added_conditioning,
    encode_for_model,
    tokenize_for_model,
    unconditional_for_model,
)
from aligndiff.models.diffusion import DiffusionModel
from aligndiff.prompts import SampleSpec

Progress = Callable[[int, int], None]


@dataclass(frozen=True)
class SamplingConfig:
    """How samples are drawn. The defaults are the reference's (SD 1.5, 512 px)."""

    num_steps: int = 50
    guidance_scale: float = 7.5
    batch_size: int = 4
    resolution: int | None = None  # None: the model's native resolution
    mask_resolutions: int = 3

    def __post_init__(self) -> None:
        if self.num_steps < 1:
            raise ValueError("num_steps must be at least 1")
        if self.batch_size < 1:
            raise ValueError("batch_size must be at least 1")
        if self.guidance_scale < 1:
            raise ValueError("guidance_scale must be >= 1")
        if self.resolution is not None and (self.resolution < 64 or self.resolution % 64):
            raise ValueError("resolution must be a positive multiple of 64")

    @classmethod
    def tiny(cls) -> SamplingConfig:
        """Scaled-down defaults for the tiny random model: exercise every path in seconds."""
        return cls(num_steps=5, batch_size=4)

    @classmethod
    def sdxl(cls) -> SamplingConfig:
        """SDXL's defaults: its pipeline's CFG 5.0 (the native 1024 px comes from the model)."""
        return cls(guidance_scale=5.0)


@dataclass(frozen=True)
class GeneratedSample:
    spec: SampleSpec
    image: npt.NDArray[np.uint8]  # (H, W, 3)
    coarse_mask: npt.NDArray[np.float32]  # (H, W) in [0, 1]


def initial_noise(seed: int, shape: tuple[int, ...]) -> torch.Tensor:
    """A sample's starting latent, drawn on the CPU so every device starts from the same noise."""
    generator = torch.Generator(device="cpu").manual_seed(seed)
    return torch.randn(shape, generator=generator, dtype=torch.float32)


class Sampler:
    """Draws samples of one class: images plus coarse cross-attention masks.

    Text states are computed once per distinct prompt; the unconditional state once.
    """

    def __init__(
        self,
        model: DiffusionModel,
        *,
        class_name: str,
        token_embedding: torch.Tensor | None,
        config: SamplingConfig,
    ) -> None:
        self.model = model
        self.class_name = class_name
        self.token_embedding = token_embedding
        self.config = config
        self.resolution = config.resolution or model.default_resolution
        self._text_states: dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]] = {}
        with torch.inference_mode():
            self._uncond, self._uncond_pooled = unconditional_for_model(model)

    def _prompt_state(self, prompt: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """(text states (77, D), name-token weights (77,), SDXL's pooled text (P,) or None) of
        one prompt, memoized."""
        if prompt not in self._text_states:
            tokens = tokenize_for_model(self.model, [prompt], self.class_name)
            embedding = self.token_embedding
            if embedding is not None:
                embedding = embedding.to(self.model.device, self.model.dtype)
            states, pooled = encode_for_model(self.model, tokens, embedding)
            self._text_states[prompt] = (
                states[0],
                tokens[0].name_mask[0].float(),
                None if pooled is None else pooled[0],
            )
        return self._text_states[prompt]

    @torch.inference_mode()
    def generate(
        self,
        specs: Sequence[SampleSpec],
        *,
        progress: Progress | None = None,
        should_stop: Callable[[], bool] | None = None,
    ) -> Iterator[GeneratedSample]:
        """Yield samples in order, `config.batch_size` at a time.

        Sample i depends only on its spec (prompt and seed) and the configured batch size, not
        on which samples share its batch or where it sits in it, so it can be regenerated alone
        bit for bit. `should_stop` is checked between batches (cooperative cancel).
        """
        done = 0
        size = self.config.batch_size
        for start in range(0, len(specs), size):
            if should_stop is not None and should_stop():
                return
            batch = list(specs[start : start + size])
            # NOTE: CPU BLAS picks kernels by matrix size (a batch of one takes a GEMV path
            # that sums in another order), so a short batch is padded to full size with
            # copies of its last spec, whose results are dropped: every sample is computed
            # in a batch of the same size, which makes its bits independent of its neighbours.
            padded = batch + [batch[-1]] * (size - len(batch))
            yield from self._generate_batch(padded)[: len(batch)]
            done += len(batch)
            if progress is not None:
                progress(done, len(specs))

    def _generate_batch(self, specs: Sequence[SampleSpec]) -> list[GeneratedSample]:
        model, config = self.model, self.config
        size = self.resolution
        latent_size = (size // model.vae_scale_factor, size // model.vae_scale_factor)
        shape = (1, model.unet.config.in_channels, *latent_size)
        # A fresh scheduler per batch: set_timesteps/step keep per-run state.
        scheduler = DDIMScheduler.from_config(model.scheduler.config)
        scheduler.set_timesteps(config.num_steps, device=model.device)

        # NOTE: the latents and the scheduler's arithmetic stay float32 whatever the model's
        # dtype: 50 DDIM updates in float16 would round the image away; only the UNet and VAE
        # run in the model's dtype.
        latents = torch.cat([initial_noise(spec.seed, shape) for spec in specs])
        latents = latents.to(model.device) * scheduler.init_noise_sigma
        states = [self._prompt_state(spec.prompt) for spec in specs]
        cond = torch.stack([s for s, _, _ in states])
        name_weights = torch.stack([w for _, w, _ in states])
        batch = len(specs)
        guided = config.guidance_scale > 1.0
        text = torch.cat([self._uncond.expand(batch, -1, -1), cond]) if guided else cond
        pooled = None
        if self._uncond_pooled is not None:
            pooled = torch.stack([p for _, _, p in states if p is not None])
            if guided:
                pooled = torch.cat([self._uncond_pooled.expand(batch, -1), pooled])
        added = added_conditioning(pooled, resolution=size, dtype=model.dtype)
        mode = model.acceleration.capture_attention
        capture = AttentionCapture(
            name_weights,
            conditional_offset=batch if guided else 0,
            # Only the maps `coarse_masks` reads are captured.
            positions=finest_positions(model.unet, latent_size, config.mask_resolutions),
        )

        with capturing_cross_attention(model.unet, capture, mode=mode):
            for t in scheduler.timesteps:
                unet_in = torch.cat([latents, latents]) if guided else latents
                unet_in = scheduler.scale_model_input(unet_in, t).to(model.dtype)
                noise = model.denoise(unet_in, t, text, added).float()
                if guided:
                    uncond_noise, cond_noise = noise.chunk(2)
                    noise = uncond_noise + config.guidance_scale * (cond_noise - uncond_noise)
                latents = scheduler.step(noise, t, latents).prev_sample

        # An SDXL VAE that asks for `force_upcast` was loaded in float32: decode in its dtype.
        scaled = (latents / model.vae.config.scaling_factor).to(model.vae.dtype)
        decoded = model.vae.decode(scaled).sample
        pixels = ((decoded.float() / 2 + 0.5).clamp(0, 1) * 255).round().to(torch.uint8)
        images = pixels.permute(0, 2, 3, 1).cpu().numpy()
        masks = capture.coarse_masks(
            height=size, width=size, latent_size=latent_size, resolutions=config.mask_resolutions
        )
        masks_np = masks.cpu().numpy().astype(np.float32)
        return [
            GeneratedSample(spec=spec, image=images[i], coarse_mask=masks_np[i])
            for i, spec in enumerate(specs)
        ]
