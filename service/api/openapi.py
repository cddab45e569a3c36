"""The OpenAPI schema's finish: readable operation ids, errors as problem+json."""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from fastapi.routing import APIRoute

from service.problems import PROBLEM_JSON

_PROBLEM_REF = "#/components/schemas/ProblemDetail"


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
                        if status[0] in "45":
                            _as_problem_json(response.get("content", {}))
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]


def _as_problem_json(content: dict[str, Any]) -> None:
    """An error's body is problem+json whatever the route's own answers are: FastAPI files it
    under the route's media type (text/html for the dashboard, say) or application/json."""
    for media_type in list(content):
        schema = content[media_type].get("schema", {})
        if media_type == "application/json" or schema.get("$ref") == _PROBLEM_REF:
            content[PROBLEM_JSON] = content.pop(media_type)
