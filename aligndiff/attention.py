"""Cross-attention capture: the class-name tokens' attention, summed while the UNet runs.

A capturing processor replaces the stock one on cross-attention layers only (self-attention
keeps the fused SDPA kernel). For each layer call it adds the attention probability mass on the
class-name tokens, averaged over heads, into one running sum per resolution, so the state is
(batch × query positions) per resolution whatever the number of steps: MBs, not the GBs of
storing every map of every step.

Two ways to compute a captured layer: "explicit" materializes the probabilities (softmax of
QKᵀ·scale), a few MB of query positions at a time, and reads the class-name columns; "sdpa"
(the default) keeps the fused kernel. On a CPU the fused kernel also returns each query's
log-sum-exp of scores, so the class-name mass is Σₜ wₜ·exp(sₜ − lse) over the name tokens
alone, and the output is the stock kernel's bit for bit. Elsewhere (and in a compiled UNet) the
token weights ride along as one more value channel, so that channel of the output is the
weighted attention mass itself: Σₜ softmax(·)ₜ·wₜ, no probability tensor at all. Either mode
skips the capture in layers whose resolution the coarse mask does not read
(`AttentionCapture.positions`).
"""

from __future__ import annotations

import math
from collections.abc import Collection, Iterator
from contextlib import contextmanager
from typing import Literal

import torch
import torch.nn.functional as F
from diffusers import UNet2DConditionModel
from diffusers.models.attention_processor import Attention, AttnProcessor2_0

CaptureMode = Literal["explicit", "sdpa"]
CAPTURE_MODES: tuple[CaptureMode, ...] = ("explicit", "sdpa")
# PyTorch's fused CPU attention that also returns the log-sum-exp of each query's scores (the
# "sdpa" capture mode's fast path on CPUs; a private ATen op, present since PyTorch 2.3).
_CPU_FUSED_WITH_LSE = hasattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu")
# Probabilities per chunk of the explicit mode: 4 MiB of float32, inside the allocator's cache.
EXPLICIT_CHUNK_ELEMENTS = 1 << 20


