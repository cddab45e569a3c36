"""Per-key rate limits: token buckets kept in Redis (shared by every API process) or in this
process's memory (the embedded `aligndiff serve`).

A bucket holds `burst` tokens and refills at `per_second`; a request takes one token or is
refused with the seconds until one is back. The buckets are kept in their GCRA form (one
timestamp per key: the "theoretical arrival time"), which refuses exactly what a token bucket
refuses and needs one value per key.
"""

from __future__ import annotations

import logging
import math
import re
import threading
import time
from dataclasses import dataclass
from typing import Protocol

import redis
from anyio import to_thread
from redis.backoff import NoBackoff
from redis.retry import Retry

from service.settings import Settings

log = logging.getLogger(__name__)

MEMORY_URL = "memory://"


@dataclass(frozen=True)
class Bucket:
    """A token bucket's shape; one bucket of it is kept per API key."""

    name: str
    per_second: float
    burst: int
    what: str = "requests"

    def describe(self) -> str:
        """E.g. "20 requests per second in bursts of 100"."""
        rate = (
            f"{self.per_second:g} {self.what} per second"
            if self.per_second >= 1
            else f"{self.per_second * 60:g} {self.what} per minute"
        )
        return f"{rate} in bursts of {self.burst}"

    @property
    def interval(self) -> float:
        return 1.0 / self.per_second

    @property
    def tolerance(self) -> float:
        """How far ahead of now a key's arrival time may run: a full bucket's worth less one."""
        return (self.burst - 1) * self.interval


@dataclass(frozen=True)
class Verdict:
    """A bucket's answer: allowed, or refused with the seconds until one more is allowed."""

    allowed: bool
    retry_after: float = 0.0

    @property
    def retry_after_header(self) -> str:
        """`Retry-After` in whole seconds, rounded up and at least 1."""
        return str(max(1, math.ceil(self.retry_after)))


ALLOWED = Verdict(True)


class RateLimiter(Protocol):
    async def hit(self, bucket: Bucket, key: str) -> Verdict:
        """Take a token from `key`'s `bucket`."""
        ...


class MemoryRateLimiter:
    """The buckets in this process's memory: each API process limits on its own."""

    def __init__(self, max_keys: int = 100_000) -> None:
        self.max_keys = max_keys
        self._arrivals: dict[tuple[str, str], float] = {}
        self._lock = threading.Lock()

    async def hit(self, bucket: Bucket, key: str) -> Verdict:
        return self.hit_now(bucket, key, time.monotonic())

    def hit_now(self, bucket: Bucket, key: str, now: float) -> Verdict:
        with self._lock:
            arrival = max(self._arrivals.get((bucket.name, key), now), now)
            wait = arrival - now - bucket.tolerance
            if wait > 0:
                return Verdict(False, wait)
            if len(self._arrivals) >= self.max_keys:
                self._forget_full_buckets(now)
            self._arrivals[(bucket.name, key)] = arrival + bucket.interval
            return ALLOWED

    def _forget_full_buckets(self, now: float) -> None:
        # A key whose arrival time has passed has a full bucket: the same as no entry.
        self._arrivals = {k: v for k, v in self._arrivals.items() if v > now}


# KEYS[1]: the key's bucket; ARGV: interval, tolerance (seconds). Returns {allowed, wait}.
# NOTE: the clock is Redis's own (TIME), so API processes on machines whose clocks disagree
# still share one bucket correctly; the wait comes back as a string (Lua numbers returned
# to Redis are truncated to integers).
_GCRA = """
local interval = tonumber(ARGV[1])
local tolerance = tonumber(ARGV[2])
local clock = redis.call('TIME')
local now = tonumber(clock[1]) + tonumber(clock[2]) / 1000000
local arrival = tonumber(redis.call('GET', KEYS[1])) or now
if arrival < now then arrival = now end
local wait = arrival - now - tolerance
if wait > 0 then return {0, string.format('%.6f', wait)} end
local next_arrival = arrival + interval
redis.call('SET', KEYS[1], string.format('%.6f', next_arrival),
           'PX', math.ceil((next_arrival - now) * 1000) + 1)
return {1, '0'}
"""


