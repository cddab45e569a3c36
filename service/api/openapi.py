"""The OpenAPI schema's finish: readable operation ids, errors as problem+json."""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from fastapi.routing import APIRoute

from service.problems import PROBLEM_JSON


def operation_id(route: APIRoute) -> str:
    """The route function's name (`create_class`, `list_samples`, …): unique in this app."""
    return route.name


def install_openapi(app: FastAPI) -> None:
    """Document every error answer under its real media type, application/problem+json."""
    generate = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = generate()
            for path in schema.get("paths", {}).values():
                for operation in path.values():
                    for status, response in operation.get("responses", {}).items():
                        content = response.get("content", {})
                        if status[0] in "45" and "application/json" in content:
                            content[PROBLEM_JSON] = content.pop("application/json")
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
