"""Blobs in S3 or an S3-compatible store (MinIO, …), behind the `Storage` interface."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import boto3
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError, ParamValidationError

from service.storage import BlobInfo, BlobNotFound, StorageUnavailable, validate_key

# NOTE: botocore's defaults (60 s timeouts, several retries with backoff) would keep an API
# request hanging for minutes when the store is down; fail fast instead, so it answers 503.
CLIENT_CONFIG = Config(
    connect_timeout=2,
    read_timeout=30,
    retries={"max_attempts": 2, "mode": "standard"},
    s3={"addressing_style": "path"},
    signature_version="s3v4",
    # NOTE: botocore >= 1.36 sends CRC checksums on every upload by default, which several
    # S3-compatible stores reject; send and check them only where the API requires them.
    request_checksum_calculation="when_required",
    response_checksum_validation="when_required",
)

# At most this many keys per DeleteObjects request (the S3 limit).
DELETE_BATCH = 1000

_MISSING_KEY_CODES = frozenset({"NoSuchKey", "404", "NotFound"})


def _is_missing_key(error: ClientError) -> bool:
    return error.response.get("Error", {}).get("Code") in _MISSING_KEY_CODES


def _is_unavailable(error: ClientError) -> bool:
    """Server trouble, a missing bucket or refused credentials: the store is unusable for now."""
    code = error.response.get("Error", {}).get("Code")
    status = int(error.response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0)
    return status >= 500 or status in (401, 403) or code == "NoSuchBucket"


@contextmanager
def _translated(key: str | None = None) -> Iterator[None]:
    """Turn botocore's errors into the storage interface's: BlobNotFound, StorageUnavailable."""
    try:
        yield
    except ClientError as error:
        if key is not None and _is_missing_key(error):
            raise BlobNotFound(key) from None
        if _is_unavailable(error):
            raise StorageUnavailable(str(error)) from error
        raise
    except ParamValidationError:
        raise
    except BotoCoreError as error:
        # Connection refused or timed out, no credentials, a stream cut short, …
        raise StorageUnavailable(str(error)) from error


class S3Storage:
    """Blobs as objects in one bucket, under an optional key prefix.

    Credentials come from boto3's usual chain (environment, shared files, instance role).
    """

    def __init__(
        self,
        bucket: str,
        prefix: str = "",
        endpoint_url: str | None = None,
        region: str = "us-east-1",
        public_endpoint_url: str | None = None,
    ) -> None:
        if not bucket:
            raise ValueError("an S3 bucket name is required")
        prefix = prefix.strip("/")
        self.bucket = bucket
        self.prefix = f"{validate_key(prefix)}/" if prefix else ""
        self.endpoint_url = endpoint_url
        self.public_endpoint_url = public_endpoint_url or endpoint_url
        self.region = region
        # A session of our own: creating clients from boto3's default session is not thread-safe.
        session = boto3.session.Session()
        self._client: Any = session.client(
            "s3", endpoint_url=endpoint_url, region_name=region, config=CLIENT_CONFIG
        )
        # Clients may know the store by another name than the service does (compose's
        # http://minio:9000 resolves only inside its network). SigV4 signs the Host, so a URL
        # for them must be signed for their name, not rewritten afterwards: a second client,
        # used only to presign, which is computed locally and sends nothing.
        self._presign_client: Any = self._client
        if self.public_endpoint_url != endpoint_url:
            self._presign_client = session.client(
                "s3",
                endpoint_url=self.public_endpoint_url,
                region_name=region,
                config=CLIENT_CONFIG,
            )

    def _full_key(self, key: str) -> str:
        return self.prefix + validate_key(key)

    def _full_prefix(self, prefix: str) -> str:
        """A folder to list: empty (everything) or a key-like path, with or without a final '/'.

        Always a whole folder, as in a local folder: "classes/1" never matches "classes/12/…".
        """
        if not prefix:
            return self.prefix
        return f"{self.prefix}{validate_key(prefix.removesuffix('/'))}/"

    def put(self, key: str, data: bytes, *, content_type: str) -> None:
        full_key = self._full_key(key)
        with _translated():
            self._client.put_object(
                Bucket=self.bucket, Key=full_key, Body=data, ContentType=content_type
            )

    def get(self, key: str) -> bytes:
        full_key = self._full_key(key)
        with _translated(key):
            response = self._client.get_object(Bucket=self.bucket, Key=full_key)
            body = response["Body"]
            try:
                return bytes(body.read())
            finally:
                body.close()

    def iter_chunks(self, key: str, chunk_size: int = 1 << 20) -> Iterator[bytes]:
        """Stream a blob; a missing key raises BlobNotFound here, before the first chunk."""
        full_key = self._full_key(key)
        with _translated(key):
            response = self._client.get_object(Bucket=self.bucket, Key=full_key)
        return self._stream(response["Body"], chunk_size)

    @staticmethod
    def _stream(body: Any, chunk_size: int) -> Iterator[bytes]:
        try:
            with _translated():
                yield from body.iter_chunks(chunk_size)
        finally:
            body.close()

    def exists(self, key: str) -> bool:
        full_key = self._full_key(key)
        try:
            with _translated(key):
                self._client.head_object(Bucket=self.bucket, Key=full_key)
        except BlobNotFound:
            return False
        return True

    def _iter_full_keys(self, full_prefix: str) -> Iterator[str]:
        for item in self._iter_objects(full_prefix):
            yield item["Key"]

    def _iter_objects(self, full_prefix: str) -> Iterator[dict[str, Any]]:
        paginator = self._client.get_paginator("list_objects_v2")
        with _translated():
            for page in paginator.paginate(Bucket=self.bucket, Prefix=full_prefix):
                yield from page.get("Contents", [])

    def list_keys(self, prefix: str) -> Iterator[str]:
        """Keys starting with `prefix`, relative to this storage's own prefix, in key order."""
        strip = len(self.prefix)
        for full_key in self._iter_full_keys(self._full_prefix(prefix)):
            yield full_key[strip:]

    def delete_prefix(self, prefix: str) -> int:
        if not prefix.removesuffix("/"):
            raise ValueError("refusing to delete every blob: give a non-empty prefix")
        # NOTE: list everything first, then delete: deleting while paginating relies on how a
        # store encodes continuation tokens, which S3-compatible servers do not all agree on.
        full_keys = list(self._iter_full_keys(self._full_prefix(prefix)))
        return self._delete_full_keys(full_keys, under=prefix)

    def list_blobs(self, prefix: str) -> Iterator[BlobInfo]:
        strip = len(self.prefix)
        for item in self._iter_objects(self._full_prefix(prefix)):
            yield BlobInfo(item["Key"][strip:], item["LastModified"])

    def delete_keys(self, keys: Sequence[str]) -> int:
        return self._delete_full_keys([self._full_key(key) for key in keys], under="")

    def _delete_full_keys(self, full_keys: list[str], *, under: str) -> int:
        deleted = 0
        for start in range(0, len(full_keys), DELETE_BATCH):
            batch = full_keys[start : start + DELETE_BATCH]
            with _translated():
                response = self._client.delete_objects(
                    Bucket=self.bucket,
                    Delete={"Objects": [{"Key": k} for k in batch], "Quiet": True},
                )
            errors = response.get("Errors", [])
            if errors:
                first = errors[0]
                raise StorageUnavailable(
                    f"could not delete {len(errors)} blob(s) under {under!r}: "
                    f"{first.get('Key')}: {first.get('Code')} {first.get('Message')}"
                )
            deleted += len(batch)
        return deleted

    def presigned_url(self, key: str, *, expires_seconds: int) -> str | None:
        full_key = self._full_key(key)
        with _translated():
            url = self._presign_client.generate_presigned_url(
                "get_object",
                Params={"Bucket": self.bucket, "Key": full_key},
                ExpiresIn=expires_seconds,
            )
        return str(url)

    def check(self) -> None:
        """Raise StorageUnavailable unless the bucket answers with our credentials."""
        try:
            self._client.head_bucket(Bucket=self.bucket)
        except (ClientError, BotoCoreError) as error:
            raise StorageUnavailable(f"S3 bucket {self.bucket!r}: {error}") from error
