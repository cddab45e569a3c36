"""Cross-attention capture: exact maps, unchanged outputs, constant-size state."""

from __future__ import annotations

import pytest
import torch
from diffusers.models.attention_processor import AttnProcessor2_0

from aligndiff import attention
from aligndiff.attention import (
    AttentionCapture,
    CapturingCrossAttnProcessor,
    capturing_cross_attention,
)
from aligndiff.models.diffusion import DiffusionModel
from aligndiff.prompts import prompt_bank
from aligndiff.sampling import Sampler, SamplingConfig


@pytest.fixture
def cross_attention(tiny_sd: DiffusionModel) -> torch.nn.Module:
    return tiny_sd.unet.down_blocks[0].attentions[0].transformer_blocks[0].attn2


def random_inputs(batch: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    hidden = torch.randn((batch, 256, 32), generator=generator)
    text = torch.randn((batch, 77, 64), generator=generator)
    weights = (torch.rand((batch // 2, 77), generator=generator) > 0.8).float()
    return hidden, text, weights


def test_captured_maps_equal_an_explicit_softmax_reference(cross_attention) -> None:
    # given: a [uncond; cond] batch and token weights for the conditional half
    hidden, text, weights = random_inputs(batch=4)
    capture = AttentionCapture(weights, conditional_offset=2)

    # when: the capturing processor runs once
    with torch.inference_mode():
        CapturingCrossAttnProcessor(capture)(cross_attention, hidden, text)

    # then: the sum equals softmax(QKᵀ·scale) weighted over tokens, averaged over heads
    attn = cross_attention
    with torch.inference_mode():
        q = attn.to_q(hidden[2:]).view(2, 256, attn.heads, -1).transpose(1, 2)
        k = attn.to_k(text[2:]).view(2, 77, attn.heads, -1).transpose(1, 2)
        probs = (q @ k.transpose(-1, -2) * attn.scale).softmax(dim=-1)
        expected = (probs * weights[:, None, None, :]).sum(-1).mean(1)
    assert capture.counts == {256: 1}
    torch.testing.assert_close(capture.sums[256], expected, rtol=1e-5, atol=1e-6)


def test_capturing_does_not_change_the_attention_output(cross_attention) -> None:
    hidden, text, weights = random_inputs(batch=4)

    with torch.inference_mode():
        stock = AttnProcessor2_0()(cross_attention, hidden, text)
        captured = CapturingCrossAttnProcessor(AttentionCapture(weights, conditional_offset=2))(
            cross_attention, hidden, text
        )

    torch.testing.assert_close(captured, stock, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("masked", [False, True])
def test_both_capture_modes_capture_the_same_maps(cross_attention, masked) -> None:
    # given: a [uncond; cond] batch, with or without a text mask hiding the last 40 tokens
    hidden, text, weights = random_inputs(batch=4)
    bias = None
    if masked:
        bias = torch.zeros((4, 77))
        bias[:, 37:] = -10000.0

    outputs, sums = {}, {}
    with torch.inference_mode():
        stock = AttnProcessor2_0()(cross_attention, hidden, text, attention_mask=bias)
        for mode in ("explicit", "sdpa"):
            capture = AttentionCapture(weights, conditional_offset=2)
            processor = CapturingCrossAttnProcessor(capture, mode=mode)
            outputs[mode] = processor(cross_attention, hidden, text, attention_mask=bias)
            sums[mode] = capture.sums[256]

    # then: the fused mode's output is the stock kernel's, and its maps the explicit ones
    assert torch.equal(outputs["sdpa"], stock)
    torch.testing.assert_close(outputs["explicit"], stock, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(sums["sdpa"], sums["explicit"], rtol=1e-5, atol=1e-6)


def test_explicit_capture_in_query_chunks_changes_no_bit(cross_attention, monkeypatch) -> None:
    # given: the same layer call computed whole, then in chunks of a few query positions
    hidden, text, weights = random_inputs(batch=4)
    results = []
    for chunk in (attention.EXPLICIT_CHUNK_ELEMENTS, 4 * cross_attention.heads * 77 * 64):
        monkeypatch.setattr(attention, "EXPLICIT_CHUNK_ELEMENTS", chunk)
        capture = AttentionCapture(weights, conditional_offset=2)
        with torch.inference_mode():
            output = CapturingCrossAttnProcessor(capture)(cross_attention, hidden, text)
        results.append((output, capture.sums[256]))

    # then: 4 chunks of 64 positions give the very bits of one chunk of 256
    (whole_out, whole_sum), (chunked_out, chunked_sum) = results
    assert torch.equal(chunked_out, whole_out)
    assert torch.equal(chunked_sum, whole_sum)


def test_explicit_capture_honours_an_attention_mask(cross_attention) -> None:
    # given: a text mask hiding the last 40 tokens
    hidden, text, weights = random_inputs(batch=4)
    text_mask = torch.ones((4, 77))
    text_mask[:, 37:] = 0
    bias = (1 - text_mask) * -10000.0

    with torch.inference_mode():
        stock = AttnProcessor2_0()(cross_attention, hidden, text, attention_mask=bias)
        capture = AttentionCapture(weights, conditional_offset=2)
        captured = CapturingCrossAttnProcessor(capture)(
            cross_attention, hidden, text, attention_mask=bias
        )
        only_visible = AttentionCapture(weights[:, :37], conditional_offset=2)
        CapturingCrossAttnProcessor(only_visible)(cross_attention, hidden, text[:, :37])

    # then: the output is the stock masked attention's, and the hidden tokens get no mass
    torch.testing.assert_close(captured, stock, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(capture.sums[256], only_visible.sums[256], rtol=1e-5, atol=1e-6)


def test_only_cross_attention_captures_and_processors_come_back(tiny_sd: DiffusionModel) -> None:
    before = {n: type(p) for n, p in tiny_sd.unet.attn_processors.items()}

    with capturing_cross_attention(tiny_sd.unet, AttentionCapture(torch.ones(1, 77))):
        during = tiny_sd.unet.attn_processors
        for name, processor in during.items():
            expected = CapturingCrossAttnProcessor if "attn2" in name else AttnProcessor2_0
            assert type(processor) is expected, name

    assert {n: type(p) for n, p in tiny_sd.unet.attn_processors.items()} == before


def test_capture_state_does_not_grow_with_the_number_of_steps(tiny_sd: DiffusionModel) -> None:
    # given: two samplings differing only in step count, capturing into inspectable states
    specs = prompt_bank("dog", num_samples=2, class_seed=0)
    sizes, calls = {}, {}
    for steps in (2, 6):
        captures: list[AttentionCapture] = []
        original = AttentionCapture.__init__

        def spy(self, *args, _original=original, _captures=captures, **kwargs):
            _original(self, *args, **kwargs)
            _captures.append(self)

        AttentionCapture.__init__ = spy  # type: ignore[method-assign]
        try:
            config = SamplingConfig(num_steps=steps, batch_size=2)
            sampler = Sampler(
                tiny_sd, class_name="dog", token_embedding=torch.zeros(64), config=config
            )
            list(sampler.generate(specs))
        finally:
            AttentionCapture.__init__ = original  # type: ignore[method-assign]
        (capture,) = captures
        sizes[steps] = sum(t.numel() * t.element_size() for t in capture.sums.values())
        calls[steps] = capture.counts[256]

    # then: three times the layer calls are summed into a state of the same size
    assert calls[6] == 3 * calls[2]
    assert sizes[2] == sizes[6]
    assert sizes[2] < 64 * 1024


def test_coarse_masks_are_soft_masks_at_image_size() -> None:
    capture = AttentionCapture(torch.ones(2, 77))
    generator = torch.Generator().manual_seed(0)
    for positions in (192, 48, 12, 3):  # a 16x12 latent at four UNet levels
        capture.add(torch.rand((2, 2, positions, 77), generator=generator).softmax(-1))

    masks = capture.coarse_masks(height=128, width=96, latent_size=(16, 12), resolutions=3)

    assert masks.shape == (2, 128, 96)
    assert float(masks.min()) >= 0.0 and float(masks.max()) <= 1.0
