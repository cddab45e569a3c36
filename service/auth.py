"""API keys: generated once, stored as a SHA-256 hash, compared in constant time."""

from __future__ import annotations

import hashlib
import hmac
import logging
import secrets
import threading
import time
import uuid
from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import Engine, or_, select, update
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker
from starlette.concurrency import run_in_threadpool

from service.models import ApiKey, Owner, utcnow
from service.problems import Problem

log = logging.getLogger(__name__)

KEY_PREFIX = "adk_"
_PREFIX_CHARS = 12
# `ApiKey.last_used_at` is written at most once per this interval per key, never per request.
LAST_USED_GRANULARITY_SECONDS = 60


@dataclass(frozen=True)
class Principal:
    """Who is calling: an owner, through one key, possibly an admin key."""

    owner_id: uuid.UUID
    key_id: uuid.UUID
    is_admin: bool

    def can_see(self, owner_id: uuid.UUID) -> bool:
        return self.is_admin or owner_id == self.owner_id


def hash_key(key: str) -> str:
    # NOTE: keys carry 256 bits of randomness, so a fast hash is enough (no password KDF).
    return hashlib.sha256(key.encode()).hexdigest()


def create_key(
    session: Session, *, name: str, admin: bool, owner_id: uuid.UUID | None = None
) -> str:
    """Create a key (and its owner, named `name`, unless `owner_id` is given); return the
    plaintext key, which is never stored and cannot be shown again (`key_of` finds its row)."""
    if owner_id is None:
        owner = Owner(name=name)
        session.add(owner)
        session.flush()
        owner_id = owner.id
    lookup = secrets.token_hex(_PREFIX_CHARS // 2)
    key = f"{KEY_PREFIX}{lookup}{secrets.token_urlsafe(32)}"
    session.add(
        ApiKey(owner_id=owner_id, name=name, prefix=lookup, key_hash=hash_key(key), is_admin=admin)
    )
    session.flush()
    return key


def key_of(session: Session, key: str) -> ApiKey | None:
    """The row of a plaintext key (by its lookup prefix; the hash is not compared)."""
    return session.execute(select(ApiKey).where(ApiKey.prefix == _lookup(key))).scalar_one_or_none()


def _lookup(key: str) -> str:
    return (
        key[len(KEY_PREFIX) : len(KEY_PREFIX) + _PREFIX_CHARS] if key.startswith(KEY_PREFIX) else ""
    )


def record_use(session: Session, key: ApiKey, now: datetime | None = None) -> None:
    """Note that `key` was just used (`record_use_of`)."""
    record_use_of(session.get_bind().engine, key.id, key.last_used_at, now)


def record_use_of(
    engine: Engine, key_id: uuid.UUID, last_used_at: datetime | None, now: datetime | None = None
) -> None:
    """Note that the key `key_id`, last used at `last_used_at`, was just used, unless that is
    recent enough: at most one write per key per `LAST_USED_GRANULARITY_SECONDS` (a busy key
    costs no write per request).

    NOTE: the UPDATE runs on a connection of its own, in a transaction of its own, outside the
    caller's: a request that reads only (or fails, and rolls back) still records the use,
    and no transaction holds the key's row locked for longer than the statement. A failure is
    logged, never raised: bookkeeping must not refuse a valid key.
    """
    now = now or utcnow()
    if not use_is_due(last_used_at, now):
        return
    since = now - timedelta(seconds=LAST_USED_GRANULARITY_SECONDS)
    statement = (
        update(ApiKey)
        .where(ApiKey.id == key_id, or_(ApiKey.last_used_at.is_(None), ApiKey.last_used_at < since))
        .values(last_used_at=now)
    )
    try:
        with engine.begin() as connection:
            connection.execute(statement)
    except SQLAlchemyError as error:
        log.warning("could not record the use of API key %s: %s", key_id, error)


def use_is_due(last_used_at: datetime | None, now: datetime | None = None) -> bool:
    """Whether a key last used at `last_used_at` has its use recorded again (`record_use_of`)."""
    since = (now or utcnow()) - timedelta(seconds=LAST_USED_GRANULARITY_SECONDS)
    return last_used_at is None or last_used_at < since


_CHALLENGE = {"WWW-Authenticate": "Bearer"}


def bearer_key(authorization: str | None) -> str:
    """The key of an `Authorization: Bearer <key>` header; 401 when there is none."""
    if not authorization or not authorization.lower().startswith("bearer "):
        raise Problem(
            401, "an API key is required: Authorization: Bearer <key>", headers=_CHALLENGE
        )
    return authorization[7:].strip()


class PrincipalCache:
    """Recently verified keys (by hash), so a busy client costs no key lookup per request.

    A revoked key keeps working for at most `ttl_seconds` in a process that verified it (the
    process that revokes it forgets it at once: `forget`).
    """

    def __init__(self, ttl_seconds: float, max_entries: int = 10_000) -> None:
        self.ttl_seconds = ttl_seconds
        self.max_entries = max_entries
        self._entries: dict[str, tuple[float, Principal]] = {}
        self._lock = threading.Lock()

    def get(self, digest: str) -> Principal | None:
        entry = self._entries.get(digest)
        if entry is None or entry[0] < time.monotonic():
            return None
        return entry[1]

    def put(self, digest: str, principal: Principal) -> None:
        if self.ttl_seconds <= 0:
            return
        with self._lock:
            if len(self._entries) >= self.max_entries:
                self._entries.clear()
            self._entries[digest] = (time.monotonic() + self.ttl_seconds, principal)

    def forget(self, key_id: uuid.UUID) -> None:
        """Drop the key's entry (it was just revoked): this process refuses it from now on."""
        with self._lock:
            for digest, (_, principal) in list(self._entries.items()):
                if principal.key_id == key_id:
                    del self._entries[digest]


def authenticate(
    session: Session,
    authorization: str | None,
    cache: PrincipalCache | None = None,
    *,
    record: bool = False,
) -> Principal:
    """The principal behind an `Authorization: Bearer <key>` header; 401 otherwise. With
    `record`, a key verified against the database has its use recorded (`record_use`).

    NOTE: `record` is for sessions that hold no write lock (a request's own reads): on SQLite
    the UPDATE, made on another connection, would wait for the caller's transaction.
    """
    key = bearer_key(authorization)
    digest = hash_key(key)
    if cache is not None and (cached := cache.get(digest)) is not None:
        return cached
    row = key_of(session, key) if _lookup(key) else None
    # Compare against a dummy hash when the prefix is unknown, so timing reveals nothing.
    expected = row.key_hash if row is not None else hash_key("")
    if not hmac.compare_digest(expected, digest) or row is None or row.revoked_at is not None:
        raise Problem(401, "the API key is not valid", headers=_CHALLENGE)
    principal = Principal(owner_id=row.owner_id, key_id=row.id, is_admin=row.is_admin)
    if record:
        record_use(session, row)
    if cache is not None:
        cache.put(digest, principal)
    return principal


async def authenticate_cached(
    authorization: str | None, cache: PrincipalCache, session_factory: sessionmaker[Session]
) -> Principal:
    """`authenticate` for async callers: a recently verified key (the common case) costs no
    thread hop and no query; only a cache miss goes to the database, in the thread pool."""
    cached = cache.get(hash_key(bearer_key(authorization)))
    if cached is not None:
        return cached

    def verify() -> Principal:
        with session_factory() as session:
            return authenticate(session, authorization, cache, record=True)

    return await run_in_threadpool(verify)