class AttentionCapture:
    """Running sums of cross-attention on selected tokens, one per resolution.

    `token_weights` (B, T) selects and weights the text tokens of each sample (1 on the class
    name's tokens). Under classifier-free guidance the UNet batch is [uncond; cond]: only rows
    `conditional_offset:` are read, the unconditional half carries no class information. Rows
    after the B conditional ones (a batch padded up to a compiled size) are ignored.
    `positions`: the query-position counts (resolutions) worth capturing; None: all.
    """

    def __init__(
        self,
        token_weights: torch.Tensor,
        *,
        conditional_offset: int = 0,
        positions: Collection[int] | None = None,
    ) -> None:
        self.token_weights = token_weights.float()
        self.conditional_offset = conditional_offset
        self.positions = None if positions is None else frozenset(positions)
        self.sums: dict[int, torch.Tensor] = {}  # query positions → (B, positions) float32
        self.counts: dict[int, int] = {}
        # The tokens some sample weights (the class name's): all the mass is on them.
        self.columns = self.token_weights.ne(0).any(dim=0).nonzero().flatten()

    def wants(self, positions: int) -> bool:
        """Whether layers with this many query positions are captured."""
        return self.positions is None or positions in self.positions

    def value_weights(self, rows: int) -> torch.Tensor:
        """(rows, T) float32: the token weights at the conditional rows of a UNet batch of
        `rows`, zero elsewhere (what the "sdpa" mode appends to the values)."""
        weights = self.token_weights.new_zeros((rows, self.token_weights.shape[1]))
        start = self.conditional_offset
        weights[start : start + len(self.token_weights)] = self.token_weights
        return weights

    def add(self, probs: torch.Tensor) -> None:
        """Accumulate one layer call's attention probabilities (B', heads, positions, T)."""
        start = self.conditional_offset
        rows = probs[start : start + len(self.token_weights)]
        weights = self.token_weights.to(rows.device)
        # (B, H, N, T) · (B, T) → (B, N), mean over heads; accumulated in float32.
        mass = torch.einsum("bhnt,bt->bn", rows.float(), weights) / rows.shape[1]
        self._accumulate(mass)

    def add_mass(self, mass: torch.Tensor) -> None:
        """Accumulate one layer call's weighted attention mass, already averaged over heads:
        (B', positions), every row of the UNet batch."""
        start = self.conditional_offset
        rows = mass[start : start + len(self.token_weights)]
        self._accumulate(rows.to(torch.float32, copy=True))

    def _accumulate(self, mass: torch.Tensor) -> None:
        positions = mass.shape[1]
        if positions in self.sums:
            self.sums[positions] += mass
            self.counts[positions] += 1
        else:
            self.sums[positions] = mass
            self.counts[positions] = 1

    def mean_maps(self) -> dict[int, torch.Tensor]:
        """Per resolution: the average over steps, heads and layers, (B, positions)."""
        return {n: self.sums[n] / self.counts[n] for n in self.sums}

    def coarse_masks(
        self, *, height: int, width: int, latent_size: tuple[int, int], resolutions: int = 3
    ) -> torch.Tensor:
        """Soft masks (B, height, width) in [0, 1] from the `resolutions` finest resolutions.

        Each resolution's map is upsampled bicubically to image size, clipped at 0 (bicubic
        overshoots), divided by its max, and the resolutions are averaged.
        """
        if not self.sums:
            raise RuntimeError("no cross-attention was captured")
        latent_h, latent_w = latent_size
        finest = sorted(self.sums, reverse=True)[:resolutions]
        maps = self.mean_maps()
        total = None
        for positions in finest:
            factor = math.sqrt(latent_h * latent_w / positions)
            h, w = round(latent_h / factor), round(latent_w / factor)
            grid = maps[positions].reshape(-1, 1, h, w)
            up = F.interpolate(grid, size=(height, width), mode="bicubic", align_corners=False)
            up = up.clamp_min(0)
            peak = up.amax(dim=(2, 3), keepdim=True).clamp_min(torch.finfo(up.dtype).tiny)
            total = up / peak if total is None else total + up / peak
        assert total is not None
        return (total / len(finest)).squeeze(1).clamp(0, 1)


class SharedCapture:
    """The capture state a UNet's shared processors read and write (`install_shared_capture`).

    A compiled UNet must keep its processors for life (swapping them invalidates the compiled
    code), so they hold this one object instead of a capture. Around each UNet call the eager
    caller (`BucketedUNet`) sets `weights` for the padded batch from the active capture, and
    afterwards hands the `masses` the processors appended to it. Inside the compiled graph
    this is plain tensor and list work, so the UNet compiles without graph breaks.
    """

    def __init__(self) -> None:
        self.capture: AttentionCapture | None = None  # read by the eager caller only
        self.weights: torch.Tensor | None = None  # (rows, T) for the call under way
        self.positions: frozenset[int] | None = None
        self.masses: list[torch.Tensor] = []

    def wants(self, positions: int) -> bool:
        return self.weights is not None and (self.positions is None or positions in self.positions)

    def begin(self, rows: int, device: torch.device) -> None:
        """Before a UNet call of `rows` (padded) rows."""
        capture = self.capture
        self.weights = None if capture is None else capture.value_weights(rows).to(device)
        self.positions = None if capture is None else capture.positions
        self.masses.clear()

    def end(self) -> None:
        """After the call: the appended masses go to the active capture."""
        if self.capture is not None:
            for mass in self.masses:
                self.capture.add_mass(mass)
        self.masses.clear()
        self.weights = None


