"""How many of the text encoder's tokens a class's prompts take, counted without torch.

A prompt longer than the text encoder's context cannot be encoded: a job would fail at its
inversion (a long name) or, worse, at sampling after the inversion is spent (a long user
prompt). The API counts every prompt a class's job will encode when the class is created, with
the `tokenizers` package alone (no torch, no transformers) and the deployment's own tokenizer
files, so it can refuse at the door what a worker would fail on.

The count is the workers' exactly: the same CLIP byte-level BPE pipeline as `transformers`'
`CLIPTokenizer` (NFC, whitespace runs to one space, lower case; CLIP's word pattern; byte-level
BPE with `</w>` word ends), applied to the same parts of the prompt (`aligndiff.names.
prompt_parts`) as `aligndiff.prompts.tokenize_prompts`, with the learned token counted as the
one token that stands in for it. Start and end of text are not counted: `PROMPT_TOKEN_LIMIT`
(75) is what is left of the context (77) for a prompt's own tokens.
"""

from __future__ import annotations

import functools
import json
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from tokenizers import AddedToken, Regex, Tokenizer, normalizers, pre_tokenizers
from tokenizers.models import BPE

from aligndiff.models.family import TINY_FAMILIES
from aligndiff.models.tokenizer import BOS, CONTEXT_LENGTH, EOS, tiny_vocab_and_merges
from aligndiff.names import PROMPT_STYLE, PromptStyle, inversion_prompt, prompt_parts, text_prompt

# The prompt's own tokens: the context less the start and end of text.
PROMPT_TOKEN_LIMIT = CONTEXT_LENGTH - 2
TOKENIZER_FOLDER = "tokenizer"
RETRY_UNAVAILABLE_SECONDS = 60.0
# CLIP's words: its special tokens, contractions, runs of letters, single digits, runs of other
# non-space characters (transformers' CLIPTokenizer; OpenAI's `simple_tokenizer`).
_CLIP_WORDS = (
    r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]"""
    r"""|[^\s\p{L}\p{N}]+"""
)


class TokenizerUnavailable(RuntimeError):
    """The deployment's tokenizer files cannot be read (a missing folder, an unreachable hub)."""


@dataclass(frozen=True)
class Overrun:
    """A prompt of a class that takes more tokens than the text encoder reads."""

    prompt: str
    tokens: int
    limit: int
    # Its index among the user's prompts; None for a template prompt (the name is too long).
    user_prompt: int | None


class TokenBudget:
    """Counts prompts' tokens as the workers' text encoder takes them.

    Build one with `for_model` (the deployment's `ALIGNDIFF_DIFFUSION_MODEL`), `from_folder`
    (a tokenizer folder: `vocab.json`, `merges.txt`) or `from_vocab`.
    """

    def __init__(self, tokenizer: Tokenizer, *, context_length: int = CONTEXT_LENGTH) -> None:
        self.tokenizer = tokenizer
        self.limit = context_length - 2

    @classmethod
    def from_vocab(
        cls,
        vocab: dict[str, int],
        merges: Sequence[tuple[str, str]],
        *,
        context_length: int = CONTEXT_LENGTH,
    ) -> TokenBudget:
        """A budget from a CLIP vocabulary and merge list, as `CLIPTokenizer(vocab, merges)`."""
        return cls(clip_tokenizer(vocab, list(merges)), context_length=context_length)

    @classmethod
    def from_folder(cls, folder: Path) -> TokenBudget:
        """A budget from a tokenizer folder in the `save_pretrained` layout (`vocab.json`,
        `merges.txt`, optionally `tokenizer_config.json` with the `model_max_length`)."""
        vocab_file, merges_file = folder / "vocab.json", folder / "merges.txt"
        if not (vocab_file.is_file() and merges_file.is_file()):
            raise TokenizerUnavailable(f"{folder} has no vocab.json and merges.txt")
        vocab, merges = BPE.read_file(str(vocab_file), str(merges_file))
        return cls.from_vocab(vocab, merges, context_length=_context_length(folder))

    @classmethod
    def for_model(cls, spec: str) -> TokenBudget:
        """The budget of a diffusion model as `ALIGNDIFF_DIFFUSION_MODEL` names it: `tiny`, a
        local diffusers folder, or a hub id (its `tokenizer/` files are fetched into the hub
        cache, as the workers' `from_pretrained` does). Loaded once per process and model.

        Raises TokenizerUnavailable when the files cannot be had; that answer is kept for
        `RETRY_UNAVAILABLE_SECONDS`, so that an unreachable hub is not waited for on every call.
        """
        failed = _unavailable.get(spec)
        if failed is not None and time.monotonic() - failed[0] < RETRY_UNAVAILABLE_SECONDS:
            raise failed[1]
        try:
            budget = _budget_for_model(spec)
        except TokenizerUnavailable as error:
            _unavailable[spec] = (time.monotonic(), error)
            raise
        _unavailable.pop(spec, None)
        return budget

    def count(self, prompt: str, class_name: str) -> int:
        """The tokens `prompt` takes between the start and end of text, the learned token of
        `class_name` counted as one. Raises ValueError when the prompt does not mention the
        class name (it could not be sampled from either)."""
        total = 0
        for text, role in prompt_parts(prompt, class_name):
            if role == "placeholder":
                total += 1
            elif text.strip():
                total += len(self.tokenizer.encode(text, add_special_tokens=False).ids)
        return total

    def overruns(
        self,
        class_name: str,
        prompts: Sequence[str] = (),
        *,
        style: PromptStyle = PROMPT_STYLE,
    ) -> list[Overrun]:
        """Each prompt a class's job would encode that is over the limit: the longest of its
        template prompts (the inversion prompt, and the text prompt that samples and scores
        use), then each of the user's `prompts`, by its index among them. A user prompt that
        does not mention the class name is not counted: `aligndiff.names.find_name` refuses it
        for that."""
        found = []
        templates = [inversion_prompt(class_name, style), text_prompt(class_name, style)]
        tokens, longest = max((self.count(p, class_name), p) for p in templates)
        if tokens > self.limit:
            found.append(Overrun(longest, tokens, self.limit, None))
        for index, prompt in enumerate(prompts):
            try:
                tokens = self.count(prompt, class_name)
            except ValueError:
                continue
            if tokens > self.limit:
                found.append(Overrun(prompt, tokens, self.limit, index))
        return found


