"""Capture overhead per cross-attention layer at SD 1.5's 512 px shapes, and a proposed fix.

One `Attention` layer per resolution SD 1.5 has at 512 px (4096, 1024, 256 query positions;
320/640/1280 channels, 8 heads, 77 text tokens of 768), random weights, timed side by side in
interleaved rounds: stock `AttnProcessor2_0`, aligndiff's capturing processor in both modes, and
`ChunkedExplicit`: the explicit mode computed in query chunks whose probabilities hold at most
`CHUNK_ELEMENTS` floats. The chunked processor lives here, as an experiment: nothing in
`aligndiff/` changes. Its outputs and captured masses are compared with the explicit mode's.

Why chunks: at batch B the explicit mode materializes (2B, 8, 4096, 77) float32 scores and
probabilities, 10 MB per UNet row each. Above glibc's mmap threshold (at most 32 MiB) every such
tensor is a fresh mmap, page-faulted in and unmapped again on every layer call, which costs more
than the arithmetic. Chunks of a few MB stay in the allocator's cache.

Run: `python -m bench.capture_layers` (CPU, one thread, about a minute).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from diffusers.models.attention_processor import Attention, AttnProcessor2_0

from aligndiff.attention import AttentionCapture, CapturingCrossAttnProcessor
from bench.common import Ratio, benchmark_parser, report, run_interleaved, set_threads, timed

CHUNK_ELEMENTS = 1 << 20  # 4 MiB of float32 probabilities per chunk
# (channels, query positions) of SD 1.5's cross-attention layers at 512 px (8 heads each).
SD15_LAYERS = ((320, 4096), (640, 1024), (1280, 256))


class ChunkedExplicit(CapturingCrossAttnProcessor):
    """The explicit capture mode, computed `CHUNK_ELEMENTS` probabilities at a time (the
    proposed change to `CapturingCrossAttnProcessor`; no attention mask, no group/spatial norm,
    as in SD's cross-attention)."""

    def __call__(  # type: ignore[override]
        self,
        attn: Attention,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        temb: torch.Tensor | None = None,
        *args: object,
        **kwargs: object,
    ) -> torch.Tensor:
        capture = self.capture
        if encoder_hidden_states is None or capture is None or attention_mask is not None:
            return super().__call__(
                attn, hidden_states, encoder_hidden_states, attention_mask, temb
            )
        batch = hidden_states.shape[0]
        query = attn.to_q(hidden_states)
        key = attn.to_k(encoder_hidden_states)
        value = attn.to_v(encoder_hidden_states)
        head_dim = key.shape[-1] // attn.heads
        q = query.view(batch, -1, attn.heads, head_dim).transpose(1, 2)
        k_t = key.view(batch, -1, attn.heads, head_dim).permute(0, 2, 3, 1)
        v = value.view(batch, -1, attn.heads, head_dim).transpose(1, 2)
        positions, tokens = q.shape[2], k_t.shape[-1]
        step = max(1, CHUNK_ELEMENTS // (batch * attn.heads * tokens))
        start, rows = capture.conditional_offset, len(capture.token_weights)
        weights = capture.token_weights.to(q.device)
        out = q.new_empty((batch, positions, attn.heads, head_dim))
        mass = q.new_empty((rows, positions), dtype=torch.float32)
        for i in range(0, positions, step):
            probs = (torch.matmul(q[:, :, i : i + step], k_t) * attn.scale).softmax(dim=-1)
            conditional = probs[start : start + rows].float()
            mass[:, i : i + step] = torch.einsum("bhnt,bt->bn", conditional, weights) / attn.heads
            out[:, i : i + step] = torch.matmul(probs, v).transpose(1, 2)
        capture._accumulate(mass)
        hidden = out.reshape(batch, positions, attn.heads * head_dim)
        return attn.to_out[1](attn.to_out[0](hidden)) / attn.rescale_output_factor


def measure_layer(
    images: int,
    channels: int,
    positions: int,
    weights: torch.Tensor,
    *,
    device: torch.device,
    repeats: int,
) -> tuple[dict[str, list[float]], bool]:
    """Seconds per round of each processor on one layer, and whether the chunked explicit
    mode's output and captured mass equal the explicit mode's bit for bit."""
    attn = Attention(channels, cross_attention_dim=768, heads=8, dim_head=channels // 8)
    attn = attn.eval().to(device)
    x = torch.randn(2 * images, positions, channels, device=device)
    context = torch.randn(2 * images, 77, 768, device=device)
    captures = {
        name: AttentionCapture(weights, conditional_offset=images)
        for name in ("explicit", "sdpa", "chunked")
    }
    processors = {
        "stock": AttnProcessor2_0(),
        "explicit": CapturingCrossAttnProcessor(captures["explicit"], mode="explicit"),
        "sdpa": CapturingCrossAttnProcessor(captures["sdpa"], mode="sdpa"),
        "chunked": ChunkedExplicit(captures["chunked"]),
    }
    outputs: dict[str, torch.Tensor] = {}

    def call(name: str) -> None:
        with torch.inference_mode():
            outputs[name] = processors[name](attn, x, context)

    seconds = run_interleaved(
        {name: timed(lambda name=name: call(name), device) for name in processors},  # type: ignore[misc]
        repeats=repeats,
    )
    same = torch.equal(outputs["chunked"], outputs["explicit"]) and all(
        torch.equal(captures["chunked"].sums[n], captures["explicit"].sums[n])
        for n in captures["explicit"].sums
    )
    return seconds, same


def main(argv: Sequence[str] | None = None) -> None:
    parser = benchmark_parser(__doc__.splitlines()[0], steps=1, repeats=12)
    parser.add_argument("--batch-sizes", default="1,4", help="images per batch (CFG doubles)")
    args = parser.parse_args(argv)
    set_threads(args)
    device = torch.device(args.device)
    torch.manual_seed(0)
    rows: list[list[object]] = []
    for images in (int(b) for b in args.batch_sizes.split(",")):
        weights = torch.zeros(images, 77)
        weights[:, 5:7] = 1
        for channels, positions in SD15_LAYERS:
            seconds, same = measure_layer(
                images, channels, positions, weights, device=device, repeats=args.repeats
            )
            probs_mb = 2 * images * 8 * positions * 77 * 4 / 2**20
            rows.append(
                [
                    images,
                    f"{positions} ({channels} ch)",
                    f"{probs_mb:.0f} MiB",
                    f"{sorted(seconds['stock'])[len(seconds['stock']) // 2] * 1e3:.1f} ms",
                    *(
                        str(Ratio.paired(seconds[n], seconds["stock"]))
                        for n in seconds
                        if n != "stock"
                    ),
                    "yes" if same else "NO",
                ]
            )
            print(rows[-1], flush=True)
    report(
        f"capture_layers: capture overhead per cross-attention layer — SD 1.5 shapes, 512 px, "
        f"{device.type}",
        [
            "images (UNet rows ×2)",
            "query positions",
            "probabilities tensor",
            "stock layer time",
            "explicit / stock",
            "sdpa / stock",
            "chunked explicit / stock (proposed)",
            "chunked bit-identical to explicit",
        ],
        rows,
        args=args,
        device=device,
        notes=(
            f"{args.repeats} interleaved rounds per layer; ratios are medians of per-round ratios "
            "(IQR). A layer call includes the projections (to_q/k/v/out), as in the UNet. "
            f"Chunked: {CHUNK_ELEMENTS:,} probabilities per chunk; its output and captured mass "
            "are compared bit for bit with the explicit mode's."
        ),
    )


if __name__ == "__main__":
    main()
