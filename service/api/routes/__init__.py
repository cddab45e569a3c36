"""The API's routers, one module per resource."""

from __future__ import annotations

from fastapi import APIRouter

from service.api.routes import admin, classes, jobs, ops, samples

api_router = APIRouter()
for module in (classes, samples, jobs, ops, admin):
    api_router.include_router(module.router)
