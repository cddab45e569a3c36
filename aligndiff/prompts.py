"""Prompts: the sampling prompt bank, per-sample seeds, and tokenization with token spans.

The class-name span (which token positions spell {name}) is what the coarse mask reads from the
cross-attention; the placeholder slot is where the learned inversion embedding is substituted.
The prompts' and token's texts, and where the name is in a prompt (its last mention), come from
`aligndiff.names` (torch-free, for the API, which counts the same parts' tokens at the door:
`aligndiff.token_budget`).
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from transformers import CLIPTokenizer

from aligndiff.names import (
    PROMPT_STYLE,
    PromptStyle,
    find_name,
    inversion_prompt,
    prompt_parts,
    text_prompt,
)

PromptKind = Literal["inversion", "text"]

INITIALIZER_WORD = "good"


def derive_seed(class_seed: int, index: int) -> int:
    """The seed of sample `index`: a stable 63-bit hash of (class seed, index).

    It depends on nothing else (not the batch, worker or device), so any sample can be
    regenerated on its own.
    """
    digest = hashlib.blake2b(f"{class_seed}:{index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") & (2**63 - 1)


@dataclass(frozen=True)
class SampleSpec:
    """What sample `index` of a class is drawn from."""

    index: int
    prompt: str
    prompt_kind: PromptKind
    seed: int


def prompt_bank(
    class_name: str,
    *,
    num_samples: int,
    class_seed: int,
    prompts: Sequence[str] = (),
    prompt_style: PromptStyle = PROMPT_STYLE,
) -> list[SampleSpec]:
    """Half the samples from the inversion prompt (even indices), half from text (odd).

    Text samples cycle through the user's prompts, or use "a photo of a {name}" ("an" before a
    vowel sound, in the `a-or-an` style) when none are given. A user prompt must mention the
    class name: its tokens (its last mention's) are where the mask comes from. `prompt_style`
    is the class's (`aligndiff.names.PromptStyle`): a class keeps the prompts it was created with.
    """
    if num_samples < 1:
        raise ValueError("num_samples must be at least 1")
    for prompt in prompts:
        find_name(prompt, class_name)
    texts = list(prompts) or [text_prompt(class_name, prompt_style)]
    inversion = inversion_prompt(class_name, prompt_style)
    specs = []
    for index in range(num_samples):
        if index % 2 == 0:
            prompt, kind = inversion, "inversion"
        else:
            prompt, kind = texts[(index // 2) % len(texts)], "text"
        specs.append(SampleSpec(index, prompt, kind, derive_seed(class_seed, index)))  # type: ignore[arg-type]
    return specs


@dataclass(frozen=True)
class TokenizedPrompts:
    """A batch of prompts as CLIP input ids plus per-position masks."""

    input_ids: torch.Tensor  # (B, 77) long
    name_mask: torch.Tensor  # (B, 77) bool: the class-name tokens
    placeholder_mask: torch.Tensor  # (B, 77) bool: the inversion token slot (at most one)


def tokenize_prompts(
    tokenizer: CLIPTokenizer, prompts: Sequence[str], class_name: str
) -> TokenizedPrompts:
    """Tokenize prompts, locating the class-name tokens and the inversion token's slot.

    Each prompt is tokenized part by part (`aligndiff.names.prompt_parts`): the name's last
    mention outside the learned token is the name span, the learned token's text (its first
    occurrence) the slot. The placeholder is tokenized as the initializer word ("good"): its
    embedding row is then replaced by the learned one. The tokenizer is never modified, so a
    process serving many classes keeps a constant vocabulary. Raises ValueError when a prompt
    does not mention the name or takes more than the context's tokens (77 minus start and end:
    what `aligndiff.token_budget` counts at the door).
    """
    initializer_ids = tokenizer(INITIALIZER_WORD, add_special_tokens=False).input_ids
    if len(initializer_ids) != 1:
        raise ValueError(f"initializer {INITIALIZER_WORD!r} is not a single token")
    length = tokenizer.model_max_length
    rows, names, slots = [], [], []
    for prompt in prompts:
        ids = [tokenizer.bos_token_id]
        roles = ["special"]
        for text, role in prompt_parts(prompt, class_name):
            if role == "placeholder":
                text = INITIALIZER_WORD
            if not text.strip():
                continue
            piece_ids = tokenizer(text, add_special_tokens=False).input_ids
            ids += piece_ids
            roles += [role] * len(piece_ids)
        if "name" not in roles:
            raise ValueError(f"prompt {prompt!r} does not mention the class name {class_name!r}")
        if len(ids) > length - 1:
            raise ValueError(f"prompt {prompt!r} is longer than {length - 2} tokens")
        ids.append(tokenizer.eos_token_id)
        roles.append("special")
        pad = length - len(ids)
        ids += [tokenizer.pad_token_id] * pad
        roles += ["pad"] * pad
        rows.append(ids)
        names.append([r == "name" for r in roles])
        slots.append([r == "placeholder" for r in roles])
    return TokenizedPrompts(
        input_ids=torch.tensor(rows, dtype=torch.long),
        name_mask=torch.tensor(names, dtype=torch.bool),
        placeholder_mask=torch.tensor(slots, dtype=torch.bool),
    )
