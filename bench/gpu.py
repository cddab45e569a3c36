"""GPU throughput: SD 1.5 at 512² or SDXL base at 1024², 50 steps, with the fast path's switches.

Measures, on the device and dtype given (default: CUDA in float16 when there is one):

- images/s with masks: sampling with cross-attention capture and coarse masks, then the few-shot
  annotation (both passes and the OOD filter) and CLIP scoring of the same images;
- capture overhead: the same denoising loop with capture vs with stock attention processors;
- inversion seconds per class: `invert` timed over `--inversion-steps` optimizer steps,
  scaled to the reference's 500;
- peak device memory of a sampling batch;
- the CLIP + FSS share of generation time;
- beside each throughput, its FLOP ceiling: FLOPs of one image (one UNet step counted with
  `torch.utils.flop_counter.FlopCounterMode` on meta tensors, × steps × the CFG batch of 2,
  + one VAE decode), and the device's peak TFLOP/s for the dtype ÷ that.

The models are SD 1.5's UNet, VAE and CLIP ViT-L/14 text encoder, DINOv2-small and CLIP
ViT-L/14 with random weights (`bench.sd15`, `bench.stage_share`): FLOPs and memory traffic do
not depend on weight values. `--tiny` runs the tiny models instead: a CPU smoke run in seconds.

`--family sdxl`: SDXL base shapes (`bench.sdxl`: UNet, VAE decoding in float32 as its
`force_upcast` asks, CLIP ViT-L + OpenCLIP bigG) at 1024² with its pooled-text and size
conditioning; `--tiny` then means tiny-sdxl. The VAE decode's FLOPs count at the float32 peak.

Run on a GPU:  python -m bench.gpu --dtype float16 --channels-last --write
               python -m bench.gpu --dtype float16 --channels-last --compile --write
               python -m bench.gpu --family sdxl --dtype float16 --channels-last --steps 30 --write
On a CPU:      python -m bench.gpu --tiny --write
               python -m bench.gpu --family sdxl --tiny --write
FLOPs only:    python -m bench.gpu --family sdxl --flops-only --device cpu --dtype float16 --write
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
from torch.utils.flop_counter import FlopCounterMode

from aligndiff.acceleration import Acceleration, prepare, resolve_batch_size
from aligndiff.annotation import AnnotationConfig, annotate
from aligndiff.attention import AttentionCapture, capturing_cross_attention, finest_positions
from aligndiff.conditioning import added_conditioning
from aligndiff.fss import PrototypeSegmenter
from aligndiff.inversion import InversionConfig, initial_embedding, invert
from aligndiff.models.diffusion import TINY_SDXL, DiffusionModel, resolve_dtype
from aligndiff.ood import OodConfig, ood_ious
from aligndiff.prompts import SampleSpec, prompt_bank
from aligndiff.sampling import Sampler, SamplingConfig, initial_noise
from aligndiff.scoring import ClipScorer
from aligndiff.settings import TINY, Settings
from aligndiff.shots import Shot, load_shots
from aligndiff.synth import Models, load_models
from bench.common import (
    CLASS_NAME,
    RESULTS_PATH,
    SHOTS_DIR,
    Ratio,
    command_line,
    format_bytes,
    markdown_table,
    median,
    record_results,
    run_interleaved,
    synchronize,
    timed,
)
from bench.sd15 import build_sd15
from bench.sdxl import build_sdxl
from bench.stage_share import clip_vit_l14, dinov2_small

# H100 peaks per dtype, `--peak-tflops` overrides: half precision at the ~800 TFLOP/s dense
# matmuls reach in practice (DESIGN.md's ceiling; the SXM datasheet says 989), float32 at the
# plain FP32 datasheet rate (torch keeps TF32 off for matmuls by default).
H100_PEAK_TFLOPS = {torch.float16: 800.0, torch.bfloat16: 800.0, torch.float32: 66.9}
GUIDANCE_SCALE = 7.5
REFERENCE_INVERSION_STEPS = 500
TARGETS = "DESIGN.md (H100, SD 1.5, 512², 50 steps): >= 4.5 images/s with masks, inversion <= "
TARGETS += "30 s per class, CLIP + FSS <= 5% of generation, capture <= 5% over stock."


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    cuda = torch.cuda.is_available()
    parser.add_argument("--tiny", action="store_true", help="tiny models: a fast smoke run")
    parser.add_argument(
        "--family", choices=("sd", "sdxl"), default="sd", help="SD 1.5 (512²) or SDXL base (1024²)"
    )
    parser.add_argument("--device", default="cuda" if cuda else "cpu")
    parser.add_argument("--dtype", default=None, help="default: float16 on CUDA, else float32")
    parser.add_argument("--compile", action="store_true", help="torch.compile the UNet")
    parser.add_argument("--channels-last", action="store_true")
    parser.add_argument("--capture", choices=("sdpa", "explicit"), default="sdpa")
    parser.add_argument("--vae-slicing", action="store_true")
    parser.add_argument("--batch", default="8", help='images per batch, or "auto"')
    parser.add_argument("--steps", type=int, default=None, help="DDIM steps (50; tiny: 5)")
    parser.add_argument("--size", type=int, default=None, help="pixels (512, SDXL 1024; tiny: 128)")
    parser.add_argument("--batches", type=int, default=2, help="timed batches per run")
    parser.add_argument("--repeats", type=int, default=3, help="timed rounds")
    parser.add_argument("--inversion-steps", type=int, default=20, help="timed inversion steps")
    parser.add_argument("--peak-tflops", type=float, default=None, help="default: H100's")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (default 1)")
    parser.add_argument("--shots", type=Path, default=SHOTS_DIR)
    parser.add_argument(
        "--flops-only",
        action="store_true",
        help="only count FLOPs (models on the meta device: no weights, no GPU) at 30, 50 and "
        "--steps steps, and the ceilings",
    )
    parser.add_argument("--write", action="store_true", help=f"record in {RESULTS_PATH.name}")
    parser.add_argument("--results", type=Path, default=RESULTS_PATH)
    args = parser.parse_args(argv)
    args.dtype = resolve_dtype(args.dtype or ("float16" if args.device == "cuda" else "float32"))
    args.steps = args.steps or (5 if args.tiny else 50)
    args.size = args.size or (128 if args.tiny else 1024 if args.family == "sdxl" else 512)
    args.peak_tflops = args.peak_tflops or H100_PEAK_TFLOPS[args.dtype]
    return args


def build(args: argparse.Namespace) -> Models:
    """The models under test, with the fast path's switches applied to the diffusion model."""
    if torch.device(args.device).type == "cpu":
        torch.set_num_threads(args.threads or 1)
    acceleration = Acceleration(
        channels_last=args.channels_last,
        capture_attention=args.capture,
        compile_unet=args.compile,
        vae_slicing=args.vae_slicing,
    )
    if args.tiny:
        settings = Settings(
            diffusion_model=TINY_SDXL if args.family == "sdxl" else TINY,
            clip_model=TINY,
            fss_backbone=TINY,
        )
        models = load_models(settings, device=args.device, dtype=str(args.dtype)[6:])
        models.diffusion = prepare(models.diffusion, acceleration)
        return models
    device = torch.device(args.device)
    build_full = build_sdxl if args.family == "sdxl" else build_sd15
    return Models(
        diffusion=prepare(build_full(device=device, dtype=args.dtype), acceleration),
        segmenter=PrototypeSegmenter(dinov2_small(device, args.dtype)),
        scorer=ClipScorer(clip_vit_l14(device, args.dtype)),
    )


