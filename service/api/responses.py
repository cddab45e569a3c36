"""Building answers: documented problem responses, stored (replayable) answers, and blobs."""

from __future__ import annotations

import hashlib
import logging
from collections import OrderedDict
from collections.abc import Callable, Hashable, Mapping
from dataclasses import dataclass
from typing import Any

import orjson
from fastapi import Response
from fastapi.responses import RedirectResponse, StreamingResponse

from service.contexts.idempotency import Answer
from service.problems import TITLES, Problem, not_found
from service.schemas import ProblemDetail
from service.storage import BlobNotFound, Storage

log = logging.getLogger(__name__)

PNG = "image/png"


def problem_responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI `responses` entries for error answers (problem+json, see `openapi.py`)."""
    return {status: {"model": ProblemDetail, "description": TITLES[status]} for status in statuses}


def json_response(content: Any, *, headers: Mapping[str, str] | None = None) -> Response:
    """`content` as JSON the way the API's models serialize it (UTC times end in `Z`)."""
    return Response(
        orjson.dumps(content, option=orjson.OPT_UTC_Z),
        media_type="application/json",
        headers=headers,
    )


@dataclass(frozen=True)
class EncodedJson:
    """An answer's JSON, encoded once, with a strong ETag of its bytes (the same in every
    process that encodes the same content)."""

    body: bytes
    etag: str

    @classmethod
    def of(cls, content: Any) -> EncodedJson:
        body = orjson.dumps(content, option=orjson.OPT_UTC_Z)
        return cls(body, f'"{hashlib.blake2b(body, digest_size=16).hexdigest()}"')


class LastAnswers:
    """The last answer encoded for each of a few keys (a poll's filters, say), reused while
    what it was made from is equal to what it is made from now.

    Compared, not hashed: an equal source costs one comparison, where a cache keyed by it
    would hash it and then compare it too."""

    def __init__(self, size: int) -> None:
        self.size = size
        self._answers: OrderedDict[Hashable, tuple[object, EncodedJson]] = OrderedDict()

    def get(self, key: Hashable, source: object, encode: Callable[[], Any]) -> EncodedJson:
        """The answer made from `source` for `key`: the last one if its source equals
        `source`, else `encode()`'s content, encoded (and kept)."""
        last = self._answers.get(key)
        if last is not None and last[0] == source:
            return last[1]
        encoded = EncodedJson.of(encode())
        self._answers[key] = (source, encoded)
        self._answers.move_to_end(key)
        while len(self._answers) > self.size:
            self._answers.popitem(last=False)
        return encoded


def not_modified(if_none_match: str | None, etag: str) -> bool:
    """Whether a request's `If-None-Match` header names `etag` (or is `*`): the client holds
    it."""
    if if_none_match is None:
        return False
    header = if_none_match
    # NOTE: weak comparison, as RFC 9110 asks of If-None-Match: W/"x" matches "x".
    named = {tag.strip().removeprefix("W/") for tag in header.split(",")}
    return "*" in named or etag in named


def revalidated_json_response(
    if_none_match: str | None, encoded: EncodedJson, *, headers: Mapping[str, str] | None = None
) -> Response:
    """`encoded` with its ETag, or 304 Not Modified and no body when the request's
    `If-None-Match` says the client holds it."""
    sent = {**(headers or {}), "ETag": encoded.etag}
    if not_modified(if_none_match, encoded.etag):
        return Response(status_code=304, headers=sent)
    return Response(encoded.body, media_type="application/json", headers=sent)


def answer_response(answer: Answer) -> Response:
    """A stored answer as sent, the first time and on every replay."""
    headers = {"Location": answer.location} if answer.location else {}
    if answer.replayed:
        headers["Idempotent-Replayed"] = "true"
    return Response(
        answer.body,
        status_code=answer.status_code,
        media_type="application/json",
        headers=headers,
    )


def blob_response(
    storage: Storage,
    key: str,
    *,
    media_type: str,
    filename: str,
    disposition: str = "inline",
    presign_seconds: int | None = None,
) -> Response:
    """Stream a blob from storage; with `presign_seconds`, redirect (307) to a presigned URL
    instead when the store offers one (S3), so the bytes bypass the API."""
    if (redirect := _presigned_redirect(storage, key, presign_seconds)) is not None:
        return redirect
    try:
        chunks = storage.iter_chunks(key)
    except BlobNotFound:
        raise _missing(key) from None
    return StreamingResponse(
        chunks,
        media_type=media_type,
        headers={"Content-Disposition": f'{disposition}; filename="{filename}"'},
    )


def small_blob_response(
    storage: Storage,
    key: str,
    *,
    media_type: str,
    filename: str,
    presign_seconds: int | None = None,
) -> Response:
    """`blob_response` for a blob small enough to hold whole (a sample's PNG, a few MB at
    most): read at once and answered with its Content-Length, one hop to a worker thread
    (the caller's) instead of one per chunk."""
    if (redirect := _presigned_redirect(storage, key, presign_seconds)) is not None:
        return redirect
    try:
        data = storage.get(key)
    except BlobNotFound:
        raise _missing(key) from None
    return Response(
        data,
        media_type=media_type,
        headers={"Content-Disposition": f'inline; filename="{filename}"'},
    )


def _presigned_redirect(
    storage: Storage, key: str, presign_seconds: int | None
) -> RedirectResponse | None:
    if presign_seconds is None:
        return None
    url = storage.presigned_url(key, expires_seconds=presign_seconds)
    return RedirectResponse(url, status_code=307) if url is not None else None


def _missing(key: str) -> Problem:
    # The row names a blob that is gone: the store and the database disagree.
    log.error("blob %s is missing from storage", key)
    return not_found("blob")
