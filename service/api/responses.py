"""Building answers: documented problem responses, stored (replayable) answers, and blobs."""

from __future__ import annotations

import logging
from collections.abc import Mapping
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
