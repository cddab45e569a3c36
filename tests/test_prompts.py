"""The prompt bank, per-sample seeds, and the token spans the masks and the inversion rely on."""

from __future__ import annotations

from pathlib import Path

import pytest
from transformers import CLIPTokenizer

from aligndiff.models.diffusion import DiffusionModel
from aligndiff.names import (
    LEGACY_PROMPT_STYLE,
    find_name,
    indefinite_article,
    inversion_prompt,
    inversion_token,
    text_prompt,
)
from aligndiff.prompts import derive_seed, prompt_bank, tokenize_prompts


def test_half_the_samples_come_from_the_inversion_prompt_and_half_from_text() -> None:
    specs = prompt_bank("samarra mosque", num_samples=6, class_seed=7)

    kinds = [s.prompt_kind for s in specs]
    assert kinds.count("inversion") == kinds.count("text") == 3
    assert {s.prompt for s in specs if s.prompt_kind == "inversion"} == {
        "a photo of a <samarra-mosque> samarra mosque"
    }
    assert {s.prompt for s in specs if s.prompt_kind == "text"} == {"a photo of a samarra mosque"}


def test_user_prompts_are_cycled_through_the_text_half() -> None:
    prompts = ["a dog on a beach", "a dog in the snow"]

    specs = prompt_bank("dog", num_samples=8, class_seed=0, prompts=prompts)

    assert [s.prompt for s in specs if s.prompt_kind == "text"] == prompts * 2


def test_a_user_prompt_that_does_not_name_the_class_is_refused() -> None:
    with pytest.raises(ValueError, match="does not mention the class name"):
        prompt_bank("dog", num_samples=2, class_seed=0, prompts=["a hotdog stand"])


def test_sample_seeds_depend_only_on_class_seed_and_index() -> None:
    first = prompt_bank("dog", num_samples=4, class_seed=11)
    longer = prompt_bank("dog", num_samples=9, class_seed=11)

    assert [s.seed for s in first] == [s.seed for s in longer[:4]]
    assert len({s.seed for s in longer}) == 9
    assert derive_seed(11, 3) != derive_seed(12, 3)
    assert 0 <= derive_seed(2**40, 10**6) < 2**63


def test_class_name_tokens_and_the_inversion_slot_are_located(tiny_sd: DiffusionModel) -> None:
    tokenizer = tiny_sd.tokenizer
    name = "samarra mosque"

    tokens = tokenize_prompts(tokenizer, [inversion_prompt(name), "A Samarra Mosque at dusk"], name)

    for row in range(2):
        name_ids = tokens.input_ids[row][tokens.name_mask[row]].tolist()
        assert tokenizer.decode(name_ids).strip() == name
    slot = tokens.input_ids[0][tokens.placeholder_mask[0]].tolist()
    assert tokenizer.convert_ids_to_tokens(slot) == ["good</w>"]
    assert not tokens.placeholder_mask[1].any()


def test_pieces_tokenize_exactly_as_the_whole_prompt(tiny_sd: DiffusionModel) -> None:
    # given: the inversion prompt with its slot filled by the initializer word
    tokenizer = tiny_sd.tokenizer
    whole = tokenizer("a photo of an good albatross", padding="max_length", max_length=77).input_ids

    tokens = tokenize_prompts(tokenizer, [inversion_prompt("albatross")], "albatross")

    assert tokens.input_ids[0].tolist() == whole


def test_inversion_token_is_a_readable_class_specific_string() -> None:
    assert inversion_token("Samarra Mosque!") == "<samarra-mosque>"
    assert inversion_token("???") == "<class>"


# --- "a" or "an" ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "article"),
    [
        ("dog", "a"),
        ("albatross", "an"),
        ("egg", "an"),
        ("Owl", "an"),
        ("umbrella", "an"),
        ("élan", "an"),
        ("unicorn", "a"),
        ("university", "a"),
        ("ukulele", "a"),
        ("euro coin", "a"),
        ("one-way sign", "a"),
        ("hourglass", "an"),
        ("honest face", "an"),
        ("horse", "a"),
        ("도자기", "a"),
    ],
)
def test_the_article_follows_the_names_first_sound(name: str, article: str) -> None:
    assert indefinite_article(name) == article
    assert text_prompt(name) == f"a photo of {article} {name}"
    assert inversion_prompt(name) == f"a photo of {article} {inversion_token(name)} {name}"


def test_the_legacy_style_says_a_to_every_name() -> None:
    assert text_prompt("albatross", LEGACY_PROMPT_STYLE) == "a photo of a albatross"
    assert inversion_prompt("albatross", LEGACY_PROMPT_STYLE) == (
        "a photo of a <albatross> albatross"
    )
    with pytest.raises(ValueError, match="unknown prompt style"):
        text_prompt("albatross", "plural")  # type: ignore[arg-type]


