"""Build-once disk cache for the tiny random-weight models."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path


def cached_build(cache_dir: Path, name: str, build: Callable[[Path], None]) -> Path:
    """Return `cache_dir/name`, calling `build(tmp)` to create it first if it does not exist.

    The build writes into a private temporary folder that is renamed into place, so concurrent
    processes (several workers starting at once) never see a half-written model.
    """
    target = cache_dir / name
    if target.is_dir():
        return target
    cache_dir.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=cache_dir))
    try:
        build(tmp)
        try:
            os.rename(tmp, target)
        except OSError:
            # NOTE: another process won the race; its copy is identical (deterministic build).
            if not target.is_dir():
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return target
