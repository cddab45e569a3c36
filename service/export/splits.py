"""Train and validation splits of an exported dataset: the `val` option and which split each
item falls in.

    none            every item in train (no validation split)
    shots           the real shots are the validation split, the synthetic samples train
    fraction:<f>    a deterministic share f (0 < f < 1) of the samples in validation, chosen
                    by a hash of each sample's id; the shots stay in train

A sample's split under `fraction` depends on its id and `f` alone: the same sample lands in the
same split in every export, whatever else the dataset holds, and a larger `f` only moves more
samples to validation.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from typing import Literal

Split = Literal["train", "val"]
SPLITS: tuple[Split, ...] = ("train", "val")

VAL_FORMS = "none, shots or fraction:<f> with 0 < f < 1 (e.g. fraction:0.2)"
# The accepted forms, as the OpenAPI schema states them: a decimal fraction strictly between 0
# and 1 has a non-zero digit after the point and nothing before it but a 0.
VAL_PATTERN = r"^(none|shots|fraction:0?\.[0-9]*[1-9][0-9]*)$"
_FRACTION = re.compile(r"fraction:(0?\.[0-9]*[1-9][0-9]*)")
_HASH_SPACE = float(1 << 64)


@dataclass(frozen=True)
class ValSplit:
    """A parsed `val` option."""

    kind: Literal["none", "shots", "fraction"] = "none"
    fraction: float = 0.0

    @classmethod
    def parse(cls, text: str) -> ValSplit:
        """The option `text` names; ValueError (saying the accepted forms) for anything else."""
        if text in ("none", "shots"):
            return cls(text)  # type: ignore[arg-type]
        match = _FRACTION.fullmatch(text)
        if match is None:
            raise ValueError(f"val must be {VAL_FORMS}; got {text!r}")
        return cls("fraction", float(match[1]))

    @property
    def text(self) -> str:
        """The option as written in `metadata.json` (and parsed back by `parse`)."""
        return f"fraction:{self.fraction!r}" if self.kind == "fraction" else self.kind

    @property
    def has_val(self) -> bool:
        """Whether the archive has a validation split at all (it may still be empty)."""
        return self.kind != "none"

    def split_of(self, *, shot: bool, key: str) -> Split:
        """The split of a shot, or of the sample whose id is `key`."""
        if self.kind == "shots":
            return "val" if shot else "train"
        if self.kind == "fraction" and not shot:
            return "val" if _unit_hash(key) < self.fraction else "train"
        return "train"


NO_VAL = ValSplit()


def _unit_hash(key: str) -> float:
    """`key` hashed to [0, 1), the same on every machine and Python version."""
    digest = hashlib.sha256(key.encode()).digest()
    return int.from_bytes(digest[:8], "big") / _HASH_SPACE
