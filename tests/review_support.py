"""Factories of the review tests (API, SDK, browser): a finished class whose samples the
filters judged, and a mask a person drew. They write through the `Api` of `tests.api_support`.
"""

from __future__ import annotations

import uuid

import numpy as np
from PIL import Image
from sqlalchemy import select, update

from service.models import Sample, SegClass
from tests.api_support import Api, add_class, add_sample, photo

# The samples' size: each of `two_squares`'s squares is an object of at least
# `instance_min_area` (16) pixels.
SIZE = (16, 16)
REJECTIONS = {"+": None, "o": "ood", "s": "similarity"}


def finished_class(api: Api, *, owner: str = "alice", verdicts: str = "+o+s+") -> uuid.UUID:
    """A class whose synthesis succeeded, with one 16×16 finished sample per character of
    `verdicts` (`+` accepted by the filters, `o` rejected by the OOD filter, `s` by the
    similarity check) and one still being worked on; its `num_accepted` as the worker sets it."""
    owner_id = api.alice_id if owner == "alice" else api.bob_id
    class_id, _ = add_class(api, owner_id=owner_id, status="succeeded")
    for index, mark in enumerate(verdicts):
        add_sample(api, class_id, index, accepted=mark == "+", image=photo(SIZE))
    add_sample(api, class_id, len(verdicts), finalized=False)
    with api.session() as session:
        for index, mark in enumerate(verdicts):
            session.execute(
                update(Sample)
                .where(Sample.class_id == class_id, Sample.index == index)
                .values(accepted_by="filter", rejected_by=REJECTIONS[mark], instances=1)
            )
        session.execute(
            update(SegClass)
            .where(SegClass.id == class_id)
            .values(num_samples_done=len(verdicts), num_accepted=verdicts.count("+"))
        )
        session.commit()
    return class_id


def sample_ids(api: Api, class_id: uuid.UUID) -> list[uuid.UUID]:
    """The class's samples (finished or not) by index."""
    with api.session() as session:
        return list(
            session.scalars(
                select(Sample.id).where(Sample.class_id == class_id).order_by(Sample.index)
            )
        )


def two_squares(size: tuple[int, int] = SIZE) -> Image.Image:
    """A mask of two separate 5×5 squares (two objects) and a 2-pixel speck (too small to be
    one), gray 200 on black: foreground by the rule, stored as 255."""
    width, height = size
    gray = np.zeros((height, width), np.uint8)
    gray[0:5, 0:5] = 200
    gray[height - 5 : height, width - 5 : width] = 200
    gray[0, width - 2 :] = 200
    return Image.fromarray(gray)
