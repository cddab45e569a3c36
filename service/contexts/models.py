"""The deployment's diffusion models (ALIGNDIFF_MODELS), as the API lists them."""

from __future__ import annotations

from functools import lru_cache

from aligndiff.models.family import (
    ModelFamily,
    UnsupportedModelError,
    default_resolution,
    model_family,
)
from service.problems import Problem
from service.schemas import ModelPublic, ModelsPublic
from service.settings import Settings

# What reading a model's spec raises when it cannot be read.
_UNDESCRIBED = (UnsupportedModelError, OSError, ValueError, KeyError)


def list_models(*, settings: Settings) -> ModelsPublic:
    """The deployment's models, the default first, each with its family and resolution; 503
    naming the model when one cannot be read (a hub the API cannot reach, say)."""
    items = []
    for name, spec in settings.served_models.items():
        try:
            family, resolution = _describe(spec)
        except _UNDESCRIBED as error:
            raise Problem(503, f"model {name!r} cannot be described: {error}") from error
        items.append(ModelPublic(name=name, family=family, default_resolution=resolution))
    return ModelsPublic(items=items)


def unreadable_models(settings: Settings) -> list[str]:
    """A line for each of the deployment's models this machine cannot read, saying why (a
    missing folder, an unsupported pipeline, a hub id neither reachable nor cached)."""
    problems = []
    for name, spec in settings.served_models.items():
        try:
            _describe(spec)
        except _UNDESCRIBED as error:
            problems.append(f"model {name!r} ({spec}) cannot be read: {error}")
    return problems


@lru_cache(maxsize=64)
def _describe(spec: str) -> tuple[ModelFamily, int]:
    # NOTE: cached per process: a hub id costs a download on its first listing only (a spec
    # that fails is not cached, and is tried again next time).
    return model_family(spec), default_resolution(spec)
