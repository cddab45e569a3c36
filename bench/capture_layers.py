"""Capture overhead per cross-attention layer at full shapes: SD 1.5 at 512 px, SDXL at 1024 px.

One `Attention` layer per resolution the model captures at (SD 1.5: 4096, 1024, 256 query
positions, 8 heads, 77 text tokens of 768; SDXL: 4096 positions with 10 heads and 1024 with 20,
text of 2048), random weights, timed side by side in interleaved rounds: stock
`AttnProcessor2_0`, aligndiff's capturing processor in both modes, and the explicit mode as it
was before it was chunked (one probabilities tensor for all query positions; here by raising
`EXPLICIT_CHUNK_ELEMENTS` past the layer's size). The chunked output and captured mass are
compared with the unchunked ones bit for bit.

Why chunks: at batch B the unchunked explicit mode materialized (2B, heads, 4096, 77) float32
scores and probabilities, 10 MB per UNet row each. Above glibc's mmap threshold (at most 32 MiB)
every such tensor is a fresh mmap, page-faulted in and unmapped again on every layer call,
which cost more than the arithmetic. Chunks of 4 MiB stay in the allocator's cache.

Run: `python -m bench.capture_layers [--family sdxl]` (CPU, one thread, a minute or a few).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import NamedTuple

import torch
from diffusers.models.attention_processor import Attention, AttnProcessor2_0

from aligndiff import attention
from aligndiff.attention import AttentionCapture, CapturingCrossAttnProcessor
from bench.common import Ratio, benchmark_parser, report, run_interleaved, set_threads, timed


class Layer(NamedTuple):
    channels: int
    positions: int
    heads: int


# The cross-attention layers each family captures at its native resolution.
LAYERS = {
    "sd": (Layer(320, 4096, 8), Layer(640, 1024, 8), Layer(1280, 256, 8)),
    "sdxl": (Layer(640, 4096, 10), Layer(1280, 1024, 20)),
}
TEXT_WIDTH = {"sd": 768, "sdxl": 2048}
RESOLUTION = {"sd": 512, "sdxl": 1024}
VARIANTS = ("stock", "explicit", "sdpa", "unchunked explicit")


def unchunked(processor: CapturingCrossAttnProcessor) -> Callable[..., torch.Tensor]:
    """The processor with one chunk for every query position (the explicit mode before)."""

    def call(*args: object) -> torch.Tensor:
        before = attention.EXPLICIT_CHUNK_ELEMENTS
        attention.EXPLICIT_CHUNK_ELEMENTS = 1 << 62
        try:
            return processor(*args)  # type: ignore[arg-type]
        finally:
            attention.EXPLICIT_CHUNK_ELEMENTS = before

    return call


def measure_layer(
    images: int,
    layer: Layer,
    weights: torch.Tensor,
    *,
    text_width: int,
    device: torch.device,
    repeats: int,
) -> tuple[dict[str, list[float]], bool]:
    """Seconds per round of each variant on one layer, and whether the chunked explicit mode's
    output and captured mass equal the unchunked mode's bit for bit."""
    attn = Attention(
        layer.channels,
        cross_attention_dim=text_width,
        heads=layer.heads,
        dim_head=layer.channels // layer.heads,
    )
    attn = attn.eval().to(device)
    x = torch.randn(2 * images, layer.positions, layer.channels, device=device)
    context = torch.randn(2 * images, 77, text_width, device=device)
    captures = {name: AttentionCapture(weights, conditional_offset=images) for name in VARIANTS}
    processors: dict[str, Callable[..., torch.Tensor]] = {
        "stock": AttnProcessor2_0(),
        "explicit": CapturingCrossAttnProcessor(captures["explicit"], mode="explicit"),
        "sdpa": CapturingCrossAttnProcessor(captures["sdpa"], mode="sdpa"),
        "unchunked explicit": unchunked(
            CapturingCrossAttnProcessor(captures["unchunked explicit"], mode="explicit")
        ),
    }
    outputs: dict[str, torch.Tensor] = {}

    def call(name: str) -> None:
        with torch.inference_mode():
            outputs[name] = processors[name](attn, x, context)

    seconds = run_interleaved(
        {name: timed(lambda name=name: call(name), device) for name in processors},  # type: ignore[misc]
        repeats=repeats,
    )
    before, after = captures["unchunked explicit"], captures["explicit"]
    same = torch.equal(outputs["explicit"], outputs["unchunked explicit"]) and all(
        torch.equal(after.sums[n], before.sums[n]) for n in before.sums
    )
    return seconds, same


def main(argv: Sequence[str] | None = None) -> None:
    parser = benchmark_parser(__doc__.splitlines()[0], steps=1, repeats=12)
    parser.add_argument("--batch-sizes", default="1,4", help="images per batch (CFG doubles)")
    parser.add_argument("--family", choices=sorted(LAYERS), default="sd")
    args = parser.parse_args(argv)
    set_threads(args)
    device = torch.device(args.device)
    torch.manual_seed(0)
    rows: list[list[object]] = []
    for images in (int(b) for b in args.batch_sizes.split(",")):
        weights = torch.zeros(images, 77)
        weights[:, 5:7] = 1
        for layer in LAYERS[args.family]:
            seconds, same = measure_layer(
                images,
                layer,
                weights,
                text_width=TEXT_WIDTH[args.family],
                device=device,
                repeats=args.repeats,
            )
            probs_mb = 2 * images * layer.heads * layer.positions * 77 * 4 / 2**20
            stock = sorted(seconds["stock"])[len(seconds["stock"]) // 2]
            rows.append(
                [
                    images,
                    f"{layer.positions} ({layer.channels} ch, {layer.heads} heads)",
                    f"{probs_mb:.0f} MiB",
                    f"{stock * 1e3:.1f} ms",
                    *(str(Ratio.paired(seconds[n], seconds["stock"])) for n in VARIANTS[1:]),
                    "yes" if same else "NO",
                ]
            )
            print(rows[-1], flush=True)
    family = "SD 1.5" if args.family == "sd" else "SDXL"
    report(
        f"capture_layers: capture overhead per cross-attention layer — {family} shapes, "
        f"{RESOLUTION[args.family]} px, {device.type}",
        [
            "images (UNet rows ×2)",
            "query positions",
            "probabilities tensor (unchunked)",
            "stock layer time",
            "explicit (chunked) / stock",
            "sdpa / stock",
            "unchunked explicit / stock (before)",
            "chunked bit-identical to unchunked",
        ],
        rows,
        args=args,
        device=device,
        notes=(
            f"{args.repeats} interleaved rounds per layer; ratios are medians of per-round ratios "
            "(IQR). A layer call includes the projections (to_q/k/v/out), as in the UNet. "
            f"Chunks of {attention.EXPLICIT_CHUNK_ELEMENTS:,} probabilities; the chunked output "
            "and captured mass are compared bit for bit with one chunk for all positions."
        ),
    )


if __name__ == "__main__":
    main()
