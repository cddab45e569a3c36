"""API keys: generated once, stored as a SHA-256 hash, compared in constant time."""

from __future__ import annotations

import hashlib
import hmac
import secrets
import threading
import time
import uuid
from dataclasses import dataclass

from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker
from starlette.concurrency import run_in_threadpool

from service.models import ApiKey, Owner
from service.problems import Problem

KEY_PREFIX = "adk_"
_PREFIX_CHARS = 12


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
    plaintext key, which is never stored and cannot be shown again."""
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

    A revoked key keeps working for at most `ttl_seconds` in a process that verified it.
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


def authenticate(
    session: Session, authorization: str | None, cache: PrincipalCache | None = None
) -> Principal:
    """The principal behind an `Authorization: Bearer <key>` header; 401 otherwise."""
    key = bearer_key(authorization)
    digest = hash_key(key)
    if cache is not None and (cached := cache.get(digest)) is not None:
        return cached
    lookup = (
        key[len(KEY_PREFIX) : len(KEY_PREFIX) + _PREFIX_CHARS] if key.startswith(KEY_PREFIX) else ""
    )
    row = (
        session.execute(select(ApiKey).where(ApiKey.prefix == lookup)).scalar_one_or_none()
        if lookup
        else None
    )
    # Compare against a dummy hash when the prefix is unknown, so timing reveals nothing.
    expected = row.key_hash if row is not None else hash_key("")
    if not hmac.compare_digest(expected, digest) or row is None or row.revoked_at is not None:
        raise Problem(401, "the API key is not valid", headers=_CHALLENGE)
    principal = Principal(owner_id=row.owner_id, key_id=row.id, is_admin=row.is_admin)
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
            return authenticate(session, authorization, cache)

    return await run_in_threadpool(verify)
