"""A small CLIP-style byte-level BPE tokenizer, written locally so tiny models need no hub.

It has CLIP's exact shape (byte-to-unicode alphabet, `</w>` word ends, start/end-of-text
specials, lower-casing, 77-token context) and a short merge list for the words our prompts use,
so common words are single tokens and any other text still tokenizes (into smaller pieces).

Torch-free (`transformers` is imported only to save the tokenizer): the API counts prompts'
tokens with this vocabulary when the deployment runs `tiny` (`aligndiff.token_budget`).
"""

from __future__ import annotations

import json
from pathlib import Path

BOS = "<|startoftext|>"
EOS = "<|endoftext|>"
CONTEXT_LENGTH = 77

# Words that become single tokens. "good" must be one: it initializes the inversion token.
_WORDS = [
    "a",
    "an",
    "the",
    "of",
    "on",
    "in",
    "at",
    "with",
    "and",
    "photo",
    "picture",
    "image",
    "close",
    "up",
    "good",
    "small",
    "large",
    "dog",
    "cat",
    "bird",
    "albatross",
    "car",
    "person",
    "mosque",
    "phonograph",
    "queen",
    "chess",
    "pidan",
    "chameleon",
]


def bytes_to_unicode() -> dict[int, str]:
    """CLIP's reversible byte → printable-unicode table (identical to OpenAI's)."""
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    codes = printable[:]
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            codes.append(256 + extra)
            extra += 1
    return dict(zip(printable, (chr(c) for c in codes), strict=True))


def tiny_vocab_and_merges() -> tuple[dict[str, int], list[str]]:
    """The tiny tokenizer's vocabulary and merge list (deterministic)."""
    alphabet = list(bytes_to_unicode().values())
    tokens = alphabet + [ch + "</w>" for ch in alphabet]
    merges: list[str] = []
    seen = set(tokens)
    for word in _WORDS:
        symbols = [*word[:-1], word[-1] + "</w>"]
        # Merge left to right so every prefix is itself a token (a valid BPE derivation).
        current = symbols[0]
        for symbol in symbols[1:]:
            merged = current + symbol
            rule = f"{current} {symbol}"
            if merged not in seen:
                merges.append(rule)
                tokens.append(merged)
                seen.add(merged)
            current = merged
    tokens += [BOS, EOS]
    return {tok: i for i, tok in enumerate(tokens)}, merges


def write_tiny_tokenizer(directory: Path, *, pad_token: str = EOS) -> None:
    """Write the tiny tokenizer in the standard `save_pretrained` layout. `pad_token`: EOS as
    in SD's tokenizer, or "!" as in SDXL's second (OpenCLIP) tokenizer."""
    from transformers import CLIPTokenizer

    directory.mkdir(parents=True, exist_ok=True)
    vocab, merges = tiny_vocab_and_merges()
    (directory / "vocab.json").write_text(json.dumps(vocab), encoding="utf-8")
    (directory / "merges.txt").write_text(
        "#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8"
    )
    tokenizer = CLIPTokenizer(
        vocab=str(directory / "vocab.json"),
        merges=str(directory / "merges.txt"),
        model_max_length=CONTEXT_LENGTH,
        pad_token=pad_token,
    )
    tokenizer.save_pretrained(str(directory))