class CapturingCrossAttnProcessor:
    """Cross-attention that feeds the class-name tokens' attention to a capture.

    The output equals the stock processor's; with no capture (or one that does not want this
    layer's resolution) it is the stock SDPA path. `mode` picks how a captured layer computes:
    "explicit" probabilities, or "sdpa" with the weights as an extra value channel. `shared`:
    the capture is the one `capturing_cross_attention` made active, not `capture`.
    """

    def __init__(
        self,
        capture: AttentionCapture | None = None,
        *,
        mode: CaptureMode = "explicit",
        shared: SharedCapture | None = None,
    ) -> None:
        if mode not in CAPTURE_MODES:
            raise ValueError(f"unknown capture mode {mode!r}; use one of {CAPTURE_MODES}")
        self.capture = capture
        self.mode = mode
        self.shared = shared
        self._fallback = AttnProcessor2_0()

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
        if encoder_hidden_states is None or (self.capture is None and self.shared is None):
            return self._fallback(attn, hidden_states, encoder_hidden_states, attention_mask, temb)
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            batch, channel, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch, channel, height * width).transpose(1, 2)
        batch, positions = hidden_states.shape[0], hidden_states.shape[1]
        weights: torch.Tensor | None = None
        if self.shared is not None:
            if not self.shared.wants(positions):
                return self._fallback(attn, residual, encoder_hidden_states, attention_mask, temb)
            weights = self.shared.weights
        else:
            assert self.capture is not None
            if not self.capture.wants(positions):
                return self._fallback(attn, residual, encoder_hidden_states, attention_mask, temb)
            if self.mode == "sdpa":
                weights = self.capture.value_weights(batch).to(hidden_states.device)
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        if attn.norm_cross:
            encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)

        query = attn.to_q(hidden_states)
        key = attn.to_k(encoder_hidden_states)
        value = attn.to_v(encoder_hidden_states)
        head_dim = key.shape[-1] // attn.heads
        query = query.view(batch, -1, attn.heads, head_dim).transpose(1, 2)
        key = key.view(batch, -1, attn.heads, head_dim).transpose(1, 2)
        value = value.view(batch, -1, attn.heads, head_dim).transpose(1, 2)
        mask = None
        if attention_mask is not None:
            mask = attn.prepare_attention_mask(attention_mask, key.shape[2], batch)
            mask = mask.view(batch, attn.heads, -1, mask.shape[-1])

        if self.mode == "explicit":
            hidden_states = self._explicit_with_mass(query, key, value, mask, weights, attn.scale)
        else:
            assert weights is not None
            hidden_states = self._sdpa_with_mass(query, key, value, mask, weights, attn.scale)

        hidden_states = hidden_states.transpose(1, 2).reshape(batch, -1, attn.heads * head_dim)
        hidden_states = attn.to_out[1](attn.to_out[0](hidden_states))
        if input_ndim == 4:
            hidden_states = hidden_states.transpose(-1, -2).reshape(batch, channel, height, width)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        return hidden_states / attn.rescale_output_factor

    def _explicit_with_mass(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        mask: torch.Tensor | None,
        weights: torch.Tensor | None,
        scale: float,
    ) -> torch.Tensor:
        """softmax(QKᵀ·scale)·V, with the class-name mass of the probabilities captured.

        Computed in chunks of query positions whose probabilities hold at most
        `EXPLICIT_CHUNK_ELEMENTS` floats, each chunk's output and mass written into
        preallocated tensors: one (2B, heads, 4096, 77) float32 tensor at 512 px is tens of
        MB, above the allocator's mmap threshold, so unchunked every layer call page-faults
        fresh memory in and out, which cost more than the arithmetic (bench/capture_layers.py).
        Each query row's softmax and product are computed as whole; chunks of tens of positions
        give the unchunked computation's very bits (a test), smaller ones may round differently.
        `weights` (rows, T) weight every row of the batch (shared capture); None: the
        capture's own weights on its conditional rows.
        """
        batch, heads, positions, head_dim = query.shape
        tokens = key.shape[2]
        if weights is None:
            assert self.capture is not None
            start, rows = self.capture.conditional_offset, len(self.capture.token_weights)
            weights = self.capture.token_weights.to(query.device)
        else:
            start, rows = 0, batch
            weights = weights.float()
        key_t = key.transpose(-1, -2)
        out = query.new_empty((batch, positions, heads, head_dim))
        mass = query.new_empty((rows, positions), dtype=torch.float32)
        step = max(1, EXPLICIT_CHUNK_ELEMENTS // (batch * heads * tokens))
        for i in range(0, positions, step):
            scores = torch.matmul(query[:, :, i : i + step], key_t) * scale
            if mask is not None:
                scores = scores + (mask if mask.shape[-2] == 1 else mask[..., i : i + step, :])
            probs = scores.softmax(dim=-1)
            rows_probs = probs[start : start + rows].float()
            mass[:, i : i + step] = torch.einsum("bhnt,bt->bn", rows_probs, weights) / heads
            out[:, i : i + step] = torch.matmul(probs, value).transpose(1, 2)
        if self.shared is not None:
            self.shared.masses.append(mass)
        else:
            assert self.capture is not None
            self.capture._accumulate(mass)
        return out.transpose(1, 2)

    def _sdpa_with_mass(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        mask: torch.Tensor | None,
        weights: torch.Tensor,
        scale: float,
    ) -> torch.Tensor:
        """Fused attention over values [V | w | 0…]: channel `head_dim` of the output is
        Σₜ pₜ·wₜ per head. Query and key get zero channels to match (their dot products are
        unchanged) so every head has one size, a multiple of 8, which fused kernels need."""
        if self.shared is None and query.device.type == "cpu" and _CPU_FUSED_WITH_LSE:
            return self._fused_with_lse(query, key, value, mask, scale)
        batch, heads, tokens, head_dim = value.shape
        extra = 1 + (-(head_dim + 1)) % 8
        column = weights.to(value.dtype)[:, None, :, None].expand(batch, heads, tokens, 1)
        padding = value.new_zeros((batch, heads, tokens, extra - 1))
        value = torch.cat([value, column, padding], dim=-1)
        query = F.pad(query, (0, extra))
        key = F.pad(key, (0, extra))
        out = F.scaled_dot_product_attention(query, key, value, attn_mask=mask, scale=scale)
        self._add_mass(out[..., head_dim].mean(dim=1))
        return out[..., :head_dim]

    def _fused_with_lse(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        mask: torch.Tensor | None,
        scale: float,
    ) -> torch.Tensor:
        """The fused CPU kernel, which also returns each query's log-sum-exp of its scores
        (`lse`): the output is the stock processor's bit for bit, and the class-name mass is
        Σₜ wₜ·exp(sₜ − lse) over the few weighted tokens only, a (positions × name tokens)
        product per head instead of a probabilities tensor."""
        capture = self.capture
        assert capture is not None
        output, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            query, key, value, 0.0, False, attn_mask=mask, scale=scale
        )[:2]
        start = capture.conditional_offset
        rows = slice(start, start + len(capture.token_weights))
        columns = capture.columns.to(query.device)
        names = key[rows].index_select(2, columns).float()
        # NOTE: products summed per name token, not a batched matmul: a matmul's rounding
        # depends on the batch it runs in (BLAS picks kernels and threads by shape), and a
        # sample's coarse mask must be the same alone as in any batch.
        conditional = query[rows].float()
        scores = (
            torch.stack(
                [(conditional * names[:, :, t : t + 1]).sum(-1) for t in range(names.shape[2])],
                dim=-1,
            )
            * scale
        )
        if mask is not None:
            scores = scores + mask[rows].index_select(-1, columns).float()
        probs = torch.exp(scores - lse[rows].unsqueeze(-1))
        weights = capture.token_weights.to(query.device).index_select(1, columns)
        capture._accumulate((probs * weights[:, None, None, :]).sum(-1).mean(dim=1))
        return output

    def _add_mass(self, mass: torch.Tensor) -> None:
        if self.shared is not None:
            self.shared.masses.append(mass)
        else:
            assert self.capture is not None
            self.capture.add_mass(mass)


