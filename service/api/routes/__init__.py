"""The API's routers, one module per resource."""

from __future__ import annotations

from fastapi import APIRouter

from service.api.responses import problem_responses
from service.api.routes import (
    admin,
    classes,
    datasets,
    jobs,
    keys,
    models,
    ops,
    samples,
    trainings,
)

api_router = APIRouter()
# Any /v1 request may answer 429: its key is over its rate limit (`AuthenticateAndLimit`).
for module in (classes, samples, datasets, trainings, jobs, keys, models):
    api_router.include_router(module.router, responses=problem_responses(429))
for module in (ops, admin):
    api_router.include_router(module.router)
