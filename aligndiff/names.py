"""What a class's prompts and learned token are called, and where its name is in a prompt.

Torch-free on purpose: the API validates prompts and names files with these, and it installs no
torch (`aligndiff.prompts` tokenizes, with torch, on the workers).
"""

from __future__ import annotations

import re


def inversion_token(class_name: str) -> str:
    """The learned token's text, e.g. `<samarra-mosque>` (the key in embedding.safetensors)."""
    slug = re.sub(r"[^a-z0-9]+", "-", class_name.lower()).strip("-") or "class"
    return f"<{slug}>"


def inversion_prompt(class_name: str) -> str:
    """The prompt the inversion token is learned with, and inversion samples are drawn from.

    After `pipe.load_textual_inversion(embedding)` the same string works in diffusers.
    """
    return f"a photo of a {inversion_token(class_name)} {class_name}"


def text_prompt(class_name: str) -> str:
    return f"a photo of a {class_name}"


def find_name(prompt: str, class_name: str) -> tuple[int, int]:
    """(start, end) character span of the class name in a prompt, as whole words."""
    pattern = r"(?<!\w)" + re.escape(class_name.strip()) + r"(?!\w)"
    match = re.search(pattern, prompt, flags=re.IGNORECASE)
    if match is None:
        raise ValueError(f"prompt {prompt!r} does not mention the class name {class_name!r}")
    return match.span()
