"""The GPU fast path: how a loaded diffusion model is prepared to run fast on its device.

Every switch is a setting (`aligndiff.settings.Settings`) and off by default, so on a CPU the
model runs as loaded: eager, float32, stock memory layout. The dtype is chosen at load time
(`load_diffusion_model`); this module does the rest:

- channels_last memory format for the UNet and VAE convolutions;
- the cross-attention capture mode ("sdpa": fused attention everywhere, see
  `aligndiff.attention`);
- `torch.compile` of the UNet (`dynamic=False`) behind batch-size buckets: a batch is padded up
  to the nearest bucket, so a handful of shapes compile once each;
- VAE slicing (decode one image at a time) and tiling (decode in overlapping tiles) for memory;
- the sampling batch size chosen from free device memory ("auto"), from a per-image memory
  figure measured once per model and resolution.
"""

from __future__ import annotations

import bisect
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import torch

from aligndiff.attention import (
    CAPTURE_MODES,
    AttentionCapture,
    CaptureMode,
    SharedCapture,
    capturing_cross_attention,
    install_shared_capture,
)

if TYPE_CHECKING:
    from aligndiff.models.diffusion import DiffusionModel
    from aligndiff.settings import Settings

DEFAULT_BUCKETS = (1, 2, 4, 8, 16, 32)
BatchSizeSetting = int | Literal["auto"] | None


@dataclass(frozen=True)
class Acceleration:
    """How a diffusion model runs, beyond its device and dtype (see the module docstring)."""

    channels_last: bool = False
    capture_attention: CaptureMode = "sdpa"
    compile_unet: bool = False
    compile_buckets: tuple[int, ...] = DEFAULT_BUCKETS
    vae_slicing: bool = False
    vae_tiling: bool = False

    def __post_init__(self) -> None:
        if self.capture_attention not in CAPTURE_MODES:
            raise ValueError(f"capture_attention must be one of {CAPTURE_MODES}")
        if not self.compile_buckets or min(self.compile_buckets) < 1:
            raise ValueError("compile_buckets must be positive batch sizes")
        object.__setattr__(self, "compile_buckets", tuple(sorted(set(self.compile_buckets))))

    @classmethod
    def from_settings(cls, settings: Settings) -> Acceleration:
        return cls(
            channels_last=settings.channels_last,
            capture_attention=settings.capture_attention,
            compile_unet=settings.compile_unet,
            compile_buckets=tuple(settings.compile_buckets),
            vae_slicing=settings.vae_slicing,
            vae_tiling=settings.vae_tiling,
        )


# Batch-size buckets


def bucket_for(size: int, buckets: Sequence[int]) -> int:
    """The smallest bucket >= `size` (`buckets` sorted); beyond the largest, `size` itself
    (a shape that compiles on its own rather than an error)."""
    if size < 1:
        raise ValueError("a batch holds at least one item")
    index = bisect.bisect_left(buckets, size)
    return buckets[index] if index < len(buckets) else size


def pad_batch(tensor: torch.Tensor, size: int) -> torch.Tensor:
    """`tensor` with its last row repeated up to `size` rows (dim 0).

    Copies of a real row rather than zeros: they run the same arithmetic as real rows, so
    padding cannot produce infinities or NaNs that would show up in a profiler or a check.
    """
    missing = size - tensor.shape[0]
    if missing < 0:
        raise ValueError(f"cannot pad a batch of {tensor.shape[0]} down to {size}")
    if missing == 0:
        return tensor
    return torch.cat([tensor, tensor[-1:].expand(missing, *tensor.shape[1:])])


class BucketedUNet:
    """A (compiled) UNet called like `DiffusionModel.denoise`: pads the batch up to its
    bucket, runs, and returns the real rows' noise prediction."""

    def __init__(
        self,
        unet: Callable[..., Any],
        buckets: Sequence[int],
        shared: SharedCapture | None = None,
    ) -> None:
        self.unet = unet
        self.buckets = tuple(sorted(buckets))
        self.shared = shared
        self.sizes_run: set[int] = set()  # the padded batch sizes seen (one compile each)

    def __call__(
        self, sample: torch.Tensor, timestep: torch.Tensor | float, states: torch.Tensor
    ) -> torch.Tensor:
        rows = sample.shape[0]
        size = bucket_for(rows, self.buckets)
        if isinstance(timestep, torch.Tensor) and timestep.ndim == 1 and len(timestep) == rows:
            timestep = pad_batch(timestep, size)
        self.sizes_run.add(size)
        if self.shared is not None:
            self.shared.begin(size, sample.device)
        try:
            noise = self.unet(
                pad_batch(sample, size),
                timestep,
                encoder_hidden_states=pad_batch(states, size),
                return_dict=False,
            )[0]
            if self.shared is not None:
                self.shared.end()
        finally:
            if self.shared is not None:
                self.shared.masses.clear()
                self.shared.weights = None
        return noise[:rows]


