"""API keys as their holders manage them: create (the secret shown once), list, revoke.

A user key manages its own owner's keys; an admin key manages everyone's and may create admin
keys and keys of new owners. Operators (the `aligndiff keys` commands) manage every key
directly, without a key of their own.

A revoked key is refused at once by the process that revoked it, and by every other process
once its cached verification expires (`ALIGNDIFF_AUTH_CACHE_SECONDS`); its dashboard sessions
end at once, since every dashboard request looks the key up (`service.web_sessions`).
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from service import auth
from service.auth import Principal, PrincipalCache
from service.contexts.access import visible_to
from service.models import ApiKey, Owner, utcnow
from service.pagination import newest_first, newest_first_cursor, split_page
from service.problems import Problem, not_found
from service.schemas import KeyCreate, KeyCreated, KeyPublic, Page


def key_public(key: ApiKey) -> KeyPublic:
    return KeyPublic(
        id=key.id,
        name=key.name,
        admin=key.is_admin,
        owner_id=key.owner_id,
        created_at=key.created_at,
        last_used_at=key.last_used_at,
        revoked_at=key.revoked_at,
    )


def create_key(*, session: Session, principal: Principal, key_in: KeyCreate) -> KeyCreated:
    """Create a key as `principal` may (see `KeyCreate`) and commit it; the answer holds the
    secret, which is stored only as a hash and cannot be shown again.

    403 when a user key asks for an admin key or names an owner other than its own (whether
    that owner exists or not, so the answer reveals nothing); 422 when an admin key names an
    owner that does not exist.
    """
    owner_id = _owner_of_new_key(session, principal, key_in)
    secret = auth.create_key(
        session, name=key_in.name.strip(), admin=key_in.admin, owner_id=owner_id
    )
    key = auth.key_of(session, secret)
    assert key is not None  # just flushed by `auth.create_key`
    session.commit()
    return KeyCreated(
        id=key.id,
        name=key.name,
        admin=key.is_admin,
        owner_id=key.owner_id,
        key=secret,
        created_at=key.created_at,
    )


def _owner_of_new_key(
    session: Session, principal: Principal, key_in: KeyCreate
) -> uuid.UUID | None:
    """The new key's owner; None for a new owner (an admin naming none)."""
    if not principal.is_admin:
        if key_in.admin:
            raise Problem(403, "only an admin key may create admin keys")
        if key_in.owner_id is not None and key_in.owner_id != principal.owner_id:
            raise Problem(403, "a user key creates keys for its own owner only")
        return principal.owner_id
    if key_in.owner_id is not None and session.get(Owner, key_in.owner_id) is None:
        raise Problem(
            422,
            "the request is not valid",
            errors=[{"field": "owner_id", "message": "no owner has this id"}],
        )
    return key_in.owner_id


def list_keys(
    *, session: Session, principal: Principal, limit: int, cursor: str | None
) -> Page[KeyPublic]:
    """The keys `principal` may see (its owner's; an admin's: everyone's), newest first,
    revoked ones included."""
    statement = newest_first(
        select(ApiKey).where(visible_to(principal, ApiKey.owner_id)),
        created_at=ApiKey.created_at,
        id_=ApiKey.id,
        cursor=cursor,
        limit=limit,
    )
    rows, next_cursor = split_page(
        session.execute(statement).scalars().all(),
        limit=limit,
        cursor_after=lambda key: newest_first_cursor(key.created_at, key.id),
    )
    return Page[KeyPublic](items=[key_public(key) for key in rows], next_cursor=next_cursor)


def revoke_key(
    *, session: Session, principal: Principal, key_id: uuid.UUID, cache: PrincipalCache
) -> None:
    """Revoke a key `principal` may see (a key may revoke itself) and commit; revoking a
    revoked key changes nothing. 404 for a key it may not see. `cache` (this process's)
    forgets the key at once."""
    key = session.execute(
        select(ApiKey).where(ApiKey.id == key_id, visible_to(principal, ApiKey.owner_id))
    ).scalar_one_or_none()
    if key is None:
        raise not_found("key")
    revoke(session, key.id)
    session.commit()
    cache.forget(key.id)


def revoke_any_key(*, session: Session, key_id: uuid.UUID) -> KeyPublic:
    """Revoke any owner's key (operators: `aligndiff keys revoke`) and commit; the key as it
    now is. 404 for an unknown id. API processes refuse it once their cached verification
    expires."""
    key = session.get(ApiKey, key_id)
    if key is None:
        raise not_found("key")
    revoke(session, key.id)
    session.commit()
    session.refresh(key)
    return key_public(key)


def revoke(session: Session, key_id: uuid.UUID) -> None:
    """Mark the key revoked now, unless it already is (its first revocation time is kept)."""
    session.execute(
        update(ApiKey)
        .where(ApiKey.id == key_id, ApiKey.revoked_at.is_(None))
        .values(revoked_at=utcnow())
    )


@dataclass(frozen=True)
class ListedKey:
    """A key with its owner's name, as operators see every key."""

    key: KeyPublic
    owner: str


def every_key(*, session: Session, limit: int | None = None) -> list[ListedKey]:
    """Every owner's keys with their owner's name, newest first (at most `limit`)."""
    statement = (
        select(ApiKey, Owner.name)
        .join(Owner, Owner.id == ApiKey.owner_id)
        .order_by(ApiKey.created_at.desc(), ApiKey.id.desc())
        .limit(limit)
    )
    return [ListedKey(key_public(key), owner) for key, owner in session.execute(statement).all()]


def owner_names(*, session: Session, limit: int) -> list[tuple[uuid.UUID, str]]:
    """Owners by name (id, name), for choosing a new key's owner."""
    rows = session.execute(select(Owner.id, Owner.name).order_by(Owner.name, Owner.id).limit(limit))
    return list(rows.tuples().all())