# FLOPs


def image_flops(model: DiffusionModel, *, size: int, steps: int) -> tuple[int, int, int]:
    """(FLOPs of one image, of one UNet call on its CFG pair, of its VAE decode), counted on
    meta-device copies of the UNet and VAE: shapes only, no arithmetic."""
    latent = size // model.vae_scale_factor
    width = sum(model.embedding_widths)  # SDXL: both encoders' states, concatenated
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(model.unet.config)
        vae = AutoencoderKL.from_config(model.vae.config)
        sample = torch.zeros((2, 4, latent, latent))
        states = torch.zeros((2, model.tokenizer.model_max_length, width))
        latents = torch.zeros((1, 4, latent, latent))
        added = None
        if model.text_encoder_2 is not None:
            pooled_width = int(model.text_encoder_2.config.projection_dim or 0)
            added = added_conditioning(
                torch.zeros((2, pooled_width)), resolution=size, dtype=torch.float32
            )
    with torch.no_grad():
        with FlopCounterMode(display=False) as counter:
            unet(
                sample,
                torch.tensor(500, device="meta"),
                encoder_hidden_states=states,
                added_cond_kwargs=added,
            )
        unet_flops = counter.get_total_flops()
        with FlopCounterMode(display=False) as counter:
            vae.decode(latents)
        vae_flops = counter.get_total_flops()
    return unet_flops * steps + vae_flops, unet_flops, vae_flops


# Generation