def prepare(model: DiffusionModel, acceleration: Acceleration) -> DiffusionModel:
    """Apply `acceleration` to a loaded model (in place) and record it on the model."""
    if acceleration.channels_last:
        # Convolutions pick their output layout from their weights': channels_last weights
        # keep every activation channels_last, the layout tensor cores read without transposes.
        model.unet.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
        model.vae.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
    if acceleration.vae_slicing:
        model.vae.enable_slicing()
    if acceleration.vae_tiling:
        model.vae.enable_tiling()
    if acceleration.compile_unet:
        # NOTE: swapping attention processors would invalidate the compiled code, so the UNet
        # gets capturing processors once and the running batch's capture is looked up.
        shared = install_shared_capture(model.unet, mode=acceleration.capture_attention)
        compiled = torch.compile(model.unet, dynamic=False)
        model.runner = BucketedUNet(compiled, acceleration.compile_buckets, shared)
    model.acceleration = acceleration
    return model


# Batch size from free memory


def auto_batch_size(
    free_bytes: int,
    image_bytes: int,
    *,
    fraction: float,
    maximum: int,
    allowed: Collection[int] | None = None,
) -> int:
    """The largest batch whose images fit in `fraction` of `free_bytes` at `image_bytes` each,
    at most `maximum`, and among `allowed` sizes when given; at least 1 (or the smallest
    allowed), since a worker that cannot fit one image still has to try one."""
    if image_bytes <= 0:
        raise ValueError("image_bytes must be positive")
    fits = max(1, min(maximum, int(free_bytes * fraction // image_bytes)))
    if allowed:
        candidates = sorted(size for size in allowed if size >= 1)
        below = [size for size in candidates if size <= fits]
        return below[-1] if below else candidates[0]
    return fits


def sampling_sizes(acceleration: Acceleration, *, guided: bool) -> list[int] | None:
    """Sampling batch sizes whose UNet batch (doubled under CFG) is a compiled bucket."""
    if not acceleration.compile_unet:
        return None
    factor = 2 if guided else 1
    return [b // factor for b in acceleration.compile_buckets if b % factor == 0]


def free_device_bytes(device: torch.device) -> int:
    """Memory a new batch can use: the device's free memory plus what torch's caching
    allocator holds without using (mem_get_info counts that as taken)."""
    free, _total = torch.cuda.mem_get_info(device)
    cached = torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    return int(free + cached)


def measure_image_bytes(model: DiffusionModel, resolution: int, *, guided: bool = True) -> int:
    """Device memory one more image in a sampling batch takes (CUDA): the larger of the
    UNet step's (with capture) and the VAE decode's peak growth from 1 to 2 images."""
    device = model.device
    latent = resolution // model.vae_scale_factor
    from aligndiff.conditioning import added_conditioning

    width = sum(model.embedding_widths)
    length = model.tokenizer.model_max_length
    factor = 2 if guided else 1
    mode = model.acceleration.capture_attention

    def peak(images: int) -> int:
        rows = factor * images
        latents = torch.zeros((rows, 4, latent, latent), device=device, dtype=model.dtype)
        states = torch.zeros((rows, length, width), device=device, dtype=model.dtype)
        pooled = None
        if model.text_encoder_2 is not None:  # SDXL: pooled text and size ids as well
            pooled_width = int(model.text_encoder_2.config.projection_dim or 0)
            pooled = torch.zeros((rows, pooled_width), device=device, dtype=model.dtype)
        added = added_conditioning(pooled, resolution=resolution, dtype=model.dtype)
        capture = AttentionCapture(
            torch.ones(images, length), conditional_offset=rows - images if guided else 0
        )
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        with torch.inference_mode(), capturing_cross_attention(model.unet, capture, mode=mode):
            model.denoise(latents, torch.tensor(500, device=device), states, added)
        unet = torch.cuda.max_memory_allocated(device) - base
        del latents, states, capture
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        with torch.inference_mode():
            model.vae.decode(
                torch.zeros((images, 4, latent, latent), device=device, dtype=model.vae.dtype)
            )
        vae = torch.cuda.max_memory_allocated(device) - base
        return max(unet, vae)

    return max(1, peak(2) - peak(1))


def resolve_batch_size(
    setting: BatchSizeSetting,
    *,
    configured: int,
    model: DiffusionModel,
    resolution: int,
    guided: bool = True,
    fraction: float = 0.85,
    maximum: int = 64,
) -> int:
    """The sampling batch size: `configured` when unset, a given number, or for "auto" the
    largest that fits free device memory (CUDA; `configured` elsewhere).

    An auto size depends on the device and what else it holds, and a sample's bits depend on
    its batch size: workers that must agree bit for bit set a number instead.
    """
    if setting is None:
        return configured
    if setting != "auto":
        if int(setting) < 1:
            raise ValueError("batch_size must be at least 1")
        return int(setting)
    if model.device.type != "cuda":
        return configured
    key = (resolution, guided)
    if key not in model.image_bytes:
        model.image_bytes[key] = measure_image_bytes(model, resolution, guided=guided)
    return auto_batch_size(
        free_device_bytes(model.device),
        model.image_bytes[key],
        fraction=fraction,
        maximum=maximum,
        allowed=sampling_sizes(model.acceleration, guided=guided),
    )
