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

Both capture modes (`explicit`, `sdpa`: `aligndiff.attention`) are timed against stock;
`--profile` adds a split of one generation per variant: time in cross-attention layers (by
resolution), in self-attention layers, the rest of the UNet, coarse-mask building, VAE decode.

Run: `python -m bench.attention_capture` (tiny, CPU), or on a GPU
`python -m bench.attention_capture --full --device cuda --dtype float16 --steps 50 --repeats 5`
(a round generates 5 x 8 images at 50 steps; the default 15 rounds would outlast 10 minutes).
At SD 1.5 shapes, 512 px, on a CPU (a few minutes): `python -m bench.attention_capture --full
--steps 3 --batch-size 1 --repeats 3 --overhead-only --profile`. SDXL: `--family sdxl` (tiny-sdxl;
with `--full` SDXL base shapes from `bench.sdxl`, 1024 px native; `--resolution` to shrink).
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from diffusers import DDIMScheduler, UNet2DConditionModel
from diffusers.models.attention_processor import Attention, AttnProcessor2_0

from aligndiff.acceleration import Acceleration, prepare
from aligndiff.attention import (
    CAPTURE_MODES,
    AttentionCapture,
    CaptureMode,
    CapturingCrossAttnProcessor,
    capturing_cross_attention,
    cross_attention_positions,
    finest_positions,
    is_cross_attention,
)
from aligndiff.conditioning import (
    added_conditioning,
    encode_for_model,
    tokenize_for_model,
    unconditional_for_model,
)
from aligndiff.inversion import initial_embedding
from aligndiff.models.diffusion import TINY_SDXL, DiffusionModel, load_diffusion_model
from aligndiff.prompts import SampleSpec, prompt_bank
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
    model_cache_dir,
    plural,
    report,
    run_interleaved,
    set_threads,
    setup_label,
    synchronize,
    timed,
    verdict,
)
from bench.sdxl import build_sdxl

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
    pooled: torch.Tensor | None = None  # SDXL: (B, P) pooled text
    uncond_pooled: torch.Tensor | None = None  # SDXL: (1, P)

    def __len__(self) -> int:
        return len(self.latents)

    def item(self, i: int) -> Batch:
        rows = slice(i, i + 1)
        pooled = None if self.pooled is None else self.pooled[rows]
        return Batch(
            self.latents[rows],
            self.cond[rows],
            self.uncond,
            self.name_weights[rows],
            pooled,
            self.uncond_pooled,
        )


@torch.inference_mode()
def prepare_batch(
    model: DiffusionModel, specs: Sequence[SampleSpec], *, embedding: torch.Tensor, size: int
) -> Batch:
    """Noise and text states as `Sampler` computes them (each prompt encoded on its own)."""
    latent = size // model.vae_scale_factor
    shape = (1, model.unet.config.in_channels, latent, latent)
    latents = torch.cat([initial_noise(spec.seed, shape) for spec in specs])
    tokens = [tokenize_for_model(model, [s.prompt], CLASS_NAME) for s in specs]
    embedding = embedding.to(model.device, model.dtype)
    encoded = [encode_for_model(model, t, embedding) for t in tokens]
    cond = torch.cat([states for states, _ in encoded])
    pooled = None if encoded[0][1] is None else torch.cat([p for _, p in encoded])  # type: ignore[misc]
    uncond, uncond_pooled = unconditional_for_model(model)
    weights = torch.cat([t[0].name_mask.float() for t in tokens])
    # NOTE: the latents stay float32 as in `Sampler` (only the UNet input is cast).
    return Batch(latents.to(model.device), cond, uncond, weights, pooled, uncond_pooled)


@dataclass
class Clock:
    """Seconds spent per named part of a generation (`--profile`); off when `parts` is None."""

    device: torch.device
    parts: dict[str, float] | None = None

    @contextmanager
    def part(self, name: str) -> Iterator[None]:
        if self.parts is None:
            yield
            return
        synchronize(self.device)
        start = time.perf_counter()
        try:
            yield
        finally:
            synchronize(self.device)
            self.parts[name] = self.parts.get(name, 0.0) + time.perf_counter() - start


