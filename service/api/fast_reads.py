"""Hot read routes, answered before FastAPI: the one way to write a read that is polled.

A few GET routes take most of the traffic (the SDK's `wait` polls a class, tools page through
samples and jobs, the dashboard polls its jobs every 2 s). Each is declared with FastAPI as
usual (its OpenAPI, its validation) and also registered here with `@fast_read(path)`: an async
handler that reads its parameters with `ReadRequest`, its rows with the app's `ReadDatabase`
(`service.reads`) and answers JSON serialized once by orjson (`responses.json_response`).
`FastReads`, pure ASGI middleware inside authentication, rate limits and metrics, answers
those requests without FastAPI's routing, dependency solving, response validation or a worker
thread.

A parameter in any form but the plain one (`limit=50`, `accepted=true`, a canonical UUID) makes
the handler raise `Deferred`, and FastAPI answers the request: its validation decides every
unusual or invalid form, and its error answers stay the only ones. The FastAPI endpoint calls
the same code after validating, so both paths give the same answer (tested side by side).
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qsl

from sqlalchemy.exc import OperationalError
from starlette.requests import Request, cookie_parser
from starlette.responses import Response
from starlette.types import ASGIApp, Receive, Scope, Send

from service.auth import Principal
from service.problems import Problem, database_unavailable, problem_response


class Deferred(Exception):
    """A parameter is not in the plain form the fast path reads: FastAPI answers instead."""


_DECIMAL = re.compile(r"\d{1,15}(\.\d{1,15})?")


class ReadRequest:
    """A hot read's request: who asks, the app's state, and its parameters in their plain
    forms (anything else raises `Deferred`)."""

    __slots__ = ("_query", "path_params", "scope")

    def __init__(self, scope: Scope, path_params: dict[str, str]) -> None:
        self.scope = scope
        self.path_params = path_params
        pairs = parse_qsl(scope["query_string"].decode("latin-1"), keep_blank_values=True)
        self._query = dict(pairs)
        if len(self._query) != len(pairs):  # a repeated parameter
            raise Deferred

    @property
    def state(self) -> Any:
        """The app's state (`app.state`: settings, the read database, …)."""
        return self.scope["app"].state

    @property
    def principal(self) -> Principal:
        principal = self.scope.get("state", {}).get("principal")
        if not isinstance(principal, Principal):
            raise Deferred  # not authenticated by the middleware: FastAPI's dependency does it
        return principal

    def header(self, name: bytes) -> str | None:
        """The request's header `name` (lower case), the first if repeated."""
        for key, value in self.scope["headers"]:
            if key == name:
                return value.decode("latin-1")  # type: ignore[no-any-return]
        return None

    def cookie(self, name: str) -> str | None:
        header = self.header(b"cookie")
        return cookie_parser(header).get(name) if header else None

    @property
    def base_url(self) -> str:
        """The API's URL as this request reaches it, without the trailing slash."""
        return str(Request(self.scope).base_url).rstrip("/")

    def path_uuid(self, name: str) -> uuid.UUID:
        text = self.path_params[name]
        if len(text) != 36:
            raise Deferred
        try:
            value = uuid.UUID(text)
        except ValueError:
            raise Deferred from None
        if str(value) != text.lower():
            raise Deferred
        return value

    def query_int(self, name: str, *, default: int, ge: int, le: int) -> int:
        text = self._query.get(name)
        if text is None:
            return default
        if not (text.isascii() and text.isdigit() and len(text) <= 9):
            raise Deferred
        value = int(text)
        if not ge <= value <= le:
            raise Deferred
        return value

    def query_bool(self, name: str) -> bool | None:
        text = self._query.get(name)
        if text is None:
            return None
        if text not in ("true", "false"):
            raise Deferred
        return text == "true"

    def query_decimal(self, name: str) -> float | None:
        """A non-negative decimal number (`20`, `20.5`)."""
        text = self._query.get(name)
        if text is None:
            return None
        if _DECIMAL.fullmatch(text) is None:
            raise Deferred
        return float(text)

    def query_str(self, name: str) -> str | None:
        return self._query.get(name)

    def query_choice(self, name: str, choices: frozenset[str]) -> str | None:
        text = self._query.get(name)
        if text is not None and text not in choices:
            raise Deferred
        return text


Handler = Callable[[ReadRequest], Awaitable[Response]]


@dataclass(frozen=True)
class FastRead:
    """A hot GET route: its template (as declared with FastAPI; `path` is what the request
    metrics label it with) and its handler."""

    path: str
    handler: Handler
    regex: re.Pattern[str]


FAST_READS: list[FastRead] = []


def fast_read(path: str) -> Callable[[Handler], Handler]:
    """Register `handler` to answer `GET path` before FastAPI does (see the module)."""

    def register(handler: Handler) -> Handler:
        pattern = re.sub(r"\{(\w+)\}", r"(?P<\1>[^/]+)", path)
        FAST_READS.append(FastRead(path, handler, re.compile(f"{pattern}$")))
        return handler

    return register


class FastReads:
    """Answer the registered hot reads (see the module); every other request, and a hot read
    with a parameter in an unusual form, goes on to the app. `app.state.fast_reads` False
    turns it off (a test compares both paths)."""

    def __init__(self, app: ASGIApp, *, routes: list[FastRead]) -> None:
        self.app = app
        self.routes = routes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] == "GET" and scope["app"].state.fast_reads:
            path = scope["path"]
            for route in self.routes:
                match = route.regex.match(path)
                if match is not None:
                    response = await self._answer(route, scope, match.groupdict())
                    if response is not None:
                        await response(scope, receive, send)
                        return
                    break
        await self.app(scope, receive, send)

    async def _answer(
        self, route: FastRead, scope: Scope, path_params: dict[str, str]
    ) -> Response | None:
        try:
            response = await route.handler(ReadRequest(scope, path_params))
        except Deferred:
            return None
        except Problem as problem:
            response = problem_response(problem)
        except OperationalError as error:
            response = problem_response(database_unavailable(error))
        scope["route"] = route  # the request metrics' label: the route's template
        return response
