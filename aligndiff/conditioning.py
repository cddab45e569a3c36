"""Text conditioning: CLIP text-encoder states with the learned inversion token substituted.

SD has one text encoder; SDXL two, whose penultimate hidden states are concatenated, plus the
second's pooled (projected) embedding and the size ids (`add_time_ids`) as "added" conditioning,
as diffusers' `StableDiffusionXLPipeline.encode_prompt` and `_get_add_time_ids` build them.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
from transformers import CLIPTextModel

from aligndiff.models.diffusion import DiffusionModel
from aligndiff.prompts import TokenizedPrompts, tokenize_prompts


@contextmanager
def _substituted(
    text_encoder: CLIPTextModel, tokens: TokenizedPrompts, token_embedding: torch.Tensor | None
) -> Iterator[torch.Tensor]:
    """The input ids on the encoder's device, with `token_embedding` substituted at the
    prompts' inversion slots while the block runs."""
    device = text_encoder.device
    input_ids = tokens.input_ids.to(device)
    slots = tokens.placeholder_mask.to(device)
    if token_embedding is None or not bool(slots.any()):
        if bool(slots.any()):
            raise ValueError("prompts contain the inversion token but no embedding was given")
        yield input_ids
        return

    def substitute(
        _module: torch.nn.Module, _inputs: tuple[torch.Tensor, ...], output: torch.Tensor
    ) -> torch.Tensor:
        return torch.where(slots[..., None], token_embedding.to(output.dtype), output)

    handle = text_encoder.get_input_embeddings().register_forward_hook(substitute)
    try:
        yield input_ids
    finally:
        handle.remove()


def encode_prompts(
    text_encoder: CLIPTextModel,
    tokens: TokenizedPrompts,
    token_embedding: torch.Tensor | None = None,
) -> torch.Tensor:
    """Last hidden states (B, 77, D) of the text encoder for tokenized prompts.

    Where a prompt has an inversion slot, the input embedding there is `token_embedding`
    (shape (D,)), so gradients reach that vector alone: the encoder's own embedding matrix and
    the tokenizer are never modified.
    """
    with _substituted(text_encoder, tokens, token_embedding) as input_ids:
        return text_encoder(input_ids)[0]


def tokenize_for_model(
    model: DiffusionModel, prompts: Sequence[str], class_name: str
) -> list[TokenizedPrompts]:
    """The prompts tokenized by each of the model's tokenizers (`tokenize_prompts`).

    With two tokenizers (SDXL) the class name and the inversion slot must sit at the same
    positions in both: the coarse mask reads one span for the concatenated states. Raises
    ValueError when they do not.
    """
    tokenized = [tokenize_prompts(tokenizer, prompts, class_name) for tokenizer in model.tokenizers]
    first = tokenized[0]
    for other in tokenized[1:]:
        if not (
            torch.equal(first.name_mask, other.name_mask)
            and torch.equal(first.placeholder_mask, other.placeholder_mask)
        ):
            raise ValueError(
                f"the model's tokenizers put the class name {class_name!r} or the learned token "
                "at different positions; AlignDiff needs them aligned"
            )
    return tokenized


def encode_for_model(
    model: DiffusionModel,
    tokens: Sequence[TokenizedPrompts],
    token_embedding: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(states (B, 77, sum of widths), pooled (B, P) or None) for `tokenize_for_model`'s tokens.

    SD: `encode_prompts` of its one encoder, no pooled embedding. SDXL: each encoder's
    penultimate hidden states, concatenated, and the second encoder's projected pooled output.
    `token_embedding` is the learned token, one vector per encoder concatenated in order
    (`DiffusionModel.embedding_widths`).
    """
    if model.family != "sdxl":
        return encode_prompts(model.text_encoder, tokens[0], token_embedding), None
    widths = model.embedding_widths
    parts: Sequence[torch.Tensor | None] = (
        [None] * len(widths) if token_embedding is None else token_embedding.split(widths)
    )
    states, pooled = [], None
    for encoder, encoder_tokens, part in zip(model.text_encoders, tokens, parts, strict=True):
        with _substituted(encoder, encoder_tokens, part) as input_ids:
            output = encoder(input_ids, output_hidden_states=True)
        states.append(output.hidden_states[-2])
        pooled = output[0]
    return torch.cat(states, dim=-1), pooled


def unconditional_for_model(
    model: DiffusionModel,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The negative (empty-prompt) conditioning, (1, 77, D) and pooled (1, P) or None.

    SD: the encoder's states of "" as before. SDXL: zeros, as its pipeline builds them for an
    empty negative prompt (`force_zeros_for_empty_prompt`)."""
    tokens = model.tokenizer(
        [""], padding="max_length", max_length=model.tokenizer.model_max_length, return_tensors="pt"
    ).input_ids
    if model.family != "sdxl":
        return model.text_encoder(tokens.to(model.device))[0], None
    assert model.text_encoder_2 is not None
    dtype = model.text_encoder_2.dtype
    width = sum(model.embedding_widths)
    pooled_width = int(model.text_encoder_2.config.projection_dim or 0)
    states = torch.zeros((1, tokens.shape[1], width), device=model.device, dtype=dtype)
    return states, torch.zeros((1, pooled_width), device=model.device, dtype=dtype)


def added_conditioning(
    pooled: torch.Tensor | None, *, resolution: int, dtype: torch.dtype
) -> dict[str, torch.Tensor] | None:
    """SDXL's added conditioning for `pooled` (B, P): the pooled text and the time ids
    (original size, crop top-left (0, 0), target size: all `resolution` square). None for SD."""
    if pooled is None:
        return None
    ids = torch.tensor(
        [[resolution, resolution, 0, 0, resolution, resolution]], dtype=dtype, device=pooled.device
    )
    return {"text_embeds": pooled.to(dtype), "time_ids": ids.expand(len(pooled), -1)}
