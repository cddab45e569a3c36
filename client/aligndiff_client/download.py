"""Streamed, resumable downloads to a file (the dataset archives).

The bytes go to `<dest>.incomplete`, and the answer's ETag to `<dest>.incomplete.etag`; the
file is renamed to `dest` only once complete. A later try, in this call (after a dropped
connection, a 429 or a 5xx) or in a later one (after a crash or Ctrl-C), asks for the rest
with `Range: bytes=<size>-` and `If-Range: <etag>`: a 206 is appended, a 200 (the archive
changed, or the server does not resume) starts the file over. Without a strong ETag there is
nothing to check the saved bytes against, so the download starts over.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import httpx
from tqdm import tqdm

from aligndiff_client.errors import ConnectionFailed, error_from_response
from aligndiff_client.retry import RetryPolicy, retry_after_seconds

# NOTE: the first ranged request for an archive may wait for the server to measure the
# archive (one pass over it) before its first byte: far longer than an API call's timeout.
READ_TIMEOUT = 600.0

ProgressCallback = Callable[[int, int | None], None]
"""Called after each chunk written with (bytes in the file so far, total size or None)."""

_CONTENT_RANGE = re.compile(r"bytes\s+(\d+)-(\d+)/(\d+|\*)")
_UNSATISFIED_RANGE = re.compile(r"bytes\s+\*/(\d+)")


def download(
    http: httpx.Client,
    url: str,
    dest: Path,
    *,
    retry: RetryPolicy,
    params: Mapping[str, Any] | None = None,
    progress: bool = True,
    on_progress: ProgressCallback | None = None,
) -> Path:
    """GET `url` into `dest`, resuming a `<dest>.incomplete` left by an earlier try; return
    `dest`. Raises `ApiError` for an error answer that is not retried (or still failing after
    the retries), `ConnectionFailed` when the connection keeps failing."""
    partial = _Partial(dest)
    failures = 0
    base = http.timeout
    timeout = httpx.Timeout(
        connect=base.connect,
        read=None if base.read is None else max(base.read, READ_TIMEOUT),
        write=base.write,
        pool=base.pool,
    )
    with tqdm(
        desc=dest.name, unit="B", unit_scale=True, unit_divisor=1024, disable=not progress
    ) as bar:
        while True:
            offset, etag = partial.resume_point()
            headers = {"Accept-Encoding": "identity"}
            if offset:
                headers |= {"Range": f"bytes={offset}-", "If-Range": etag}
            failed: httpx.Response | None = None
            transport_error: httpx.TransportError | None = None
            written = 0
            try:
                with http.stream(
                    "GET", url, params=params, headers=headers, timeout=timeout
                ) as response:
                    if response.status_code == 416 and offset:
                        # The saved part is as long as the archive (or longer): done, or junk.
                        if _unsatisfied_length(response) == offset:
                            break
                        partial.discard()
                        continue
                    if response.is_error:
                        response.read()
                        failed = response
                    elif (start := _start(response, offset)) is not None:
                        total = _total(response)
                        bar.reset(total=total)
                        bar.update(start)
                        with partial.writer(start, _strong_etag(response)) as out:
                            for chunk in response.iter_bytes():
                                out.write(chunk)
                                written += len(chunk)
                                bar.update(len(chunk))
                                if on_progress is not None:
                                    on_progress(start + written, total)
                        if total is None or partial.size() == total:
                            break
                    else:
                        # A 206 for another range than the one asked: trust nothing saved.
                        partial.discard()
            except httpx.TransportError as error:
                transport_error = error
            if written:
                failures = 0  # progress was made: the retry budget is for tries in a row
            delay = retry.delay(failures, failed)
            if delay is None:
                if failed is not None:
                    raise error_from_response(failed, retry_after=retry_after_seconds(failed))
                raise ConnectionFailed(
                    f"downloading {url} failed after {failures + 1} tries: "
                    f"{transport_error or 'the answer was cut short'}"
                ) from transport_error
            retry.sleep(delay)
            failures += 1
    partial.finish()
    return dest


@dataclass(frozen=True)
class _Partial:
    """The `.incomplete` file of a download and the ETag its bytes belong to."""

    dest: Path

    @property
    def path(self) -> Path:
        return self.dest.with_name(self.dest.name + ".incomplete")

    @property
    def etag_path(self) -> Path:
        return self.dest.with_name(self.dest.name + ".incomplete.etag")

    def size(self) -> int:
        return self.path.stat().st_size if self.path.exists() else 0

    def resume_point(self) -> tuple[int, str]:
        """(bytes saved, their ETag) when they can be resumed, else (0, "")."""
        size = self.size()
        if size and self.etag_path.exists():
            return size, self.etag_path.read_text().strip()
        return 0, ""

    def writer(self, start: int, etag: str | None) -> IO[bytes]:
        """The file opened to write from byte `start` (0: start over, remembering `etag`)."""
        if start:
            return self.path.open("ab")
        self.dest.parent.mkdir(parents=True, exist_ok=True)
        if etag:
            self.etag_path.write_text(etag)
        else:
            self.etag_path.unlink(missing_ok=True)
        return self.path.open("wb")

    def discard(self) -> None:
        self.path.unlink(missing_ok=True)
        self.etag_path.unlink(missing_ok=True)

    def finish(self) -> None:
        os.replace(self.path, self.dest)
        self.etag_path.unlink(missing_ok=True)


def _start(response: httpx.Response, offset: int) -> int | None:
    """Where the answer's bytes start in the file: 0 for a whole file, `offset` for the
    range asked, None for a partial answer that does not continue the saved bytes."""
    if response.status_code != 206:
        return 0
    match = _CONTENT_RANGE.fullmatch(response.headers.get("Content-Range", "").strip())
    if match is None or int(match[1]) != offset:
        return None
    return offset


def _total(response: httpx.Response) -> int | None:
    """The whole file's size, when the answer says it."""
    if response.status_code == 206:
        match = _CONTENT_RANGE.fullmatch(response.headers["Content-Range"].strip())
        return None if match is None or match[3] == "*" else int(match[3])
    length = response.headers.get("Content-Length")
    return int(length) if length and length.isdigit() else None


def _unsatisfied_length(response: httpx.Response) -> int | None:
    match = _UNSATISFIED_RANGE.fullmatch(response.headers.get("Content-Range", "").strip())
    return int(match[1]) if match else None


def _strong_etag(response: httpx.Response) -> str | None:
    # NOTE: If-Range needs a strong validator (RFC 9110 §13.1.5): a weak one cannot resume.
    etag = response.headers.get("ETag")
    return etag if etag and not etag.startswith("W/") else None
