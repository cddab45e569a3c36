"""The prompt bank, per-sample seeds, and the token spans the masks and the inversion rely on."""

from __future__ import annotations

import pytest

from aligndiff.models.diffusion import DiffusionModel
from aligndiff.prompts import (
    derive_seed,
    inversion_prompt,
    inversion_token,
    prompt_bank,
    tokenize_prompts,
)


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
    whole = tokenizer("a photo of a good albatross", padding="max_length", max_length=77).input_ids

    tokens = tokenize_prompts(tokenizer, [inversion_prompt("albatross")], "albatross")

    assert tokens.input_ids[0].tolist() == whole


def test_inversion_token_is_a_readable_class_specific_string() -> None:
    assert inversion_token("Samarra Mosque!") == "<samarra-mosque>"
    assert inversion_token("???") == "<class>"
