"""ASGI middleware: authentication and rate limits before the body is read, the request
body size limit, and request metrics."""

from __future__ import annotations

import re
import time
from collections.abc import Sequence

from fastapi.routing import iter_route_contexts
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import Session, sessionmaker
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException
from starlette.routing import BaseRoute, compile_path
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.auth import Principal, PrincipalCache, authenticate_cached
from service.metrics import Metrics
from service.problems import Problem, database_unavailable, problem_response
from service.ratelimit import RateLimits, queues_job


class AuthenticateAndLimit:
    """Check the API key and the key's rate limits of every /v1 request before the app runs.

    FastAPI reads and parses a request's body before it runs any dependency, so a key checked
    by a dependency is checked only after an anonymous client has made the server read (and
    spool to disk) up to the upload limit. Here a bad or missing key answers 401, and a key
    over its rate 429 with `Retry-After`, before a byte of the body is read. The principal
    found is left in the request's state, where `get_principal` picks it up.
    """

    def __init__(
        self,
        app: ASGIApp,
        *,
        principal_cache: PrincipalCache,
        session_factory: sessionmaker[Session],
        rate_limits: RateLimits,
    ) -> None:
        self.app = app
        self.principal_cache = principal_cache
        self.session_factory = session_factory
        self.rate_limits = rate_limits

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not scope["path"].startswith("/v1/"):
            await self.app(scope, receive, send)
            return
        try:
            principal = await authenticate_cached(
                Headers(scope=scope).get("authorization"),
                self.principal_cache,
                self.session_factory,
            )
            await self._take_tokens(principal, scope)
        except Problem as refusal:
            if _has_body(scope):
                # NOTE: the body is never read: the connection closes after the answer, or
                # the server would go on reading (and dropping) it to reuse the connection.
                refusal.headers = {**refusal.headers, "Connection": "close"}
            await problem_response(refusal)(scope, receive, send)
            return
        except OperationalError as error:
            # As the app's handler answers it: the key could not be checked, for now.
            await problem_response(database_unavailable(error))(scope, receive, send)
            return
        scope.setdefault("state", {})["principal"] = principal
        await self.app(scope, receive, send)

    async def _take_tokens(self, principal: Principal, scope: Scope) -> None:
        limits, key = self.rate_limits, str(principal.key_id)
        buckets = [limits.requests]
        if queues_job(scope["method"], scope["path"]):
            buckets.append(limits.jobs)
        for bucket in buckets:
            if bucket is None:
                continue
            verdict = await limits.limiter.hit(bucket, key)
            if not verdict.allowed:
                raise Problem(
                    429,
                    f"this API key is over its rate limit of {bucket.describe()}; retry after "
                    f"{verdict.retry_after_header} s",
                    headers={"Retry-After": verdict.retry_after_header},
                )


def _has_body(scope: Scope) -> bool:
    headers = Headers(scope=scope)
    return headers.get("content-length", "0") != "0" or "transfer-encoding" in headers


class BodyTooLarge(HTTPException):
    """Raised from `receive` once a body passes the limit. An HTTPException, so that FastAPI
    lets it through its body parsing and the app's handler answers it as problem+json."""

    def __init__(self, max_bytes: int) -> None:
        super().__init__(413, f"the request body is over the limit of {max_bytes:,} bytes")


class BodySizeLimit:
    """Refuse request bodies over `max_bytes` with 413: at once when the Content-Length says
    so, otherwise as soon as the bytes received pass the limit (a chunked body declares no
    length, and a declared length may lie), so an oversized body is never read whole."""

    def __init__(self, app: ASGIApp, *, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = Headers(scope=scope).get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            await self._too_large(scope, receive, send)
            return

        received = 0
        started = False

        async def counting_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    raise BodyTooLarge(self.max_bytes)
            return message

        async def watching_send(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, counting_receive, watching_send)
        except BodyTooLarge:
            # Read outside FastAPI's body parsing (which answers it itself).
            if started:
                raise
            await self._too_large(scope, receive, send)

    async def _too_large(self, scope: Scope, receive: Receive, send: Send) -> None:
        problem = Problem(413, str(BodyTooLarge(self.max_bytes).detail))
        await problem_response(problem)(scope, receive, send)


class RequestMetrics:
    """Count and time every HTTP request by method, route template and status. A request
    refused before routing (a bad key, a rate limit, a body over the cap) is labelled with the
    template of the route it asked for, matched here; only a path no route has is
    "unmatched"."""

    def __init__(self, app: ASGIApp, *, metrics: Metrics, routes: Sequence[BaseRoute]) -> None:
        self.app = app
        self.metrics = metrics
        self.routes = routes
        self._templates: list[tuple[re.Pattern[str], str]] | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        # An exception escaping the app becomes a 500 (answered further out).
        status = 500

        async def watching_send(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, watching_send)
        finally:
            self.metrics.observe_request(
                method=scope["method"],
                route=self._template(scope),
                status=status,
                seconds=time.perf_counter() - start,
            )

    def _template(self, scope: Scope) -> str:
        """The route template ("/v1/classes/{class_id}"), never the raw path: it keeps the
        label set bounded."""
        routed = getattr(scope.get("route"), "path", None)
        if routed is not None:
            return str(routed)
        if self._templates is None:  # built at the first refusal: every route is added by then
            self._templates = [
                (compile_path(context.path)[0], context.path)
                for context in iter_route_contexts(self.routes)
                if context.path is not None
            ]
        path = scope["path"]
        return next((t for regex, t in self._templates if regex.match(path)), "unmatched")
