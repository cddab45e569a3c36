"""Stage share: seconds per stage of one `synthesize` run, and annotation + scoring vs sampling.

The target (DESIGN.md) is CLIP + FSS work <= 5% of generation time at SD scale on a GPU. The
run goes through `aligndiff.synth.synthesize` on the real dog shots; `result.stage_seconds`
gives the split ("annotation" includes the OOD filter). One warm-up run, then `--repeats` runs;
each stage's median is reported.

Run: `python -m bench.stage_share` (tiny, CPU), or on a GPU
`python -m bench.stage_share --full --device cuda --dtype float16`.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from typing import Any

import torch
from transformers import CLIPConfig, CLIPImageProcessorPil, CLIPModel, Dinov2Config, Dinov2Model

from aligndiff.fss import PrototypeSegmenter
from aligndiff.models.backbone import IMAGENET_MEAN, IMAGENET_STD, BackboneBundle
from aligndiff.models.clip import ClipBundle
from aligndiff.models.diffusion import resolve_dtype
from aligndiff.scoring import ClipScorer
from aligndiff.settings import TINY, Settings
from aligndiff.shots import load_shots
from aligndiff.synth import Models, SynthConfig, load_models, synthesize
from bench.common import (
    CLASS_NAME,
    benchmark_parser,
    format_seconds,
    median,
    model_cache_dir,
    plural,
    report,
    set_threads,
    setup_label,
    verdict,
    with_run_options,
)
from bench.sd15 import (
    CLIP_VIT_L14_TEXT_CONFIG,
    build_sd15,
    special_token_ids,
    tiny_tokenizer,
)

STAGES = ("inversion", "sampling", "annotation", "scoring")
TARGET_SHARE = 0.05
TINY_CAVEAT = (
    "The tiny setup shrinks sampling far more than annotation and scoring: its UNet has "
    "~1/500 of SD 1.5's parameters and runs 5 steps on 16x16 latents instead of 50 on 64x64, "
    "while the FSS and CLIP work keeps its per-sample Python and image handling (resizing, "
    "masks, IoUs, one calibration per sample in the OOD filter)."
)


# openai/clip-vit-large-patch14's vision tower and facebook/dinov2-small, as in their
# config.json files (the README's real-weights example uses these two).
CLIP_VIT_L14_VISION_CONFIG: dict[str, Any] = {
    "image_size": 224,
    "patch_size": 14,
    "hidden_size": 1024,
    "intermediate_size": 4096,
    "num_hidden_layers": 24,
    "num_attention_heads": 16,
}
DINOV2_SMALL_CONFIG: dict[str, Any] = {
    "hidden_size": 384,
    "num_hidden_layers": 12,
    "num_attention_heads": 6,
    "mlp_ratio": 4,
    "patch_size": 14,
    "image_size": 518,
}


def frozen(model: torch.nn.Module, dtype: torch.dtype) -> None:
    model.to(dtype=dtype).eval().requires_grad_(False)  # type: ignore[call-arg]


def clip_vit_l14(device: torch.device, dtype: torch.dtype) -> ClipBundle:
    """CLIP ViT-L/14 (224 px) with random weights and the tiny tokenizer."""
    tokenizer = tiny_tokenizer()
    text_config = {**CLIP_VIT_L14_TEXT_CONFIG, **special_token_ids(tokenizer)}
    config = CLIPConfig(
        text_config=text_config, vision_config=CLIP_VIT_L14_VISION_CONFIG, projection_dim=768
    )
    with device:
        model = CLIPModel(config)
    frozen(model, dtype)
    size = CLIP_VIT_L14_VISION_CONFIG["image_size"]
    processor = CLIPImageProcessorPil(
        size={"shortest_edge": size}, crop_size={"height": size, "width": size}
    )
    return ClipBundle(model, tokenizer, processor, model_id="clip-vit-l14-random-weights")


def dinov2_small(device: torch.device, dtype: torch.dtype) -> BackboneBundle:
    """DINOv2-small at its native 518 px (what `load_backbone` picks for it), random weights."""
    with device:
        model = Dinov2Model(Dinov2Config(**DINOV2_SMALL_CONFIG))
    frozen(model, dtype)
    return BackboneBundle(
        model=model,
        image_size=DINOV2_SMALL_CONFIG["image_size"],
        mean=IMAGENET_MEAN,
        std=IMAGENET_STD,
        patch_size=DINOV2_SMALL_CONFIG["patch_size"],
        model_id="dinov2-small-random-weights",
        device=device,
        dtype=dtype,
    )


def build_models(args: argparse.Namespace) -> Models:
    set_threads(args)
    if not args.full:
        settings = Settings(
            diffusion_model=TINY,
            clip_model=TINY,
            fss_backbone=TINY,
            model_cache_dir=model_cache_dir(args),
        )
        return load_models(settings, device=args.device, dtype=args.dtype)
    device, dtype = torch.device(args.device), resolve_dtype(args.dtype)
    return Models(
        diffusion=build_sd15(device=device, dtype=dtype),
        segmenter=PrototypeSegmenter(dinov2_small(device, dtype)),
        scorer=ClipScorer(clip_vit_l14(device, dtype)),
    )


def parameters(module: torch.nn.Module) -> str:
    return f"{sum(p.numel() for p in module.parameters()) / 1e6:.1f} M"


def main(argv: Sequence[str] | None = None) -> None:
    parser = benchmark_parser(__doc__.splitlines()[0], steps=None, repeats=5, shots=True)
    parser.add_argument("--samples", type=int, default=8, help="samples per run (default 8)")
    parser.add_argument(
        "--inversion-steps",
        type=int,
        default=20,
        help="inversion steps (default 20: inversion is outside the share measured here)",
    )
    args = parser.parse_args(argv)
    models = build_models(args)
    diffusion = models.diffusion
    label = setup_label(args, diffusion)

    base = SynthConfig.for_model("sd15" if args.full else TINY)
    config = with_run_options(base, args)
    shots = load_shots(args.shots)

    runs = []
    print(f"{args.repeats} + 1 warm-up synthesize runs of {args.samples} samples ({label}) …")
    for _ in range(args.repeats + 1):
        result = synthesize(
            models,
            shots,
            class_name=CLASS_NAME,
            num_samples=args.samples,
            seed=0,
            config=config,
        )
        runs.append(result.stage_seconds)
    seconds = {stage: median(run[stage] for run in runs[1:]) for stage in STAGES}

    sampling = seconds["sampling"]
    share = (seconds["annotation"] + seconds["scoring"]) / sampling
    report(
        f"stage_share: annotation + scoring vs sampling — {label}",
        ["stage", "seconds (median)", "per sample", "vs sampling"],
        [
            [
                stage,
                f"{seconds[stage]:.3f}",
                "—" if stage == "inversion" else format_seconds(seconds[stage] / args.samples),
                f"{seconds[stage] / sampling:.1%}",
            ]
            for stage in STAGES
        ],
        args=args,
        device=diffusion.device,
        notes="\n".join(
            [
                f"`synthesize` on {plural(len(shots), 'dog shot')}, {args.samples} samples, "
                f"{config.sampling.num_steps} sampling steps (batch {config.sampling.batch_size}), "
                f"{config.inversion.steps} inversion steps; median of {args.repeats} runs after "
                "a warm-up.",
                f"**(annotation + scoring) / sampling = {share:.1%}** (target <= "
                f"{TARGET_SHARE:.0%} at SD scale on a GPU: {verdict(share <= TARGET_SHARE)} in "
                "this setup).",
                f"Model sizes: UNet {parameters(diffusion.unet)}, VAE {parameters(diffusion.vae)}, "
                f"FSS backbone {parameters(models.segmenter.backbone.model)}, "  # type: ignore[attr-defined]
                f"CLIP {parameters(models.scorer.bundle.model)}.",
                "" if args.full else TINY_CAVEAT,
            ]
        ),
    )


if __name__ == "__main__":
    main()