class TimedProcessor:
    """Wraps an attention processor: adds the seconds of each call to `clock` under `name`."""

    def __init__(self, inner: object, clock: Clock, name: str) -> None:
        self.inner, self.clock, self.name = inner, clock, name

    def __call__(
        self, attn: Attention, hidden_states: torch.Tensor, *args: object, **kwargs: object
    ):  # type: ignore[no-untyped-def]
        with self.clock.part(self.name):
            return self.inner(attn, hidden_states, *args, **kwargs)  # type: ignore[operator]


def time_processors(model: DiffusionModel, clock: Clock, latent_size: tuple[int, int]) -> None:
    """Wrap the UNet's current processors (inside a block that restores them after) so that
    cross-attention calls count under "cross N" (N query positions) and self-attention under
    "self"."""
    if clock.parts is None:
        return
    positions = cross_attention_positions(model.unet, latent_size)
    model.unet.set_attn_processor(
        {
            name: TimedProcessor(
                processor, clock, f"cross {positions[name]}" if is_cross_attention(name) else "self"
            )
            for name, processor in model.unet.attn_processors.items()
        }  # type: ignore[arg-type]
    )


@torch.inference_mode()
def generate(
    model: DiffusionModel,
    batch: Batch,
    *,
    steps: int,
    decode: bool = True,
    clock: Clock | None = None,
) -> torch.Tensor:
    """DDIM with classifier-free guidance, then VAE decode: `Sampler`'s loop, uint8 images
    (without `decode`: the final latents). SDXL gets its pooled text and size ids."""
    clock = clock or Clock(model.device)
    scheduler = DDIMScheduler.from_config(model.scheduler.config)
    scheduler.set_timesteps(steps, device=model.device)
    latents = batch.latents * scheduler.init_noise_sigma
    text = torch.cat([batch.uncond.expand(len(batch), -1, -1), batch.cond])
    added = None
    if batch.pooled is not None and batch.uncond_pooled is not None:
        pooled = torch.cat([batch.uncond_pooled.expand(len(batch), -1), batch.pooled])
        size = batch.latents.shape[-1] * model.vae_scale_factor
        added = added_conditioning(pooled, resolution=size, dtype=model.dtype)
    with clock.part("UNet loop"):
        for t in scheduler.timesteps:
            unet_in = scheduler.scale_model_input(torch.cat([latents, latents]), t)
            noise = model.denoise(unet_in.to(model.dtype), t, text, added).float()
            uncond_noise, cond_noise = noise.chunk(2)
            noise = uncond_noise + GUIDANCE_SCALE * (cond_noise - uncond_noise)
            latents = scheduler.step(noise, t, latents).prev_sample
    if not decode:
        return latents
    with clock.part("VAE decode"):
        scaled = (latents / model.vae.config.scaling_factor).to(model.vae.dtype)
        decoded = model.vae.decode(scaled).sample
    return ((decoded.float() / 2 + 0.5).clamp(0, 1) * 255).round().to(torch.uint8)


class Variants:
    """The ways of producing a batch's images (and masks) that are timed against each other."""

    def __init__(
        self, model: DiffusionModel, batch: Batch, *, size: int, steps: int, decode: bool = True
    ) -> None:
        self.model, self.batch, self.size, self.steps = model, batch, size, steps
        self.decode = decode
        latent = size // model.vae_scale_factor
        self.latent_size = (latent, latent)

    def stock(self, batch: Batch | None = None, *, clock: Clock | None = None) -> torch.Tensor:
        """Images with `AttnProcessor2_0` on every layer, nothing captured."""
        clock = clock or Clock(self.model.device)
        with attention_processors(self.model.unet, AttnProcessor2_0()):
            time_processors(self.model, clock, self.latent_size)
            return generate(
                self.model, batch or self.batch, steps=self.steps, decode=self.decode, clock=clock
            )

    def capture(
        self,
        *,
        steps: int | None = None,
        mode: CaptureMode = "explicit",
        clock: Clock | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, AttentionCapture]:
        """Images, coarse masks and the capture state, with aligndiff's capturing processors
        in `mode` (the "sdpa" mode captures only the resolutions the masks read, as `Sampler`
        sets it up)."""
        batch, clock = self.batch, clock or Clock(self.model.device)
        positions = finest_positions(self.model.unet, self.latent_size, 3)
        capture = AttentionCapture(
            batch.name_weights,
            conditional_offset=len(batch),
            positions=positions if mode == "sdpa" else None,
        )
        with capturing_cross_attention(self.model.unet, capture, mode=mode):
            time_processors(self.model, clock, self.latent_size)
            images = generate(
                self.model, batch, steps=steps or self.steps, decode=self.decode, clock=clock
            )
        with clock.part("coarse masks"):
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
    store_bytes: int | None  # None: part (b) skipped (`--overhead-only`)
    image_delta: float  # Sampler vs the benchmark's capture loop, uint8 images
    mask_delta: float  # Sampler vs the benchmark's capture loop, coarse masks
    store_mask_delta: float | None  # masks from stored maps vs captured masks
    growth: list[list[object]]
    modes: tuple[CaptureMode, ...]
    decode: bool
    profiles: dict[str, list[dict[str, float]]]  # variant → one split per profiled round

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


