"""Idempotent POSTs: the first answer to a request with an `Idempotency-Key` is stored in the
same transaction as the work it reports, and replayed for a repeat of the same request.

A request is identified by a fingerprint of what it asks (operation, fields, file digests), not
of its raw bytes: multipart boundaries differ between two sends of the same request.
"""

from __future__ import annotations

import hashlib
import json
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any

from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from service.models import IdempotencyRecord
from service.problems import Problem


@dataclass(frozen=True)
class IdempotencyClaim:
    """A request's `Idempotency-Key`, scoped to its owner, and the request's fingerprint."""

    owner_id: uuid.UUID
    key: str
    fingerprint: str


@dataclass(frozen=True)
class Answer:
    """An HTTP answer to a POST as it is stored and replayed: status, JSON body, Location."""

    status_code: int
    body: str
    location: str | None = None
    replayed: bool = False


def fingerprint(operation: str, fields: Mapping[str, Any]) -> str:
    """A SHA-256 over the operation and its fields (JSON-serializable, in canonical form)."""
    canonical = json.dumps(
        {"operation": operation, "fields": fields}, sort_keys=True, separators=(",", ":")
    )
    return hashlib.sha256(canonical.encode()).hexdigest()


def claim_for(owner_id: uuid.UUID, key: str | None, fingerprint: str) -> IdempotencyClaim | None:
    return IdempotencyClaim(owner_id, key, fingerprint) if key else None


def find_answer(session: Session, claim: IdempotencyClaim | None) -> Answer | None:
    """The stored answer for this key, or None when the key is new (or absent).

    The same key with a different request is the client's error (422), as the IETF
    Idempotency-Key draft says: replaying the other request's answer would mislead it.
    """
    if claim is None:
        return None
    record = session.get(IdempotencyRecord, (claim.owner_id, claim.key))
    if record is None:
        return None
    if record.request_hash != claim.fingerprint:
        raise Problem(
            422,
            "this Idempotency-Key was already used for a different request",
            errors=[{"field": "Idempotency-Key", "message": "reused with a different request"}],
        )
    return Answer(record.status_code, record.body, record.location, replayed=True)


def commit_with_answer(session: Session, claim: IdempotencyClaim | None, answer: Answer) -> Answer:
    """Commit the session's work, recording `answer` under the claim in the same transaction.

    When a concurrent request with the same key committed first, this one's work is rolled
    back and the winner's answer is returned (marked `replayed`); the caller then undoes any
    side effect outside the database. Other failures propagate, after a rollback.
    """
    if claim is not None:
        session.add(
            IdempotencyRecord(
                owner_id=claim.owner_id,
                key=claim.key,
                request_hash=claim.fingerprint,
                status_code=answer.status_code,
                body=answer.body,
                location=answer.location,
            )
        )
    try:
        session.commit()
    except IntegrityError:
        session.rollback()
        winner = find_answer(session, claim)
        if winner is None:
            raise
        return winner
    except BaseException:
        session.rollback()
        raise
    return replace(answer, replayed=False)
