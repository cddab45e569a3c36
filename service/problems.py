"""Errors as RFC 9457 problem+json: one exception type and the app's handlers."""

from __future__ import annotations

import logging
from collections.abc import Collection, Iterable
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from sqlalchemy.exc import OperationalError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match

from service.storage import StorageUnavailable

PROBLEM_JSON = "application/problem+json"
_METHODS = ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE")
log = logging.getLogger(__name__)

TITLES = {
    400: "Bad Request",
    401: "Unauthorized",
    403: "Forbidden",
    404: "Not Found",
    405: "Method Not Allowed",
    409: "Conflict",
    413: "Content Too Large",
    415: "Unsupported Media Type",
    416: "Range Not Satisfiable",
    422: "Unprocessable Content",
    429: "Too Many Requests",
    500: "Internal Server Error",
    503: "Service Unavailable",
}


class Problem(Exception):
    """An error answered as problem+json. `errors` lists field-level validation failures."""

    def __init__(
        self,
        status: int,
        detail: str,
        *,
        errors: list[dict[str, str]] | None = None,
        headers: dict[str, str] | None = None,
        type_: str = "about:blank",
        title: str | None = None,
    ) -> None:
        super().__init__(detail)
        self.status = status
        self.detail = detail
        self.errors = errors
        self.headers = headers or {}
        self.type = type_
        self.title = title or TITLES.get(status, "Error")


def not_found(what: str) -> Problem:
    return Problem(404, f"{what} not found")


def refuse_unknown_fields(names: Iterable[str], known: Collection[str]) -> None:
    """422 naming every field in `names` that is not `known`: a field the server would ignore
    is refused instead, so that a client cannot believe it set what the server decides
    (`owner_id`, `status`, `id`, …)."""
    unknown = sorted({name for name in names if name not in known})
    if unknown:
        raise Problem(
            422,
            "the request is not valid",
            errors=[
                {"field": name, "message": "is not a field of this request"} for name in unknown
            ],
        )


def database_unavailable(error: Exception) -> Problem:
    """503 with Retry-After, for a database that did not answer (logged)."""
    log.warning("database unavailable: %s", error)
    return Problem(503, "the database is unavailable; retry shortly", headers={"Retry-After": "5"})


def problem_response(problem: Problem) -> JSONResponse:
    body: dict[str, Any] = {
        "type": problem.type,
        "title": problem.title,
        "status": problem.status,
        "detail": problem.detail,
    }
    if problem.errors is not None:
        body["errors"] = problem.errors
    return JSONResponse(
        body, status_code=problem.status, headers=problem.headers, media_type=PROBLEM_JSON
    )


def _field(location: tuple[Any, ...]) -> str:
    parts = [str(p) for p in location if p not in ("body", "query", "path", "header")]
    return ".".join(parts) or "body"


def _allowed_methods(request: Request) -> str:
    """Every method some route serves at the request's path. Starlette's own 405 names only
    the first route whose path matched, and `GET /v1/classes/{id}` and `DELETE` are two."""
    allowed = [
        method
        for method in _METHODS
        if any(
            route.matches({**request.scope, "method": method})[0] == Match.FULL
            for route in request.app.router.routes
        )
    ]
    return ", ".join(allowed)


def install_problem_handlers(app: FastAPI) -> None:
    @app.exception_handler(Problem)
    async def _problem(_: Request, exc: Problem) -> JSONResponse:
        return problem_response(exc)

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, exc: RequestValidationError) -> JSONResponse:
        errors = [{"field": _field(tuple(e["loc"])), "message": e["msg"]} for e in exc.errors()]
        return problem_response(Problem(422, "the request is not valid", errors=errors))

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        detail = exc.detail if isinstance(exc.detail, str) else TITLES.get(exc.status_code, "")
        headers = dict(exc.headers or {})
        if exc.status_code == 405:
            headers["Allow"] = _allowed_methods(request)
        return problem_response(Problem(exc.status_code, detail, headers=headers))

    @app.exception_handler(OperationalError)
    async def _database_down(_: Request, exc: OperationalError) -> JSONResponse:
        return problem_response(database_unavailable(exc))

    @app.exception_handler(StorageUnavailable)
    async def _storage_down(_: Request, exc: StorageUnavailable) -> JSONResponse:
        log.warning("storage unavailable: %s", exc)
        return problem_response(
            Problem(503, "blob storage is unavailable; retry shortly", headers={"Retry-After": "5"})
        )

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error", exc_info=exc)
        return problem_response(Problem(500, "an unexpected error occurred"))