def test_the_prompt_bank_words_the_templates_in_the_classs_style() -> None:
    current = prompt_bank("albatross", num_samples=2, class_seed=3)
    legacy = prompt_bank("albatross", num_samples=2, class_seed=3, prompt_style=LEGACY_PROMPT_STYLE)

    assert [s.prompt for s in current] == [
        "a photo of an <albatross> albatross",
        "a photo of an albatross",
    ]
    assert [s.prompt for s in legacy] == [
        "a photo of a <albatross> albatross",
        "a photo of a albatross",
    ]
    assert [s.seed for s in current] == [s.seed for s in legacy]


# --- where the name is read -----------------------------------------------------------------


def test_the_name_is_its_last_whole_word_mention_outside_the_learned_token() -> None:
    assert find_name("a photo of a photo", "photo") == (13, 18)
    assert find_name("a Dog next to a ball, the DOG asleep", "dog") == (26, 29)
    assert find_name("a photo of a <dog> dog", "dog") == (19, 22)
    assert find_name("a dog by a <dog>", "dog") == (2, 5)
    with pytest.raises(ValueError, match="does not mention"):
        find_name("a photo of a <dog>", "dog")


def named_tokens(tokenizer: CLIPTokenizer, prompt: str, class_name: str) -> list[int]:
    tokens = tokenize_prompts(tokenizer, [prompt], class_name)
    return tokens.name_mask[0].nonzero().flatten().tolist()


@pytest.fixture(params=["tiny", "sd15"])
def tokenizer(request: pytest.FixtureRequest) -> CLIPTokenizer:
    """The tiny tokenizer, and SD 1.5's real one (on which "photo", "a" and "of" are single
    tokens too)."""
    if request.param == "tiny":
        return request.getfixturevalue("tiny_sd").tokenizer  # type: ignore[no-any-return]
    folder: Path = request.getfixturevalue("real_clip_tokenizer_dir")
    return CLIPTokenizer.from_pretrained(str(folder))


@pytest.mark.parametrize(("name", "position"), [("photo", 5), ("a", 5), ("of", 5), ("dog", 5)])
def test_a_name_that_is_a_word_of_the_template_is_read_where_the_template_puts_it(
    tokenizer: CLIPTokenizer, name: str, position: int
) -> None:
    # given: "a photo of a {name}" (position 0 is the start of text)
    prompt = text_prompt(name, LEGACY_PROMPT_STYLE)

    # then: the name is the last word, not the template's word spelled alike
    assert named_tokens(tokenizer, prompt, name) == [position]


def test_a_name_mentioned_twice_is_read_at_its_last_mention(tokenizer: CLIPTokenizer) -> None:
    # start, a, dog, on, a, dog, bed…, end: the second "dog" is position 5
    assert named_tokens(tokenizer, "a dog on a dog bed", "dog") == [5]


def test_in_the_inversion_prompt_the_name_follows_the_learned_tokens_slot(
    tokenizer: CLIPTokenizer,
) -> None:
    # given: start, a, photo, of, a, <photo> (the slot), photo, end
    prompt = inversion_prompt("photo")

    tokens = tokenize_prompts(tokenizer, [prompt], "photo")

    # then: the slot holds the initializer word, and only the last "photo" is the name
    assert tokens.placeholder_mask[0].nonzero().flatten().tolist() == [5]
    assert tokens.name_mask[0].nonzero().flatten().tolist() == [6]
    assert tokenizer.convert_ids_to_tokens(tokens.input_ids[0, 1:8].tolist()) == [
        "a</w>", "photo</w>", "of</w>", "a</w>", "good</w>", "photo</w>", "<|endoftext|>",
    ]  # fmt: skip


@pytest.mark.parametrize(
    ("name", "article"), [("albatross", "an</w>"), ("samarra mosque", "a</w>")]
)
def test_the_learned_tokens_slot_follows_the_article_on_sd15s_tokenizer(
    real_clip_tokenizer_dir: Path, name: str, article: str
) -> None:
    # given: SD 1.5's tokenizer
    tokenizer = CLIPTokenizer.from_pretrained(str(real_clip_tokenizer_dir))

    tokens = tokenize_prompts(tokenizer, [inversion_prompt(name)], name)

    # then: start, a, photo, of, a/an, the slot (where the learned row is substituted), the name
    ids = tokens.input_ids[0].tolist()
    assert tokenizer.convert_ids_to_tokens(ids[1:6]) == [
        "a</w>", "photo</w>", "of</w>", article, "good</w>",
    ]  # fmt: skip
    assert tokens.placeholder_mask[0].nonzero().flatten().tolist() == [5]
    name_positions = tokens.name_mask[0].nonzero().flatten().tolist()
    assert name_positions == list(range(6, ids.index(tokenizer.eos_token_id)))
    assert tokenizer.decode([ids[i] for i in name_positions]).strip() == name