class RedisRateLimiter:
    """The buckets in Redis, shared by every API process that uses the same Redis.

    Rate limiting must never take the API down with it: when Redis does not answer (within
    `timeout` seconds) requests are let through, with a warning, and Redis is not asked
    again for `pause_seconds`, so an outage costs one slow request per pause, not one each.
    """

    PREFIX = "aligndiff:ratelimit"

    def __init__(self, url: str, *, timeout: float = 0.25, pause_seconds: float = 5.0) -> None:
        self.url = url
        self.pause_seconds = pause_seconds
        # NOTE: no retries inside redis-py: a retry with backoff would hold the request for
        # seconds during an outage, and the limit is not worth that.
        self._client = redis.Redis.from_url(
            url,
            socket_timeout=timeout,
            socket_connect_timeout=timeout,
            retry=Retry(NoBackoff(), 0),
        )
        self._script = self._client.register_script(_GCRA)
        self._paused_until = 0.0

    async def hit(self, bucket: Bucket, key: str) -> Verdict:
        if time.monotonic() < self._paused_until:
            return ALLOWED
        # NOTE: the blocking client runs in a worker thread: it never stalls the event loop
        # (whatever Redis does), and it works from any event loop (a TestClient has several).
        return await to_thread.run_sync(self._hit, bucket, key)

    def _hit(self, bucket: Bucket, key: str) -> Verdict:
        try:
            allowed, wait = self._script(
                keys=[f"{self.PREFIX}:{bucket.name}:{key}"],
                args=[repr(bucket.interval), repr(bucket.tolerance)],
            )
        except redis.RedisError as error:
            self._paused_until = time.monotonic() + self.pause_seconds
            log.warning(
                "rate limits are off for %.0f s: Redis at %s did not answer (%s)",
                self.pause_seconds,
                redis_location(self.url),
                error,
            )
            return ALLOWED
        return Verdict(bool(allowed), float(wait))

    def close(self) -> None:
        self._client.close()


def redis_location(url: str) -> str:
    """The URL without its password, for log lines."""
    return re.sub(r"//[^@/]*@", "//", url)


@dataclass(frozen=True)
class RateLimits:
    """The limiter and the buckets every /v1 request and every job-queueing POST take from
    (None: that limit is off)."""

    limiter: RateLimiter
    requests: Bucket | None
    jobs: Bucket | None


def make_rate_limits(settings: Settings) -> RateLimits:
    """The limits the settings ask for, kept in Redis when `rate_limit_url` (or else the
    broker) is a redis:// URL, else in this process's memory."""
    url = settings.rate_limit_url or settings.resolved_broker_url
    limiter: RateLimiter
    if url.startswith(("redis://", "rediss://", "unix://")):
        limiter = RedisRateLimiter(url)
    elif settings.rate_limit_url in (None, MEMORY_URL):
        limiter = MemoryRateLimiter()
    else:
        raise ValueError(
            f"ALIGNDIFF_RATE_LIMIT_URL must be a redis:// URL or {MEMORY_URL}, got "
            f"{redis_location(url)!r}"
        )
    requests = (
        Bucket("requests", settings.rate_limit_per_second, settings.rate_limit_burst)
        if settings.rate_limit_per_second > 0
        else None
    )
    jobs = (
        Bucket(
            "jobs",
            settings.job_rate_limit_per_minute / 60.0,
            settings.job_rate_limit_burst,
            what="requests that queue GPU work",
        )
        if settings.job_rate_limit_per_minute > 0
        else None
    )
    return RateLimits(limiter=limiter, requests=requests, jobs=jobs)


# The POSTs that queue GPU work: create a class, create a training, retry a job.
_JOB_POSTS = re.compile(r"/v1/(classes|trainings|jobs/[^/]+/retry)/?")


def queues_job(method: str, path: str) -> bool:
    return method == "POST" and _JOB_POSTS.fullmatch(path) is not None
