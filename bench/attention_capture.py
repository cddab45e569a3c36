"""Cross-attention capture: its overhead, and batched capture vs store-everything per image.

(a) Overhead: one batch through the same denoising loop (same prompts, seeds, steps, batch)
    with stock processors everywhere (`AttnProcessor2_0`, no capture) and with aligndiff's
    capturing cross-attention (plus the coarse masks it yields). Target: <= 1.05x. The capture
    state's bytes are measured at two step counts: they must not grow.
(b) Throughput: `Sampler.generate` (batched, capture) vs one image per call with a baseline
    that keeps every attention map of every step, self and cross, in a list (prompt-to-prompt's
    `AttentionStore`, which the reference code builds on; like it, maps of more than 32x32
    query positions are left out, which at 128 px leaves none). Target: >= 5x images/s at SD
    scale.
    One image per call with stock attention is timed too, to split that ratio into what
    batching gives and what storing costs.

Run: `python -m bench.attention_capture` (tiny, CPU), or on a GPU
`python -m bench.attention_capture --full --device cuda --dtype float16 --steps 50 --repeats 5`
(a round generates 5 x 8 images at 50 steps; the default 15 rounds would outlast 10 minutes).
"""

from __future__ import annotations

import argparse
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from diffusers import DDIMScheduler, UNet2DConditionModel
from diffusers.models.attention_processor import Attention, AttnProcessor2_0

from aligndiff.attention import (
    AttentionCapture,
    CapturingCrossAttnProcessor,
    capturing_cross_attention,
)
from aligndiff.conditioning import encode_prompts
from aligndiff.inversion import initial_embedding
from aligndiff.models.diffusion import DiffusionModel
from aligndiff.prompts import SampleSpec, prompt_bank, tokenize_prompts
from aligndiff.sampling import GeneratedSample, Sampler, SamplingConfig, initial_noise
from bench.common import (
    CLASS_NAME,
    Ratio,
    benchmark_parser,
    cuda_peak_memory,
    format_bytes,
    format_seconds,
    held_bytes,
    load_model,
    markdown_table,
    median,
    report,
    run_interleaved,
    setup_label,
    timed,
    verdict,
)

GUIDANCE_SCALE = 7.5
# prompt-to-prompt stores only maps with at most 32x32 query positions ("avoid memory
# overhead"); at 512 px that leaves out the 64x64 self-attention maps, which alone would be
# ~2.7 GB per step in float16. The tiny model's maps are all below the cap.
P2P_MAX_POSITIONS = 32**2
TINY_CAVEAT = (
    "Tiny models on a CPU understate both factors. Batching: the CPU is nearly as busy with "
    "one image (a CFG pair) as with eight, whereas a GPU is far from saturated by a batch of "
    "two. Storing: at 128 px the largest map has 256 x 256 entries, so computing every map "
    "explicitly and keeping it costs little; at 512 px the kept 32x32 self-attention maps "
    "alone are ~190 MB per step in float16 (~10 GB per image over 50 steps, as slices that "
    "keep both CFG halves alive), computed without a fused kernel."
)


class AttentionStore(AttentionCapture):
    """A capture that keeps every attention map of every layer call instead of summing.

    Maps are kept as prompt-to-prompt keeps them: the conditional rows of each layer's
    probabilities, as slices, which keep the whole result (both CFG halves) alive. The coarse
    masks are aggregated from the kept cross-attention maps after the fact.
    """

    def __init__(
        self,
        token_weights: torch.Tensor,
        *,
        conditional_offset: int,
        max_positions: int = P2P_MAX_POSITIONS,
    ) -> None:
        super().__init__(token_weights, conditional_offset=conditional_offset)
        self.max_positions = max_positions
        self.maps: list[tuple[bool, torch.Tensor]] = []  # (is_cross, (B, heads, N, T))
        self.is_cross = True  # set by the processor before each layer call

    def add(self, probs: torch.Tensor) -> None:
        rows = probs[self.conditional_offset :]
        if rows.shape[2] <= self.max_positions:
            self.maps.append((self.is_cross, rows))

    @property
    def nbytes(self) -> int:
        return held_bytes(m for _, m in self.maps)

    def coarse_masks(
        self, *, height: int, width: int, latent_size: tuple[int, int], resolutions: int = 3
    ) -> torch.Tensor:
        summed = AttentionCapture(self.token_weights)
        for is_cross, rows in self.maps:
            if is_cross:
                summed.add(rows)
        return summed.coarse_masks(
            height=height, width=width, latent_size=latent_size, resolutions=resolutions
        )