def clip_tokenizer(vocab: dict[str, int], merges: list[tuple[str, str]]) -> Tokenizer:
    """A `tokenizers` CLIP tokenizer built as `transformers`' `CLIPTokenizer` builds its own."""
    tokenizer = Tokenizer(
        BPE(
            vocab=vocab,
            merges=merges,
            dropout=None,
            continuing_subword_prefix="",
            end_of_word_suffix="</w>",
            fuse_unk=False,
            unk_token=EOS,
        )
    )
    tokenizer.normalizer = normalizers.Sequence(
        [normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "), normalizers.Lowercase()]
    )
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(_CLIP_WORDS), behavior="removed", invert=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False),
        ]
    )
    tokenizer.add_special_tokens([AddedToken(BOS, special=True), AddedToken(EOS, special=True)])
    return tokenizer


# When each model's tokenizer was last found unavailable, and why (`TokenBudget.for_model`).
_unavailable: dict[str, tuple[float, TokenizerUnavailable]] = {}


@functools.lru_cache(maxsize=8)
def _budget_for_model(spec: str) -> TokenBudget:
    if spec in TINY_FAMILIES:
        # The tiny vocabulary (every tiny model's tokenizers share it) is built in memory,
        # exactly as the workers save it: the API needs no model cache of its own.
        vocab, merges = tiny_vocab_and_merges()
        return TokenBudget.from_vocab(vocab, [_merge_pair(rule) for rule in merges])
    local = Path(spec).expanduser()
    if local.is_dir():
        return TokenBudget.from_folder(local / TOKENIZER_FOLDER)
    return TokenBudget.from_folder(_hub_tokenizer_folder(spec))


def _hub_tokenizer_folder(repo_id: str) -> Path:
    # NOTE: imported here: only a deployment on a hub id needs huggingface_hub (a dependency
    # of `tokenizers`, so it is installed wherever this module runs).
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError

    folder = None
    for name in ("vocab.json", "merges.txt", "tokenizer_config.json"):
        try:
            path = hf_hub_download(repo_id, name, subfolder=TOKENIZER_FOLDER)
        except EntryNotFoundError:
            if name == "tokenizer_config.json":
                continue
            raise TokenizerUnavailable(f"{repo_id} has no {TOKENIZER_FOLDER}/{name}") from None
        except Exception as error:  # the hub's errors are many: offline, gated, not found, …
            raise TokenizerUnavailable(
                f"cannot fetch {TOKENIZER_FOLDER}/{name} of {repo_id}: {error}"
            ) from error
        folder = Path(path).parent
    assert folder is not None
    return folder


def _context_length(folder: Path) -> int:
    config_file = folder / "tokenizer_config.json"
    if not config_file.is_file():
        return CONTEXT_LENGTH
    try:
        length = json.loads(config_file.read_text(encoding="utf-8")).get("model_max_length")
    except (OSError, ValueError) as error:
        raise TokenizerUnavailable(f"{config_file} cannot be read: {error}") from error
    # `save_pretrained` writes a huge placeholder when no length was set.
    return int(length) if isinstance(length, int) and 0 < length <= 4096 else CONTEXT_LENGTH


def _merge_pair(rule: str) -> tuple[str, str]:
    first, second = rule.split(" ")
    return first, second
