"""The API's routers, one module per resource."""

from __future__ import annotations

from fastapi import APIRouter

from service.api.routes import admin, classes, datasets, jobs, ops, samples, trainings

api_router = APIRouter()
for module in (classes, samples, datasets, trainings, jobs, ops, admin):
    api_router.include_router(module.router)