class StoringAttnProcessor(CapturingCrossAttnProcessor):
    """Explicit attention on every layer, self and cross, each map handed to a store."""

    def __init__(self, store: AttentionStore) -> None:
        super().__init__(store)
        self.store = store

    def __call__(
        self,
        attn: Attention,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        temb: torch.Tensor | None = None,
        *args: object,
        **kwargs: object,
    ) -> torch.Tensor:
        self.store.is_cross = encoder_hidden_states is not None
        if encoder_hidden_states is None:
            # NOTE: self-attention is attention over the layer's own input. SD's self-attention
            # layers have no group, spatial or cross norm, so passing that input as the context
            # makes the capturing (explicit) path compute exactly the self-attention.
            if attn.group_norm is not None or attn.spatial_norm is not None:
                raise ValueError("self-attention with a group or spatial norm is not supported")
            encoder_hidden_states = hidden_states
        return super().__call__(attn, hidden_states, encoder_hidden_states, attention_mask, temb)


@contextmanager
def attention_processors(unet: UNet2DConditionModel, processor: object) -> Iterator[None]:
    """Install one processor on every attention layer for a block; restore the previous after."""
    previous = dict(unet.attn_processors)
    unet.set_attn_processor(processor)  # type: ignore[arg-type]
    try:
        yield
    finally:
        unet.set_attn_processor(previous)


@dataclass
class Batch:
    """Everything a batch of samples is generated from, computed once."""

    latents: torch.Tensor  # (B, 4, h, w) initial noise
    cond: torch.Tensor  # (B, 77, D)
    uncond: torch.Tensor  # (1, 77, D)
    name_weights: torch.Tensor  # (B, 77)

    def __len__(self) -> int:
        return len(self.latents)

    def item(self, i: int) -> Batch:
        rows = slice(i, i + 1)
        return Batch(self.latents[rows], self.cond[rows], self.uncond, self.name_weights[rows])


@torch.inference_mode()
def prepare_batch(
    model: DiffusionModel, specs: Sequence[SampleSpec], *, embedding: torch.Tensor, size: int
) -> Batch:
    """Noise and text states as `Sampler` computes them (each prompt encoded on its own)."""
    latent = size // model.vae_scale_factor
    shape = (1, model.unet.config.in_channels, latent, latent)
    latents = torch.cat([initial_noise(spec.seed, shape) for spec in specs])
    tokens = [tokenize_prompts(model.tokenizer, [s.prompt], CLASS_NAME) for s in specs]
    embedding = embedding.to(model.device, model.dtype)
    cond = torch.cat([encode_prompts(model.text_encoder, t, embedding) for t in tokens])
    empty = model.tokenizer(
        [""], padding="max_length", max_length=model.tokenizer.model_max_length, return_tensors="pt"
    ).input_ids
    uncond = model.text_encoder(empty.to(model.device))[0]
    weights = torch.cat([t.name_mask.float() for t in tokens])
    return Batch(latents.to(model.device, model.dtype), cond, uncond, weights)


@torch.inference_mode()
def generate(model: DiffusionModel, batch: Batch, *, steps: int) -> torch.Tensor:
    """DDIM with classifier-free guidance, then VAE decode: `Sampler`'s loop, uint8 images."""
    scheduler = DDIMScheduler.from_config(model.scheduler.config)
    scheduler.set_timesteps(steps, device=model.device)
    latents = batch.latents * scheduler.init_noise_sigma
    text = torch.cat([batch.uncond.expand(len(batch), -1, -1), batch.cond])
    for t in scheduler.timesteps:
        unet_in = scheduler.scale_model_input(torch.cat([latents, latents]), t)
        noise = model.unet(unet_in, t, encoder_hidden_states=text).sample
        uncond_noise, cond_noise = noise.chunk(2)
        noise = uncond_noise + GUIDANCE_SCALE * (cond_noise - uncond_noise)
        latents = scheduler.step(noise, t, latents).prev_sample
    decoded = model.vae.decode(latents / model.vae.config.scaling_factor).sample
    return ((decoded.float() / 2 + 0.5).clamp(0, 1) * 255).round().to(torch.uint8)


