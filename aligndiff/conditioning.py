"""Text conditioning: CLIP text-encoder states with the learned inversion token substituted."""

from __future__ import annotations

import torch
from transformers import CLIPTextModel

from aligndiff.prompts import TokenizedPrompts


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
    device = text_encoder.device
    input_ids = tokens.input_ids.to(device)
    slots = tokens.placeholder_mask.to(device)
    if token_embedding is None or not bool(slots.any()):
        if bool(slots.any()):
            raise ValueError("prompts contain the inversion token but no embedding was given")
        return text_encoder(input_ids)[0]

    def substitute(
        _module: torch.nn.Module, _inputs: tuple[torch.Tensor, ...], output: torch.Tensor
    ) -> torch.Tensor:
        return torch.where(slots[..., None], token_embedding.to(output.dtype), output)

    embeddings = text_encoder.get_input_embeddings()
    handle = embeddings.register_forward_hook(substitute)
    try:
        return text_encoder(input_ids)[0]
    finally:
        handle.remove()