@dataclass
class Timings:
    sampling: list[float]
    annotation: list[float]
    scoring: list[float]


def denoise(model: DiffusionModel, specs: Sequence[SampleSpec], states, *, steps, size, capture):  # type: ignore[no-untyped-def]
    """`Sampler`'s DDIM + CFG loop and VAE decode on prepared text states, with or without
    capture (without: the stock attention processors)."""
    latent = size // model.vae_scale_factor
    scheduler = DDIMScheduler.from_config(model.scheduler.config)
    scheduler.set_timesteps(steps, device=model.device)
    latents = torch.cat([initial_noise(s.seed, (1, 4, latent, latent)) for s in specs])
    latents = latents.to(model.device)
    uncond, cond, weights, uncond_pooled, pooled = states
    text = torch.cat([uncond.expand(len(specs), -1, -1), cond])
    added = None
    if pooled is not None:
        pooled = torch.cat([uncond_pooled.expand(len(specs), -1), pooled])
        added = added_conditioning(pooled, resolution=size, dtype=model.dtype)
    record = AttentionCapture(
        weights,
        conditional_offset=len(specs),
        positions=finest_positions(model.unet, (latent, latent), 3)
        if model.acceleration.capture_attention == "sdpa"
        else None,
    )

    def loop() -> torch.Tensor:
        nonlocal latents
        for t in scheduler.timesteps:
            unet_in = scheduler.scale_model_input(torch.cat([latents, latents]), t)
            noise = model.denoise(unet_in.to(model.dtype), t, text, added).float()
            uncond_noise, cond_noise = noise.chunk(2)
            noise = uncond_noise + GUIDANCE_SCALE * (cond_noise - uncond_noise)
            latents = scheduler.step(noise, t, latents).prev_sample
        scaled = (latents / model.vae.config.scaling_factor).to(model.vae.dtype)
        return model.vae.decode(scaled).sample

    with torch.inference_mode():
        if not capture:
            return loop()
        mode = model.acceleration.capture_attention
        with capturing_cross_attention(model.unet, record, mode=mode):
            images = loop()
        record.coarse_masks(height=size, width=size, latent_size=(latent, latent))
        return images


def synthesize_batches(
    models: Models, sampler: Sampler, batches: list[list[SampleSpec]], shots: Sequence[Shot]
) -> tuple[float, float, float]:
    """Seconds of (sampling, annotation + OOD filter, CLIP scoring) for `batches`, the way
    `aligndiff.synth.synthesize` runs them."""
    device = models.diffusion.device
    specs = [spec for batch in batches for spec in batch]
    shot_images, shot_masks = [s.image_array for s in shots], [s.mask for s in shots]
    synchronize(device)
    start = time.perf_counter()
    generated = list(sampler.generate(specs))
    synchronize(device)
    sampled = time.perf_counter()
    images = [g.image for g in generated]
    segmenter = models.segmenter
    shot_features = segmenter.embed(shot_images)
    features = segmenter.embed(images)
    annotations = annotate(
        segmenter,
        shots=shot_features,
        shot_masks=shot_masks,
        samples=features,
        coarse_masks=[g.coarse_mask for g in generated],
        config=AnnotationConfig(),
    )
    ood_ious(
        segmenter,
        samples=features,
        sample_masks=[a.mask for a in annotations],
        shots=shot_features,
        shot_masks=shot_masks,
        threshold=OodConfig().prediction_threshold,
    )
    synchronize(device)
    annotated = time.perf_counter()
    reference = models.scorer.reference(class_name=CLASS_NAME, shot_images=shot_images)
    models.scorer.score(images, reference)
    synchronize(device)
    scored = time.perf_counter()
    return sampled - start, annotated - sampled, scored - annotated


def peak_bytes(device: torch.device, fn: Callable[[], object]) -> int | None:
    if device.type != "cuda":
        return None
    synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    fn()
    synchronize(device)
    return int(torch.cuda.max_memory_allocated(device))


def ceiling_of(
    args: argparse.Namespace, model: DiffusionModel, total: int, vae_decode: int
) -> tuple[float, float]:
    """(images/s at the FLOP ceiling, the VAE decode's peak TFLOP/s): the UNet at the dtype's
    peak, the VAE decode at its own dtype's (float32 for SDXL's `force_upcast`)."""
    vae_peak = args.peak_tflops
    if model.vae.dtype != args.dtype and default_peak(args):
        vae_peak = H100_PEAK_TFLOPS[model.vae.dtype]
    seconds = (total - vae_decode) / (args.peak_tflops * 1e12) + vae_decode / (vae_peak * 1e12)
    return 1 / seconds, vae_peak