def load(args: argparse.Namespace) -> tuple[DiffusionModel, str]:
    """The model under test and its setup label: `bench.common.load_model` for SD, tiny-sdxl
    or (`--full`) SDXL base shapes with random weights for `--family sdxl`."""
    if args.family != "sdxl":
        model = load_model(args)
        return model, setup_label(args, model)
    set_threads(args)
    if args.full:
        model = build_sdxl(device=args.device, dtype=args.dtype)
    else:
        model = load_diffusion_model(
            TINY_SDXL, device=args.device, dtype=args.dtype, cache_dir=model_cache_dir(args)
        )
    name = "SDXL base shapes, random weights" if args.full else "tiny-sdxl"
    resolution = args.resolution or model.default_resolution
    device = model.device.type
    if device == "cpu":
        device = f"cpu ({plural(torch.get_num_threads(), 'thread')})"
    return model, f"{name}, {resolution} px, {device}, {str(model.dtype).removeprefix('torch.')}"


def variant_name(mode: CaptureMode) -> str:
    return f"capture {mode}"


def measure(args: argparse.Namespace) -> Measurements:
    model, label = load(args)
    device = model.device
    size = args.resolution or model.default_resolution
    steps, count = args.steps, args.batch_size
    modes: tuple[CaptureMode, ...] = tuple(args.modes)
    decode = not args.no_decode
    if not decode:
        label += ", no VAE decode"

    specs = prompt_bank(CLASS_NAME, num_samples=count, class_seed=0)
    # The initializer's embedding stands in for a learned token: same shapes, same work.
    embedding = initial_embedding(model)
    batch = prepare_batch(model, specs, embedding=embedding, size=size)
    variants = Variants(model, batch, size=size, steps=steps, decode=decode)

    # The benchmark's loop must do the product's work: compare its output with Sampler's
    # (explicit mode: the setting's default), and the store-everything masks (aggregated after
    # the fact) with the captured ones.
    peaks: dict[str, list[int]] = {}
    image_delta = mask_delta = float("nan")
    sample: Callable[[], object] | None = None
    if decode:
        sampling = SamplingConfig(
            num_steps=steps, guidance_scale=GUIDANCE_SCALE, batch_size=count, resolution=size
        )
        sampler_model = prepare(model, Acceleration(capture_attention="explicit"))
        sampler = Sampler(
            sampler_model, class_name=CLASS_NAME, token_embedding=embedding, config=sampling
        )

        def sample() -> list[GeneratedSample]:
            return list(sampler.generate(specs))

        with cuda_peak_memory(device) as peaks["sampler"]:
            product = sample()
    with cuda_peak_memory(device) as peaks["capture"]:
        images, masks, capture = variants.capture()
    if decode:
        image_delta = max_difference([s.image.transpose(2, 0, 1) for s in product], images)
        mask_delta = max_difference([s.coarse_mask for s in product], masks)
        del product
    for mode in modes:
        if mode != "explicit":
            with cuda_peak_memory(device) as peaks[variant_name(mode)]:
                variants.capture(mode=mode)
    with cuda_peak_memory(device) as peaks["stock"]:
        variants.stock()
    store_bytes = store_mask_delta = None
    if not args.overhead_only:
        with cuda_peak_memory(device) as peaks["per-image store"]:
            store = variants.store_everything(0)
        store_mask = store.coarse_masks(height=size, width=size, latent_size=variants.latent_size)
        store_mask_delta = max_difference([store_mask[0]], masks[:1])
        store_bytes = store.nbytes
        del store, store_mask
    capture_bytes = held_bytes(capture.sums.values())

    timings: dict[str, Callable[[], float]] = {"stock": timed(variants.stock, device)}
    for mode in modes:
        timings[variant_name(mode)] = timed(lambda mode=mode: variants.capture(mode=mode), device)  # type: ignore[misc]
    if not args.overhead_only:
        assert sample is not None, "part (b) needs the VAE decode"
        timings["sampler"] = timed(sample, device)
        timings["per-image stock"] = timed(variants.stock_per_image, device)
        timings["per-image store"] = timed(variants.store_everything_per_image, device)
    print(f"timing {count} images x {steps} steps, {args.repeats} rounds ({label}) …", flush=True)
    seconds = run_interleaved(timings, repeats=args.repeats)

    profiles: dict[str, list[dict[str, float]]] = {}
    if args.profile:
        # One generation per variant per round, processors wrapped in timers (their
        # synchronization costs a little on a GPU; the split, not the total, is the point).
        def profiled(name: str) -> Callable[[], dict[str, float]]:
            def run() -> dict[str, float]:
                clock = Clock(device, {})
                start = time.perf_counter()
                if name == "stock":
                    variants.stock(clock=clock)
                else:
                    variants.capture(mode=name.removeprefix("capture "), clock=clock)  # type: ignore[arg-type]
                assert clock.parts is not None
                clock.parts["total"] = time.perf_counter() - start
                return clock.parts

            return run

        print(f"profiling ({args.profile_repeats} rounds) …", flush=True)
        profiles = run_interleaved(
            {name: profiled(name) for name in ["stock", *map(variant_name, modes)]},
            repeats=args.profile_repeats,
            warmup=0,
        )

    growth: list[list[object]] = []
    if not args.overhead_only:
        growth = state_growth(variants, steps=(steps, 2 * steps))
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
        image_delta=image_delta,
        mask_delta=mask_delta,
        store_mask_delta=store_mask_delta,
        growth=growth,
        modes=modes,
        decode=decode,
        profiles=profiles,
    )


