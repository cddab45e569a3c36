"""`/v1/models`: the diffusion models this deployment serves, for a class's `model` field."""

from __future__ import annotations

from fastapi import APIRouter

from service.api.deps import CurrentPrincipal, SettingsDep
from service.api.responses import problem_responses
from service.contexts import models
from service.schemas import ModelsPublic

router = APIRouter(prefix="/v1/models", tags=["models"])


@router.get("", response_model=ModelsPublic, responses=problem_responses(401, 422, 503))
def list_models(settings: SettingsDep, principal: CurrentPrincipal) -> ModelsPublic:
    """The deployment's models, the default (a class's when it names none) first."""
    return models.list_models(settings=settings)