class Variants:
    """The ways of producing a batch's images (and masks) that are timed against each other."""

    def __init__(self, model: DiffusionModel, batch: Batch, *, size: int, steps: int) -> None:
        self.model, self.batch, self.size, self.steps = model, batch, size, steps
        latent = size // model.vae_scale_factor
        self.latent_size = (latent, latent)

    def stock(self, batch: Batch | None = None) -> torch.Tensor:
        """Images with `AttnProcessor2_0` on every layer, nothing captured."""
        with attention_processors(self.model.unet, AttnProcessor2_0()):
            return generate(self.model, batch or self.batch, steps=self.steps)

    def capture(
        self, *, steps: int | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, AttentionCapture]:
        """Images, coarse masks and the capture state, with aligndiff's capturing processors."""
        batch = self.batch
        capture = AttentionCapture(batch.name_weights, conditional_offset=len(batch))
        with capturing_cross_attention(self.model.unet, capture):
            images = generate(self.model, batch, steps=steps or self.steps)
        masks = capture.coarse_masks(
            height=self.size, width=self.size, latent_size=self.latent_size
        )
        return images, masks, capture

    def store_everything(self, i: int, *, steps: int | None = None) -> AttentionStore:
        """Image `i` alone, every attention map kept; its coarse mask made from the store."""
        batch = self.batch.item(i)
        store = AttentionStore(batch.name_weights, conditional_offset=1)
        with attention_processors(self.model.unet, StoringAttnProcessor(store)):
            generate(self.model, batch, steps=steps or self.steps)
        store.coarse_masks(height=self.size, width=self.size, latent_size=self.latent_size)
        return store

    def stock_per_image(self) -> None:
        for i in range(len(self.batch)):
            self.stock(self.batch.item(i))

    def store_everything_per_image(self) -> None:
        for i in range(len(self.batch)):
            self.store_everything(i)


def max_difference(a: Sequence[object], b: torch.Tensor) -> float:
    """Largest |a - b| between arrays (numpy, as Sampler returns them) and a tensor batch."""
    return max(
        float((torch.as_tensor(x).double() - y.cpu().double()).abs().max())
        for x, y in zip(a, b, strict=True)
    )


def state_growth(variants: Variants, *, steps: Sequence[int]) -> list[list[object]]:
    """Capture state (whole batch) and stored maps (one image) after each number of steps."""
    rows: list[list[object]] = []
    for n in steps:
        capture = variants.capture(steps=n)[2]
        store = variants.store_everything(0, steps=n)
        rows.append(
            [
                n,
                format_bytes(held_bytes(capture.sums.values())),
                sum(capture.counts.values()),
                format_bytes(store.nbytes),
                len(store.maps),
            ]
        )
        del store
    return rows


@dataclass
class Measurements:
    """Everything one run measured: timings per round, memory, and the equivalence checks."""

    label: str
    device: torch.device
    steps: int
    count: int
    repeats: int
    seconds: dict[str, list[float]]
    peaks: dict[str, list[int]]  # CUDA peak per variant (empty off CUDA)
    capture_bytes: int
    store_bytes: int
    image_delta: float  # Sampler vs the benchmark's capture loop, uint8 images
    mask_delta: float  # Sampler vs the benchmark's capture loop, coarse masks
    store_mask_delta: float  # masks from stored maps vs captured masks
    growth: list[list[object]]

    def median(self, name: str) -> float:
        return median(self.seconds[name])

    def ratio(self, numerator: str, denominator: str) -> Ratio:
        return Ratio.paired(self.seconds[numerator], self.seconds[denominator])

    def row(self, variant: str, name: str, third: str, held: str) -> list[str]:
        """A table row: variant, median time, `third`, held bytes (+ CUDA peak on CUDA)."""
        peak = self.peaks.get(name)
        memory = f"{held}; CUDA peak {format_bytes(peak[0])}" if peak else held
        return [variant, format_seconds(self.median(name)), third, memory]

    def images_per_second(self, name: str) -> str:
        return f"{self.count / self.median(name):.2f}"


def measure(args: argparse.Namespace) -> Measurements:
    model = load_model(args)
    device, label = model.device, setup_label(args, model)
    size = args.resolution or model.default_resolution
    steps, count = args.steps, args.batch_size

    specs = prompt_bank(CLASS_NAME, num_samples=count, class_seed=0)
    # The initializer's embedding stands in for a learned token: same shapes, same work.
    embedding = initial_embedding(model)
    batch = prepare_batch(model, specs, embedding=embedding, size=size)
    variants = Variants(model, batch, size=size, steps=steps)
    sampling = SamplingConfig(num_steps=steps, batch_size=count, resolution=size)
    sampler = Sampler(model, class_name=CLASS_NAME, token_embedding=embedding, config=sampling)

    def sample() -> list[GeneratedSample]:
        return list(sampler.generate(specs))

    # The benchmark's loop must do the product's work: compare its output with Sampler's, and
    # the store-everything masks (aggregated after the fact) with the captured ones.
    peaks: dict[str, list[int]] = {}
    with cuda_peak_memory(device) as peaks["sampler"]:
        product = sample()
    with cuda_peak_memory(device) as peaks["capture"]:
        images, masks, capture = variants.capture()
    with cuda_peak_memory(device) as peaks["stock"]:
        variants.stock()
    with cuda_peak_memory(device) as peaks["per-image store"]:
        store = variants.store_everything(0)
    store_mask = store.coarse_masks(height=size, width=size, latent_size=variants.latent_size)
    checks = {
        "image_delta": max_difference([s.image.transpose(2, 0, 1) for s in product], images),
        "mask_delta": max_difference([s.coarse_mask for s in product], masks),
        "store_mask_delta": max_difference([store_mask[0]], masks[:1]),
    }
    capture_bytes, store_bytes = held_bytes(capture.sums.values()), store.nbytes
    del store, store_mask

    print(f"timing {count} images x {steps} steps, {args.repeats} rounds ({label}) …")
    seconds = run_interleaved(
        {
            "stock": timed(variants.stock, device),
            "capture": timed(variants.capture, device),
            "sampler": timed(sample, device),
            "per-image stock": timed(variants.stock_per_image, device),
            "per-image store": timed(variants.store_everything_per_image, device),
        },
        repeats=args.repeats,
    )
    return Measurements(
        label=label,
        device=device,
        steps=steps,
        count=count,
        repeats=args.repeats,
        seconds=seconds,
        peaks=peaks,
        capture_bytes=capture_bytes,
        store_bytes=store_bytes,
        growth=state_growth(variants, steps=(steps, 2 * steps)),
        **checks,
    )