PROFILE_PARTS = ("UNet loop", "self", "coarse masks", "VAE decode", "total")


def profile_table(m: Measurements) -> str:
    """Median seconds per part of one generation, per variant, and each variant's excess."""
    names = list(m.profiles)
    crosses = sorted(
        {p for runs in m.profiles.values() for run in runs for p in run if p.startswith("cross")},
        key=lambda p: -int(p.split()[1]),
    )

    def part(name: str, key: str) -> float:
        return median(run.get(key, 0.0) for run in m.profiles[name])

    def cross_total(name: str) -> float:
        return median(
            sum(v for k, v in run.items() if k.startswith("cross")) for run in m.profiles[name]
        )

    def rest(name: str) -> float:
        return median(
            run["UNet loop"]
            - run.get("self", 0.0)
            - sum(v for k, v in run.items() if k.startswith("cross"))
            for run in m.profiles[name]
        )

    rows: list[list[object]] = []
    labels = {"self": "self-attention layers (stock SDPA in all)"}
    for key in [*(c for c in crosses), "cross all", "self", "rest of UNet", "UNet loop",
                "coarse masks", "VAE decode", "total"]:  # fmt: skip
        if key == "VAE decode" and not m.decode:
            continue
        values = {
            n: cross_total(n) if key == "cross all" else rest(n) if key == "rest of UNet"
            else part(n, key)
            for n in names
        }  # fmt: skip
        label = labels.get(key, key)
        if key.startswith("cross ") and key != "cross all":
            positions = int(key.split()[1])
            label = f"cross-attention, {positions} query positions ({int(positions**0.5)}²)"
        elif key == "cross all":
            label = "cross-attention layers, all"
        row: list[object] = [label]
        for n in names:
            excess = values[n] - values["stock"]
            row.append(
                format_seconds(values[n])
                + (
                    ""
                    if n == "stock"
                    else f" ({'+' if excess >= 0 else '−'}{format_seconds(abs(excess))})"
                )
            )
        rows.append(row)
    return markdown_table(["part (one generation, median)", *names], rows)


