"""Answers revalidated by ETag (`service.api.responses`): which `If-None-Match` headers name
an ETag, and polled answers encoded once while their source is unchanged."""

from __future__ import annotations

import pytest

from service.api.responses import EncodedJson, LastAnswers, not_modified

ETAG = '"abc"'


@pytest.mark.parametrize(
    ("header", "held"),
    [
        ('"abc"', True),
        ('W/"abc"', True),  # weak comparison, as If-None-Match asks
        ('"x", "abc"', True),
        ('"x",W/"abc" ', True),
        ("*", True),
        (None, False),
        ("", False),
        ('"ab"', False),
        ('"abcd"', False),
        ("abc", False),  # not a quoted tag
    ],
)
def test_if_none_match_names_the_etag(header: str | None, held: bool) -> None:
    assert not_modified(header, ETAG) is held


def test_the_same_content_has_the_same_etag_and_other_content_another() -> None:
    one = EncodedJson.of({"jobs": [1, 2], "total": 2})
    assert EncodedJson.of({"jobs": [1, 2], "total": 2}) == one
    assert EncodedJson.of({"jobs": [1, 3], "total": 2}).etag != one.etag
    assert one.etag.startswith('"') and one.etag.endswith('"')


def test_an_answer_is_encoded_again_only_when_its_source_changes() -> None:
    answers = LastAnswers(size=2)
    encoded: list[object] = []

    def encode(source: object) -> object:
        encoded.append(source)
        return {"source": source}

    first = answers.get("a", (1, 2), lambda: encode((1, 2)))
    again = answers.get("a", (1, 2), lambda: encode((1, 2)))  # equal, not the same object
    changed = answers.get("a", (1, 3), lambda: encode((1, 3)))
    assert again is first and changed.etag != first.etag
    assert encoded == [(1, 2), (1, 3)]

    # at most `size` keys are kept: the least recently made goes first
    answers.get("b", 0, lambda: encode("b"))
    answers.get("c", 0, lambda: encode("c"))
    answers.get("a", (1, 3), lambda: encode("a again"))
    assert encoded[-1] == "a again"