def flops_only(args: argparse.Namespace) -> None:
    """The FLOP ceiling alone: full-size models on the meta device (shapes, no weights)."""
    build_full = build_sdxl if args.family == "sdxl" else build_sd15
    model = build_full(device="meta", dtype=args.dtype)
    rows = []
    for steps in sorted({30, 50, args.steps}):
        total, unet_call, vae_decode = image_flops(model, size=args.size, steps=steps)
        ceiling, vae_peak = ceiling_of(args, model, total, vae_decode)
        rows.append([steps, flops(unet_call), flops(vae_decode), flops(total), f"{ceiling:.3f}"])
    name = "SDXL base" if args.family == "sdxl" else "SD 1.5"
    vae_dtype = str(model.vae.dtype).removeprefix("torch.")
    table = markdown_table(
        ["steps", "UNet, one call on the CFG pair", "VAE decode", "per image",
         "ceiling, images/s"],
        rows,
    )  # fmt: skip
    notes = (
        f"{name} shapes at {args.size}², counted by FlopCounterMode on meta-device models (no "
        f"weights, no GPU needed). Ceiling: the UNet at {args.peak_tflops:g} TFLOP/s "
        f"({str(args.dtype)[6:]}), the VAE decode ({vae_dtype}) at {vae_peak:g} TFLOP/s "
        "(H100 defaults; `--peak-tflops` changes the first)."
    )
    section = f"gpu: FLOP ceiling — {name} shapes, {args.size}², {str(args.dtype)[6:]}"
    print(f"\n## {section}\n\n{table}\n\n{notes}\n")
    if args.write:
        record_results(section, command_line(), table, device="cpu", notes=notes, path=args.results)


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    if args.flops_only:
        flops_only(args)
        return
    began = time.perf_counter()
    models = build(args)
    diffusion = models.diffusion
    device = diffusion.device
    built = time.perf_counter() - began
    shots = load_shots(args.shots)
    batch = resolve_batch_size(
        "auto" if args.batch == "auto" else int(args.batch),
        configured=8,
        model=diffusion,
        resolution=args.size,
    )
    config = SamplingConfig(
        num_steps=args.steps, guidance_scale=GUIDANCE_SCALE, batch_size=batch, resolution=args.size
    )
    total, unet_call, vae_decode = image_flops(diffusion, size=args.size, steps=args.steps)
    ceiling, vae_peak = ceiling_of(args, diffusion, total, vae_decode)

    specs = prompt_bank(CLASS_NAME, num_samples=batch * args.batches, class_seed=0)
    batches = [specs[i : i + batch] for i in range(0, len(specs), batch)]
    sampler = Sampler(
        diffusion,
        class_name=CLASS_NAME,
        token_embedding=initial_embedding(diffusion),
        config=config,
    )
    print(f"built in {built:.1f} s; warm-up (compiles when --compile) …", flush=True)
    synthesize_batches(models, sampler, batches[:1], shots)
    runs = [synthesize_batches(models, sampler, batches, shots) for _ in range(args.repeats)]
    sampling = median(r[0] for r in runs)
    fss = median(r[1] for r in runs)
    clip = median(r[2] for r in runs)
    images = len(specs)
    with_masks = images / (sampling + fss + clip)

    # Capture vs stock: one batch, the same loop, interleaved rounds.
    first = batches[0]
    states = _states(sampler, first)
    variants = {
        "stock": timed(
            lambda: denoise(
                diffusion, first, states, steps=args.steps, size=args.size, capture=False
            ),
            device,
        ),
        "capture": timed(
            lambda: denoise(
                diffusion, first, states, steps=args.steps, size=args.size, capture=True
            ),
            device,
        ),
    }
    rounds = run_interleaved(variants, repeats=args.repeats)
    overhead = Ratio.paired(rounds["capture"], rounds["stock"])
    stock_rate = len(first) / median(rounds["stock"])
    memory = peak_bytes(device, lambda: list(sampler.generate(first)))

    inversion_config = replace(
        InversionConfig.tiny() if args.tiny else InversionConfig(),
        steps=args.inversion_steps,
        resolution=args.size,
    )
    images_np, masks_np = [s.image_array for s in shots], [s.mask for s in shots]
    invert(
        diffusion,
        images_np,
        masks_np,
        class_name=CLASS_NAME,
        config=replace(inversion_config, steps=2),
    )
    synchronize(device)
    start = time.perf_counter()
    invert(diffusion, images_np, masks_np, class_name=CLASS_NAME, config=inversion_config)
    synchronize(device)
    per_step = (time.perf_counter() - start) / args.inversion_steps
    reference_steps = InversionConfig.tiny().steps if args.tiny else REFERENCE_INVERSION_STEPS

    label = _label(args, device, batch)
    rows = [
        ["images/s with masks (sampling + capture + masks + FSS annotation + CLIP)",
         f"{with_masks:.3f}", f"{ceiling:.2f} images/s", f"{with_masks / ceiling:.1%}"],
        ["images/s sampling with capture and masks", f"{images / sampling:.3f}",
         f"{ceiling:.2f} images/s", f"{images / sampling / ceiling:.1%}"],
        ["images/s sampling, stock attention (same loop)", f"{stock_rate:.3f}",
         f"{ceiling:.2f} images/s", f"{stock_rate / ceiling:.1%}"],
        ["capture / stock time per batch", str(overhead), "1.05 (target)", "—"],
        [f"inversion s per class ({reference_steps} steps, from {args.inversion_steps} timed)",
         f"{per_step * reference_steps:.2f}", "—", "—"],
        ["CLIP + FSS share of generation time", f"{(fss + clip) / sampling:.1%}",
         "5% (target)", "—"],
        ["peak device memory, one sampling batch",
         format_bytes(memory) if memory is not None else "n/a (CPU)", "—", "—"],
    ]  # fmt: skip
    peak_source = "H100 default for the dtype" if default_peak(args) else "given"
    if vae_peak != args.peak_tflops:
        peak_source += f"; the VAE decode in {str(diffusion.vae.dtype)[6:]} at {vae_peak:g}"
    if device.type != "cuda":
        peak_source += f"; this run is on {device.type}: the ceiling is a GPU's, not this device's"
    table = markdown_table(["measure", "value", "FLOP ceiling / target", "of ceiling"], rows)
    notes = "\n".join(
        [
            f"FLOPs per image: {flops(total)} = {args.steps} steps × {flops(unet_call)} (UNet on "
            f"the CFG pair) + {flops(vae_decode)} (VAE decode), counted by FlopCounterMode; "
            f"ceiling at {args.peak_tflops:g} TFLOP/s "
            f"({peak_source}): {ceiling:.2f} images/s.",
            f"{images} images per run ({args.batches} batches of {batch}), median of "
            f"{args.repeats} runs after a warm-up batch; sampling {sampling:.2f} s, FSS "
            f"annotation + OOD {fss:.2f} s, CLIP {clip:.2f} s. Models built in {built:.1f} s.",
            TARGETS if args.family == "sd" else "No SDXL targets in DESIGN.md; " + TARGETS,
        ]
    )
    section = f"gpu: fast path — {label}"
    print(f"\n## {section}\n\n{table}\n\n{notes}\n")
    if args.write:
        record_results(
            section, command_line(), table, device=device, notes=notes, path=args.results
        )


