"""What a class's prompts and learned token are called, and where its name is in a prompt.

Torch-free on purpose: the API validates prompts, counts their tokens (`aligndiff.token_budget`)
and names files with these, and it installs no torch (`aligndiff.prompts` tokenizes, with
torch, on the workers). The API and the workers cut a prompt into the same parts
(`prompt_parts`), so what the API counts is what the workers tokenize.

The class name's place in a prompt is its *last* whole-word mention outside the learned token
(see `find_name`); the templates put the name last, so a name that is also a word of the
template ("photo", "a", "of") is found where the template puts it.
"""

from __future__ import annotations

import re
import unicodedata
from typing import Final, Literal

# How a class's template prompts are worded: "always-a" says "a photo of a {name}" whatever the
# name (every class created before prompts took "an"), "a-or-an" says "an" before a vowel sound.
# A class keeps the style it was created with, so a running or retried job never changes its
# prompts (`classes.prompt_style`).
PromptStyle = Literal["always-a", "a-or-an"]
LEGACY_PROMPT_STYLE: Final = "always-a"
PROMPT_STYLE: Final = "a-or-an"
PROMPT_STYLES: Final = (LEGACY_PROMPT_STYLE, PROMPT_STYLE)

PartRole = Literal["plain", "name", "placeholder"]

# Words that start with a vowel letter and a consonant sound ("a unicorn", "a euro", "a one-way
# sign"), and with a consonant letter and a vowel sound ("an hour"), by their beginnings.
_VOWEL_LETTER_CONSONANT_SOUND = (
    "uni",
    "use",
    "usu",
    "ute",
    "uti",
    "uku",
    "ura",
    "uri",
    "uro",
    "eu",
    "ewe",
    "one",
    "once",
)
_CONSONANT_LETTER_VOWEL_SOUND = ("hour", "honest", "honor", "honour", "heir")


def inversion_token(class_name: str) -> str:
    """The learned token's text, e.g. `<samarra-mosque>` (the key in embedding.safetensors)."""
    slug = re.sub(r"[^a-z0-9]+", "-", class_name.lower()).strip("-") or "class"
    return f"<{slug}>"


def indefinite_article(phrase: str) -> str:
    """ "an" when `phrase` starts with a vowel sound, else "a".

    The rule is spelling: "an" before a word that starts with a, e, i, o or u (accents
    ignored: "an élan"), except the beginnings in `_VOWEL_LETTER_CONSONANT_SOUND` ("a unicorn",
    "a university", "a euro", "a one-way street"); "an" before "hour", "honest", "honor" and
    "heir". Not covered, and worded "a" or "an" by their first letter: initialisms read letter
    by letter (worded "a MRI scanner", "an UFO"), numbers ("a 8-ball"), and rarer exceptions
    ("a unidentified object"; "a herb", which is British but not American English).
    """
    word = phrase.strip().lower()
    letters = "".join(
        ch for ch in unicodedata.normalize("NFKD", word) if not unicodedata.combining(ch)
    )
    if letters.startswith(_CONSONANT_LETTER_VOWEL_SOUND):
        return "an"
    if letters[:1] in ("a", "e", "i", "o", "u") and not letters.startswith(
        _VOWEL_LETTER_CONSONANT_SOUND
    ):
        return "an"
    return "a"


def _article(class_name: str, style: PromptStyle) -> str:
    if style not in PROMPT_STYLES:
        raise ValueError(f"unknown prompt style {style!r}; use one of {PROMPT_STYLES}")
    return indefinite_article(class_name) if style == PROMPT_STYLE else "a"


def inversion_prompt(class_name: str, style: PromptStyle = PROMPT_STYLE) -> str:
    """The prompt the inversion token is learned with, and inversion samples are drawn from:
    "a photo of an <albatross> albatross" (the article goes with the name, which the token
    stands before; "a photo of a <tok> {name}" in the `always-a` style).

    After `pipe.load_textual_inversion(embedding)` the same string works in diffusers.
    """
    return f"a photo of {_article(class_name, style)} {inversion_token(class_name)} {class_name}"


def text_prompt(class_name: str, style: PromptStyle = PROMPT_STYLE) -> str:
    """The text samples' prompt when a class has none of its own, and the text its CLIP scores
    are measured against: "a photo of a dog", "a photo of an albatross"."""
    return f"a photo of {_article(class_name, style)} {class_name}"


def find_name(prompt: str, class_name: str) -> tuple[int, int]:
    """(start, end) character span of the class name's last whole-word mention in a prompt
    (case-insensitive), outside the learned token's text (the first `<slug>`).

    The last mention, because the templates put the name last ("a photo of a photo" for the
    class "photo" is read at its second "photo") and because CLIP's text encoder is causal:
    the last mention's embedding has read everything before it, earlier mentions of the name
    included. Raises ValueError when the prompt does not mention the name.
    """
    placeholder = _placeholder_span(prompt, class_name)
    pattern = r"(?<!\w)" + re.escape(class_name.strip()) + r"(?!\w)"
    spans = [
        match.span()
        for match in re.finditer(pattern, prompt, flags=re.IGNORECASE)
        if placeholder is None or match.end() <= placeholder[0] or match.start() >= placeholder[1]
    ]
    if not spans:
        raise ValueError(f"prompt {prompt!r} does not mention the class name {class_name!r}")
    return spans[-1]


def prompt_parts(prompt: str, class_name: str) -> list[tuple[str, PartRole]]:
    """The prompt cut into consecutive parts, in order, that join back into it: the class
    name's mention (`find_name`) as "name", the first occurrence of the learned token's text
    as "placeholder" (the workers tokenize it as one token whose embedding they replace), the
    rest as "plain". Raises ValueError when the prompt does not mention the name."""
    name = find_name(prompt, class_name)
    placeholder = _placeholder_span(prompt, class_name)
    cuts: list[tuple[tuple[int, int], PartRole]] = [(name, "name")]
    if placeholder is not None:
        cuts.append((placeholder, "placeholder"))
    parts: list[tuple[str, PartRole]] = []
    position = 0
    for (start, end), role in sorted(cuts):
        if start > position:
            parts.append((prompt[position:start], "plain"))
        parts.append((prompt[start:end], role))
        position = end
    if position < len(prompt):
        parts.append((prompt[position:], "plain"))
    return parts


def _placeholder_span(prompt: str, class_name: str) -> tuple[int, int] | None:
    start = prompt.find(inversion_token(class_name))
    return None if start < 0 else (start, start + len(inversion_token(class_name)))
