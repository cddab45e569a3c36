"""Counting prompts' tokens without torch (`aligndiff.token_budget`), as the API does at the door:
the counts are the workers' exactly, with the tiny tokenizer and with SD 1.5's real CLIP one."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest
from transformers import CLIPTokenizer

from aligndiff.names import inversion_prompt, text_prompt
from aligndiff.prompts import tokenize_prompts
from aligndiff.token_budget import (
    PROMPT_TOKEN_LIMIT,
    Overrun,
    TokenBudget,
    TokenizerUnavailable,
)

HANGUL_NAME = "달항아리" * 16  # 64 characters: "moon jar"
LONG_NAME = "한국" * 32  # 64 characters
# 2 + 87 + 1 tokens with the real tokenizer ("very" is one token).
LONG_PROMPT = "a dog " + " ".join(["very"] * 87) + " fluffy"

# Names and prompts that mention them, in several scripts, cases, spacings and punctuations.
CASES = [
    ("dog", "a photo of a dog"),
    ("dog", "A  DOG\tsleeping on a sofa, the dog's 12 toys around it!!"),
    ("albatross", "an albatross over the sea at dusk"),
    ("samarra mosque", "the Samarra Mosque in 1920, a photo"),
    ("photo", "a photo of a photo"),
    ("pidan", "a naïve café plate with pidan 🥚 on it"),
    ("도자기", "한국 전통 도자기 in a museum"),
    (HANGUL_NAME, f"a photo of a {HANGUL_NAME}"),
    ("dog", LONG_PROMPT),
]
NAMES = ["dog", "albatross", "samarra mosque", "photo", "a", "Unicorn", "도자기", HANGUL_NAME]


@dataclass(frozen=True)
class Tokenizers:
    """A model's tokenizer as the workers load it, and the API's budget for the same model."""

    worker: CLIPTokenizer
    api: TokenBudget


@pytest.fixture(scope="module", params=["tiny", "sd15"])
def tokenizers(request: pytest.FixtureRequest) -> Tokenizers:
    if request.param == "tiny":
        return Tokenizers(
            request.getfixturevalue("tiny_sd").tokenizer, TokenBudget.for_model("tiny")
        )
    folder: Path = request.getfixturevalue("real_clip_tokenizer_dir")
    # The deployment names the model's folder; the tokenizer is the `tokenizer/` inside it.
    return Tokenizers(
        CLIPTokenizer.from_pretrained(str(folder)), TokenBudget.for_model(str(folder.parent))
    )


def slots_taken(tokenizer: CLIPTokenizer, prompt: str, class_name: str) -> int:
    """The positions a prompt takes between start and end of text when a worker encodes it."""
    ids = tokenize_prompts(tokenizer, [prompt], class_name).input_ids[0].tolist()
    return ids.index(tokenizer.eos_token_id) - 1


@pytest.mark.parametrize(("class_name", "prompt"), CASES)
def test_a_prompt_is_counted_as_the_workers_tokenizer_counts_it(
    tokenizers: Tokenizers, class_name: str, prompt: str
) -> None:
    # when: the API counts a user prompt
    counted = tokenizers.api.count(prompt, class_name)

    # then: it is the length of the workers' tokenization, start and end of text left out
    assert counted == len(tokenizers.worker(prompt).input_ids) - 2
    # and: where it fits, the positions the worker's encoding gives it
    if counted <= PROMPT_TOKEN_LIMIT:
        assert counted == slots_taken(tokenizers.worker, prompt, class_name)


@pytest.mark.parametrize("class_name", NAMES)
def test_the_inversion_prompt_counts_the_learned_token_as_one(
    tokenizers: Tokenizers, class_name: str
) -> None:
    prompt = inversion_prompt(class_name)

    counted = tokenizers.api.count(prompt, class_name)

    # then: the token's text (`<…>`, several tokens as text) counts as the one word standing in
    # for it, as the workers encode it
    assert counted == tokenizers.api.count(text_prompt(class_name), class_name) + 1
    if counted <= PROMPT_TOKEN_LIMIT:
        assert counted == slots_taken(tokenizers.worker, prompt, class_name)


def test_the_real_tokenizer_is_sd15s(real_clip_tokenizer_dir: Path) -> None:
    tokenizer = CLIPTokenizer.from_pretrained(str(real_clip_tokenizer_dir))

    assert len(tokenizer) == 49_408 and tokenizer.model_max_length == 77
    assert tokenizer("a photo of a dog").input_ids == [49406, 320, 1125, 539, 320, 1929, 49407]


def test_a_64_character_hangul_name_is_over_the_budget_the_worker_would_fail_on(
    real_clip_tokenizer_dir: Path,
) -> None:
    # given: SD 1.5's tokenizer, and a name the API's 64-character cap lets through
    budget = TokenBudget.for_model(str(real_clip_tokenizer_dir.parent))
    tokenizer = CLIPTokenizer.from_pretrained(str(real_clip_tokenizer_dir))
    assert len(LONG_NAME) == 64

    # when
    overruns = budget.overruns(LONG_NAME)

    # then: its inversion prompt, the longest it is used in, takes 133 of 75 tokens
    assert overruns == [Overrun(inversion_prompt(LONG_NAME), 133, 75, None)]
    # and: that is what would fail the job when its inversion starts
    with pytest.raises(ValueError, match="longer than 75 tokens"):
        tokenize_prompts(tokenizer, [inversion_prompt(LONG_NAME)], LONG_NAME)


def test_a_90_token_user_prompt_is_over_the_budget(real_clip_tokenizer_dir: Path) -> None:
    budget = TokenBudget.for_model(str(real_clip_tokenizer_dir.parent))
    prompts = ["a dog on a beach", LONG_PROMPT, "a cat in the snow"]

    overruns = budget.overruns("dog", prompts)

    # then: the long one is named by its index; the one without the name is not counted
    assert overruns == [Overrun(LONG_PROMPT, 90, 75, 1)]


def test_names_and_prompts_that_fit_have_no_overruns(tokenizers: Tokenizers) -> None:
    assert tokenizers.api.overruns("samarra mosque", ["the samarra mosque at dawn"]) == []


def test_a_model_without_readable_tokenizer_files_is_reported(tmp_path: Path) -> None:
    # given: a model folder without a tokenizer, and a path that is neither a folder nor a
    # valid hub id
    (tmp_path / "model" / "tokenizer").mkdir(parents=True)

    for spec in (tmp_path / "model", tmp_path / "nowhere"):
        with pytest.raises(TokenizerUnavailable):
            TokenBudget.for_model(str(spec))