def default_peak(args: argparse.Namespace) -> bool:
    return bool(args.peak_tflops == H100_PEAK_TFLOPS[args.dtype])


def flops(count: float) -> str:
    return f"{count / 1e12:.2f} TFLOP" if count >= 1e11 else f"{count / 1e9:.2f} GFLOP"


def _states(sampler: Sampler, specs: Sequence[SampleSpec]):  # type: ignore[no-untyped-def]
    with torch.inference_mode():
        pairs = [sampler._prompt_state(s.prompt) for s in specs]
    pooled = None if pairs[0][2] is None else torch.stack([p[2] for p in pairs])  # type: ignore[misc]
    cond, weights = torch.stack([p[0] for p in pairs]), torch.stack([p[1] for p in pairs])
    return sampler._uncond, cond, weights, sampler._uncond_pooled, pooled


def _label(args: argparse.Namespace, device: torch.device, batch: int) -> str:
    if args.family == "sdxl":
        models = "tiny-sdxl" if args.tiny else "SDXL base shapes, random weights"
    else:
        models = "tiny" if args.tiny else "SD 1.5 shapes, random weights"
    switches = [str(args.dtype).removeprefix("torch."), f"capture {args.capture}"]
    switches += [name for name, on in (("channels_last", args.channels_last),
                                       ("compile", args.compile),
                                       ("VAE slicing", args.vae_slicing)) if on]  # fmt: skip
    return (
        f"{models}, {args.size} px, {args.steps} steps, batch {batch}, {device.type}, "
        + ", ".join(switches)
    )


if __name__ == "__main__":
    main()
