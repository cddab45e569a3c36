"""The exceptions the client raises, and the mapping from an HTTP error answer to one of them.

Every error answer of the service is RFC 9457 problem+json (`type`, `title`, `status`,
`detail`, and `errors: [{field, message}]` for validation); anything else (a proxy's HTML page,
an empty body) still becomes an `ApiError`, with the body's text as its detail.
"""

from __future__ import annotations

from typing import Any

import httpx


class AlignDiffError(Exception):
    """The base of every error this package raises."""


class ApiError(AlignDiffError):
    """The service answered with an error status."""

    def __init__(
        self,
        status: int,
        title: str,
        detail: str,
        *,
        errors: list[dict[str, Any]] | None = None,
        type: str = "about:blank",
        retry_after: float | None = None,
    ) -> None:
        self.status = status
        self.title = title
        self.detail = detail
        self.errors = errors or []
        self.type = type
        self.retry_after = retry_after
        super().__init__(str(self))

    def __str__(self) -> str:
        text = f"{self.status} {self.title}" + (f": {self.detail}" if self.detail else "")
        fields = "; ".join(f"{e.get('field', '?')}: {e.get('message', '')}" for e in self.errors)
        return f"{text} ({fields})" if fields else text


class Unauthorized(ApiError):
    """401: the API key is missing, unknown or revoked."""


class Forbidden(ApiError):
    """403: the key may not do this (e.g. an admin-only route)."""


class NotFound(ApiError):
    """404: no such resource, or one that belongs to another owner."""


class Conflict(ApiError):
    """409: the resource is not in a state that allows this (e.g. cancelling a finished job)."""


class ValidationFailed(ApiError):
    """422: the request is not valid; `errors` names each field and what is wrong with it."""


class OverQuota(ValidationFailed):
    """422 with the problem type `urn:aligndiff:problem:over-quota`: over a cap that waiting
    does not lift (samples per class, stored upload bytes); change the request or free space.
    Never retried."""


class RateLimited(ApiError):
    """429: over a rate limit, or the jobs quota (it lifts as jobs finish); `retry_after` is how
    many seconds the service asked to wait."""


class ConnectionFailed(AlignDiffError):
    """The service could not be reached (or the connection broke) after every retry."""


class JobFailed(AlignDiffError):
    """A class or training waited on ended `failed` or `cancelled`; `resource` is its last
    state and `error` the service's message."""

    def __init__(self, resource: Any) -> None:
        self.resource = resource
        self.status: str = resource.status
        self.error: str | None = resource.error
        reason = f": {self.error}" if self.error else ""
        super().__init__(f"{_describe(resource)} {self.status}{reason}")


class WaitTimeout(AlignDiffError, TimeoutError):
    """`wait` gave up before the class or training finished; `resource` is its last state."""

    def __init__(self, resource: Any, seconds: float) -> None:
        self.resource = resource
        super().__init__(
            f"{_describe(resource)} still {resource.status} after {seconds:g} s "
            f"(progress {resource.progress:.0%})"
        )


def _describe(resource: Any) -> str:
    """E.g. "class 6d1f…" or "training 0a2b…"."""
    return f"{type(resource).__name__.removesuffix('Info').lower()} {resource.id}"


class UnsafeArchive(AlignDiffError):
    """An archive holds an entry that could write outside the target folder (an absolute
    path, a `..` component, a link or a device file); nothing was extracted."""


OVER_QUOTA = "urn:aligndiff:problem:over-quota"
_BY_STATUS: dict[int, type[ApiError]] = {
    401: Unauthorized,
    403: Forbidden,
    404: NotFound,
    409: Conflict,
    422: ValidationFailed,
    429: RateLimited,
}


def error_from_response(response: httpx.Response, *, retry_after: float | None = None) -> ApiError:
    """The exception for an error answer; the body must have been read."""
    status = response.status_code
    cls = _BY_STATUS.get(status, ApiError)
    title = response.reason_phrase or "Error"
    try:
        body = response.json()
    except ValueError:
        body = None
    if isinstance(body, dict) and ("title" in body or "detail" in body):
        if status == 422 and body.get("type") == OVER_QUOTA:
            cls = OverQuota
        errors = body.get("errors")
        return cls(
            status,
            str(body.get("title") or title),
            str(body.get("detail") or ""),
            errors=errors if isinstance(errors, list) else None,
            type=str(body.get("type") or "about:blank"),
            retry_after=retry_after,
        )
    # NOTE: not problem+json (a proxy, a load balancer): keep the start of the body, it is
    # usually the only hint of what went wrong.
    detail = " ".join(response.text.split())[:300]
    return cls(status, title, detail, retry_after=retry_after)
