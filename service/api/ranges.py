"""Answers for generated archives, with byte ranges (RFC 9110 §14) so a broken download can be
resumed: `Range: bytes=N-` with `If-Range: <ETag>` gets the rest (206), or the whole archive
again (200) if it is not the same archive any more."""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass

from fastapi.responses import StreamingResponse

from service.contexts.datasets import DatasetDownload
from service.problems import Problem

_BYTES_RANGE = re.compile(r"bytes=(\d*)-(\d*)")


@dataclass(frozen=True)
class ByteRange:
    """`first`-`last` (inclusive, `last` None: to the end), or with `first` None the last
    `last` bytes."""

    first: int | None
    last: int | None


def parse_range(header: str | None) -> ByteRange | None:
    """The one byte range asked for, or None to send the whole representation: no Range
    header, another unit, several ranges or a malformed one (RFC 9110 §14.2 lets a server
    ignore those)."""
    if header is None:
        match = None
    else:
        match = _BYTES_RANGE.fullmatch(header.replace(" ", "").replace("\t", ""))
    if match is None or match.groups() == ("", ""):
        return None
    first, last = (int(text) if text else None for text in match.groups())
    if first is not None and last is not None and last < first:
        return None
    return ByteRange(first, last)


def resolve(byte_range: ByteRange, total: int) -> tuple[int, int] | None:
    """The inclusive span of a `total`-byte representation that the range covers, or None
    when it covers none of it (416)."""
    if byte_range.first is None:
        suffix = byte_range.last or 0
        return (max(total - suffix, 0), total - 1) if suffix and total else None
    if byte_range.first >= total:
        return None
    last = total - 1 if byte_range.last is None else min(byte_range.last, total - 1)
    return byte_range.first, last


def archive_response(
    download: DatasetDownload, *, range_header: str | None, if_range: str | None
) -> StreamingResponse:
    """The archive as an attachment (200), or the part a `Range` asks for (206).

    A range is honoured when `If-Range` is absent or is the archive's current ETag (strong
    comparison; a date never matches: no Last-Modified is sent). Its answer states the
    archive's total length, which may cost one generating pass if it is not known yet.
    """
    headers = {
        "ETag": download.etag,
        "Accept-Ranges": "bytes",
        "Content-Disposition": f'attachment; filename="{download.filename}"',
    }
    requested = parse_range(range_header)
    if requested is None or (if_range is not None and if_range.strip() != download.etag):
        if download.length is not None:
            headers["Content-Length"] = str(download.length)
        return StreamingResponse(download.stream(), media_type=download.media_type, headers=headers)
    total = download.measure()
    span = resolve(requested, total)
    if span is None:
        raise Problem(
            416,
            f"the range asked for is outside the archive, which is {total} bytes",
            headers={"Content-Range": f"bytes */{total}"},
        )
    first, last = span
    headers["Content-Range"] = f"bytes {first}-{last}/{total}"
    headers["Content-Length"] = str(last - first + 1)
    return StreamingResponse(
        _slice(download.stream(), first, last + 1),
        status_code=206,
        media_type=download.media_type,
        headers=headers,
    )


def _slice(chunks: Iterator[bytes], start: int, stop: int) -> Iterator[bytes]:
    """Bytes `start` to `stop` (exclusive) of a stream; the rest is never generated."""
    position = 0
    try:
        for chunk in chunks:
            end = position + len(chunk)
            if end > start:
                yield chunk[max(start - position, 0) : stop - position]
            position = end
            if position >= stop:
                break
    finally:
        chunks.close()  # type: ignore[attr-defined]
