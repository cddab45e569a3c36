"""When to try a request again, and how long to wait first.

Retried: 429 and 5xx answers (but 501 and 505, which a retry cannot change, and a 429 whose
problem type says the request is over a quota that waiting does not lift) and transport
errors (connection refused or reset, timeouts). Never another 4xx: the same request would get
the same answer. The wait is the answer's `Retry-After` (seconds or an HTTP date) when it has
one, else an exponential backoff.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime

import httpx

from aligndiff_client.errors import OVER_QUOTA

_NOT_RETRIED_5XX = frozenset({501, 505})


def is_retryable(status: int) -> bool:
    return status == 429 or (500 <= status < 600 and status not in _NOT_RETRIED_5XX)


def problem_type(response: httpx.Response) -> str | None:
    """The `type` of a problem+json answer whose body has been read, else None."""
    try:
        body = response.json()
    except (httpx.ResponseNotRead, ValueError):
        return None
    kind = body.get("type") if isinstance(body, dict) else None
    return kind if isinstance(kind, str) else None


def retry_after_seconds(response: httpx.Response) -> float | None:
    """The answer's `Retry-After` in seconds from now (never negative), or None when it has
    none or an unreadable one."""
    value = response.headers.get("Retry-After", "").strip()
    if not value:
        return None
    try:
        return max(float(value), 0.0)
    except ValueError:
        pass
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return max((when - datetime.now(UTC)).total_seconds(), 0.0)


@dataclass(frozen=True)
class RetryPolicy:
    """`max_retries` more tries after the first, waiting `backoff`·2^n seconds before the
    n-th (at most `max_backoff`) unless the answer says how long (`Retry-After`). A
    `Retry-After` longer than `max_retry_after` is not waited for: the error is raised, with
    `retry_after` on it, for the caller to decide. `sleep` is injectable for tests."""

    max_retries: int = 5
    backoff: float = 0.5
    max_backoff: float = 30.0
    max_retry_after: float = 300.0
    sleep: Callable[[float], None] = time.sleep

    def delay(self, attempt: int, response: httpx.Response | None) -> float | None:
        """The seconds to wait before another try after failed try number `attempt` (0-based)
        with `response` (None after a transport error), or None to give up."""
        if attempt >= self.max_retries:
            return None
        if response is not None:
            if not is_retryable(response.status_code):
                return None
            # NOTE: older servers answered a lasting quota 429, not 422: never wait on it.
            if response.status_code == 429 and problem_type(response) == OVER_QUOTA:
                return None
            asked = retry_after_seconds(response)
            if asked is not None:
                return asked if asked <= self.max_retry_after else None
        return min(self.max_backoff, self.backoff * 2.0**attempt)
