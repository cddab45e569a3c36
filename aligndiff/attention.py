"""Cross-attention capture: the class-name tokens' attention, summed while the UNet runs.

A capturing processor replaces the stock one on cross-attention layers only (self-attention
keeps the fused SDPA kernel). For each layer call it adds the attention probability mass on the
class-name tokens, averaged over heads, into one running sum per resolution, so the state is
(batch × query positions) per resolution whatever the number of steps: MBs, not the GBs of
storing every map of every step.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from diffusers import UNet2DConditionModel
from diffusers.models.attention_processor import Attention, AttnProcessor2_0


class AttentionCapture:
    """Running sums of cross-attention on selected tokens, one per resolution.

    `token_weights` (B, T) selects and weights the text tokens of each sample (1 on the class
    name's tokens). Under classifier-free guidance the UNet batch is [uncond; cond]: only rows
    `conditional_offset:` are read, the unconditional half carries no class information.
    """

    def __init__(self, token_weights: torch.Tensor, *, conditional_offset: int = 0) -> None:
        self.token_weights = token_weights.float()
        self.conditional_offset = conditional_offset
        self.sums: dict[int, torch.Tensor] = {}  # query positions → (B, positions) float32
        self.counts: dict[int, int] = {}

    def add(self, probs: torch.Tensor) -> None:
        """Accumulate one layer call's attention probabilities (B', heads, positions, T)."""
        rows = probs[self.conditional_offset :]
        weights = self.token_weights.to(rows.device)
        # (B, H, N, T) · (B, T) → (B, N), mean over heads; accumulated in float32.
        mass = torch.einsum("bhnt,bt->bn", rows.float(), weights) / rows.shape[1]
        positions = rows.shape[2]
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


class CapturingCrossAttnProcessor:
    """Cross-attention that computes its probabilities explicitly and feeds them to a capture.

    The output equals the stock processor's; with `capture` unset it is the stock SDPA path.
    """

    def __init__(self, capture: AttentionCapture | None = None) -> None:
        self.capture = capture
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
        if self.capture is None or encoder_hidden_states is None:
            return self._fallback(attn, hidden_states, encoder_hidden_states, attention_mask, temb)
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            batch, channel, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch, channel, height * width).transpose(1, 2)
        batch = hidden_states.shape[0]
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

        scores = torch.matmul(query, key.transpose(-1, -2)) * attn.scale
        if attention_mask is not None:
            mask = attn.prepare_attention_mask(attention_mask, key.shape[2], batch)
            scores = scores + mask.view(batch, attn.heads, -1, mask.shape[-1])
        probs = scores.softmax(dim=-1)
        self.capture.add(probs)
        hidden_states = torch.matmul(probs, value)

        hidden_states = hidden_states.transpose(1, 2).reshape(batch, -1, attn.heads * head_dim)
        hidden_states = attn.to_out[1](attn.to_out[0](hidden_states))
        if input_ndim == 4:
            hidden_states = hidden_states.transpose(-1, -2).reshape(batch, channel, height, width)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        return hidden_states / attn.rescale_output_factor


def is_cross_attention(processor_name: str) -> bool:
    # diffusers names SD's transformer-block attentions attn1 (self) and attn2 (cross).
    return processor_name.endswith("attn2.processor")


@contextmanager
def capturing_cross_attention(
    unet: UNet2DConditionModel, capture: AttentionCapture
) -> Iterator[AttentionCapture]:
    """Install capturing processors on the UNet's cross-attention layers for a block of code.

    Self-attention layers get the stock SDPA processor; the previous processors come back after.
    """
    previous = dict(unet.attn_processors)
    processor = CapturingCrossAttnProcessor(capture)
    unet.set_attn_processor(
        {name: processor if is_cross_attention(name) else AttnProcessor2_0() for name in previous}
    )
    try:
        yield capture
    finally:
        unet.set_attn_processor(previous)