def report_overhead(m: Measurements, args: argparse.Namespace) -> None:
    overhead = m.ratio("capture", "stock")
    growth_table = markdown_table(
        [
            "steps",
            f"capture state (batch of {m.count})",
            "layer calls summed",
            "store-everything (1 image)",
            "maps stored",
        ],
        m.growth,
    )
    report(
        f"attention_capture (a): capture overhead — {m.label}",
        ["variant", f"time per batch of {m.count} (median)", "vs stock", "memory"],
        [
            m.row(
                "stock processors (`AttnProcessor2_0` everywhere)",
                "stock",
                "1.000",
                "no capture state",
            ),
            m.row(
                "capturing cross-attention + coarse masks",
                "capture",
                f"**{overhead}** (target <= 1.05: {verdict(overhead.median <= 1.05)})",
                f"capture state {format_bytes(m.capture_bytes)}",
            ),
        ],
        args=args,
        device=m.device,
        notes="\n".join(
            [
                f"{m.steps} DDIM steps, CFG {GUIDANCE_SCALE}, batch {m.count}, VAE decode "
                f"included; {m.repeats} interleaved rounds; ratios are medians of per-round "
                "ratios.",
                f"The loop reproduces `Sampler.generate`: max |Δ| {m.image_delta:.0f} on uint8 "
                f"images, {m.mask_delta:.1e} on coarse masks.",
                "",
                "Capture state vs stored maps as the number of steps grows:",
                "",
                growth_table,
            ]
        ),
    )


def report_throughput(m: Measurements, args: argparse.Namespace) -> None:
    throughput = m.ratio("per-image store", "sampler")
    batching = m.ratio("per-image stock", "stock")
    storing = m.ratio("per-image store", "per-image stock")
    report(
        f"attention_capture (b): batched capture vs per-image store-everything — {m.label}",
        ["variant", f"time for {m.count} images (median)", "images/s", "memory"],
        [
            m.row(
                f"`Sampler.generate`, batch {m.count}, capture",
                "sampler",
                m.images_per_second("sampler"),
                f"capture state {format_bytes(m.capture_bytes)} per batch",
            ),
            m.row(
                "one image per call, stock attention",
                "per-image stock",
                m.images_per_second("per-image stock"),
                "—",
            ),
            m.row(
                "one image per call, store-everything",
                "per-image store",
                m.images_per_second("per-image store"),
                f"stored maps {format_bytes(m.store_bytes)} per image",
            ),
        ],
        args=args,
        device=m.device,
        notes="\n".join(
            [
                f"**Images/s, batched capture / per-image store-everything: {throughput}** "
                f"(target >= 5 at SD scale: {verdict(throughput.median >= 5)} in this setup). "
                f"It is the product of batching ({batching.median:.2f}x: per-image stock vs "
                f"batched stock) and of not storing ({storing.median:.2f}x: per-image "
                "store-everything vs per-image stock), give or take the capture overhead; "
                "`Sampler.generate` vs the benchmark's capture loop: "
                f"{m.ratio('sampler', 'capture')}.",
                f"Same {m.steps} steps and CFG for all; coarse masks from the stored maps equal "
                f"the captured ones (max |Δ| {m.store_mask_delta:.1e}).",
                "" if args.full else TINY_CAVEAT,
            ]
        ),
    )


def main(argv: Sequence[str] | None = None) -> None:
    parser = benchmark_parser(__doc__.splitlines()[0], steps=10, repeats=15)
    parser.add_argument("--batch-size", type=int, default=8, help="images per batch (default 8)")
    args = parser.parse_args(argv)
    measurements = measure(args)
    report_overhead(measurements, args)
    report_throughput(measurements, args)


if __name__ == "__main__":
    main()