def report_overhead(m: Measurements, args: argparse.Namespace, *, notes: str = "") -> None:
    rows = [
        m.row(
            "stock processors (`AttnProcessor2_0` everywhere)", "stock", "1.000", "no capture state"
        )
    ]
    for mode in m.modes:
        name = variant_name(mode)
        overhead = m.ratio(name, "stock")
        rows.append(
            m.row(
                f"capturing cross-attention (`{mode}`) + coarse masks",
                name,
                f"**{overhead}** (target <= 1.05: {verdict(overhead.median <= 1.05)})",
                f"capture state {format_bytes(m.capture_bytes)}" if mode == "explicit" else "—",
            )
        )
    lines = [
        f"{m.steps} DDIM steps, CFG {GUIDANCE_SCALE}, batch {m.count}, "
        + ("VAE decode included" if m.decode else "no VAE decode (the same work in every variant)")
        + f"; {m.repeats} interleaved rounds; ratios are medians of per-round ratios.",
    ]
    if m.decode:
        lines.append(
            f"The loop reproduces `Sampler.generate` (explicit mode): max |Δ| {m.image_delta:.0f} "
            f"on uint8 images, {m.mask_delta:.1e} on coarse masks."
        )
    if m.growth:
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
        lines += [
            "",
            "Capture state vs stored maps as the number of steps grows:",
            "",
            growth_table,
        ]
    if m.profiles:
        lines += [
            "",
            f"Where the time goes (`--profile`: one generation per variant, "
            f"{plural(len(next(iter(m.profiles.values()))), 'round')}, processors wrapped in "
            "timers; in brackets the excess over stock):",
            "",
            profile_table(m),
        ]
    if notes.strip():
        lines += ["", notes.strip()]
    report(
        f"attention_capture (a): capture overhead — {m.label}",
        ["variant", f"time per batch of {m.count} (median)", "vs stock", "memory"],
        rows,
        args=args,
        device=m.device,
        notes="\n".join(lines),
    )


def report_throughput(m: Measurements, args: argparse.Namespace) -> None:
    assert m.store_bytes is not None and m.store_mask_delta is not None
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
                f"{m.ratio('sampler', variant_name('explicit'))}.",
                f"Same {m.steps} steps and CFG for all; coarse masks from the stored maps equal "
                f"the captured ones (max |Δ| {m.store_mask_delta:.1e}).",
                "" if args.full else TINY_CAVEAT,
            ]
        ),
    )


def main(argv: Sequence[str] | None = None) -> None:
    parser = benchmark_parser(__doc__.splitlines()[0], steps=10, repeats=15)
    parser.add_argument("--batch-size", type=int, default=8, help="images per batch (default 8)")
    parser.add_argument(
        "--family",
        choices=("sd", "sdxl"),
        default="sd",
        help="sd: tiny / SD 1.5 shapes (--full); sdxl: tiny-sdxl / SDXL base shapes (--full)",
    )
    parser.add_argument(
        "--modes",
        type=lambda text: [m.strip() for m in text.split(",") if m.strip()],
        default=list(CAPTURE_MODES),
        help="capture modes timed against stock, comma-separated (default: explicit,sdpa)",
    )
    parser.add_argument(
        "--overhead-only", action="store_true", help="part (a) only: skip the per-image variants"
    )
    parser.add_argument(
        "--no-decode",
        action="store_true",
        help="leave the VAE decode out of the timed loop (implies --overhead-only)",
    )
    parser.add_argument(
        "--profile", action="store_true", help="split one generation per variant into parts"
    )
    parser.add_argument(
        "--profile-repeats", type=int, default=2, help="profiled rounds (default 2)"
    )
    parser.add_argument("--notes", default="", help="analysis appended to section (a)'s notes")
    args = parser.parse_args(argv)
    unknown = [m for m in args.modes if m not in CAPTURE_MODES]
    if unknown or "explicit" not in args.modes:
        parser.error(f"--modes: one or more of {CAPTURE_MODES}, explicit included")
    if args.no_decode:
        args.overhead_only = True
    measurements = measure(args)
    report_overhead(measurements, args, notes=args.notes)
    if not args.overhead_only:
        report_throughput(measurements, args)


if __name__ == "__main__":
    main()
