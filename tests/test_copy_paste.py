"""GAPS copy-paste: pasted pixels and labels stay aligned; flips, scales and the 50/50 mix."""

from __future__ import annotations

import numpy as np

from aligndiff.copy_paste import LabeledImage, choose_objects, copy_paste
from tests.segmentation_support import solid_object

COLOUR = (250, 3, 140)


def blank_target(height: int = 64, width: int = 80) -> LabeledImage:
    return LabeledImage(
        image=np.full((height, width, 3), 30, dtype=np.uint8),
        labels=np.zeros((height, width), dtype=np.uint8),
    )


def test_pasted_labels_sit_exactly_on_pasted_pixels() -> None:
    obj = solid_object(COLOUR, class_index=2, kind="shot")
    for seed in range(30):
        # Given a plain target and a solid-colour object
        target = blank_target()

        # When the object is pasted
        out = copy_paste(target, [obj], np.random.default_rng(seed))

        # Then every pixel labelled with its class has its colour and vice versa
        labelled = out.labels == 2
        coloured = np.all(out.image == COLOUR, axis=-1)
        assert labelled.any()
        np.testing.assert_array_equal(labelled, coloured)
        assert set(np.unique(out.labels)) <= {0, 2}
    # and the target itself is untouched
    assert not target.labels.any()


def test_objects_are_flipped_and_scaled_over_seeds() -> None:
    obj = solid_object(COLOUR, class_index=1, kind="shot")
    areas, notch_left = [], []
    for seed in range(60):
        out = copy_paste(blank_target(200, 200), [obj], np.random.default_rng(seed))
        rows, cols = np.nonzero(out.labels == 1)
        # Only fully visible pastes tell their size and orientation.
        if rows.min() == 0 or cols.min() == 0 or rows.max() == 199 or cols.max() == 199:
            continue
        areas.append(int((out.labels == 1).sum()))
        box = out.labels[rows.min() : rows.max() + 1, cols.min() : cols.max() + 1] == 1
        # The notch is in the top-left corner of the original and top-right once flipped.
        notch_left.append(not box[0, 0])
    assert len(areas) >= 10
    assert max(areas) > 10 * min(areas)
    assert any(notch_left) and not all(notch_left)


def test_choose_objects_takes_half_from_aligned_and_half_from_text() -> None:
    shots = [solid_object(COLOUR, class_index=1, kind="shot")]
    inversions = [solid_object(COLOUR, class_index=1, kind="inversion") for _ in range(3)]
    texts = [solid_object(COLOUR, class_index=1, kind="text") for _ in range(10)]

    chosen = choose_objects([*shots, *inversions, *texts], 40, np.random.default_rng(0))

    assert len(chosen) == 40
    assert sum(obj.kind == "text" for obj in chosen) == 20


def test_choose_objects_uses_what_exists_when_one_group_is_empty() -> None:
    texts = [solid_object(COLOUR, class_index=1, kind="text") for _ in range(2)]

    chosen = choose_objects(texts, 5, np.random.default_rng(0))

    assert len(chosen) == 5
    assert all(obj.kind == "text" for obj in chosen)


def test_objects_with_empty_masks_are_never_pasted() -> None:
    # Given a text sample whose mask came out empty, beside a real shot
    empty = solid_object(COLOUR, class_index=1, kind="text")
    empty.mask[:] = False
    shot = solid_object(COLOUR, class_index=1, kind="shot")

    # When objects are chosen and pasted
    chosen = choose_objects([empty, shot], 6, np.random.default_rng(0))
    out = copy_paste(blank_target(), [empty], np.random.default_rng(0))

    # Then only the shot is chosen and the empty object changes nothing
    assert all(obj is shot for obj in chosen)
    np.testing.assert_array_equal(out.image, blank_target().image)
    assert not out.labels.any()