def is_cross_attention(processor_name: str) -> bool:
    # diffusers names SD's transformer-block attentions attn1 (self) and attn2 (cross).
    return processor_name.endswith("attn2.processor")


def cross_attention_positions(
    unet: UNet2DConditionModel, latent_size: tuple[int, int]
) -> dict[str, int]:
    """Query positions of every cross-attention layer for a latent of `latent_size`.

    Down block i works at the latent size halved i times (rounding up, as a stride-2 conv
    with padding 1 does), the mid block at the last down block's, up block j mirrors down
    block n-1-j.
    """
    levels = len(unet.config.block_out_channels)
    h, w = latent_size
    sizes = []
    for _ in range(levels):
        sizes.append(h * w)
        h, w = (h + 1) // 2, (w + 1) // 2
    positions = {}
    for name in unet.attn_processors:
        if not is_cross_attention(name):
            continue
        block, _, rest = name.partition(".")
        if block == "mid_block":
            level = levels - 1
        else:
            index = int(rest.split(".", 1)[0])
            level = index if block == "down_blocks" else levels - 1 - index
        positions[name] = sizes[level]
    return positions


def finest_positions(
    unet: UNet2DConditionModel, latent_size: tuple[int, int], resolutions: int
) -> frozenset[int]:
    """The `resolutions` finest query-position counts among the cross-attention layers:
    the maps `coarse_masks` reads, so the only ones worth capturing."""
    counts = set(cross_attention_positions(unet, latent_size).values())
    return frozenset(sorted(counts, reverse=True)[:resolutions])


def install_shared_capture(
    unet: UNet2DConditionModel, *, mode: CaptureMode = "sdpa"
) -> SharedCapture:
    """Give the UNet capturing processors for good (a compiled UNet must keep its modules).

    They capture into whatever `capturing_cross_attention` makes active, nothing otherwise;
    the caller of the UNet brackets each call with the returned state's `begin` and `end`.
    """
    shared = SharedCapture()
    processor = CapturingCrossAttnProcessor(mode=mode, shared=shared)
    unet.set_attn_processor(
        {
            name: processor if is_cross_attention(name) else AttnProcessor2_0()
            for name in unet.attn_processors
        }
    )
    unet._aligndiff_shared_capture = shared  # type: ignore[assignment]
    return shared


def shared_capture(unet: UNet2DConditionModel) -> SharedCapture | None:
    """The UNet's shared capture state, if `install_shared_capture` gave it one."""
    shared = getattr(unet, "_aligndiff_shared_capture", None)
    return shared if isinstance(shared, SharedCapture) else None


@contextmanager
def capturing_cross_attention(
    unet: UNet2DConditionModel, capture: AttentionCapture, *, mode: CaptureMode = "explicit"
) -> Iterator[AttentionCapture]:
    """Capture the UNet's cross-attention into `capture` for a block of code.

    Installs capturing processors on the cross-attention layers (self-attention gets the stock
    SDPA processor), and the previous processors come back after. A UNet with shared
    processors keeps them: `capture` is made the active one instead.
    """
    shared = shared_capture(unet)
    if shared is not None:
        previous_capture, shared.capture = shared.capture, capture
        try:
            yield capture
        finally:
            shared.capture = previous_capture
        return
    previous = dict(unet.attn_processors)
    processor = CapturingCrossAttnProcessor(capture, mode=mode)
    unet.set_attn_processor(
        {name: processor if is_cross_attention(name) else AttnProcessor2_0() for name in previous}
    )
    try:
        yield capture
    finally:
        unet.set_attn_processor(previous)
