"""Blob storage: the same behaviour from a local folder and from S3 (a moto server on loopback)."""

from __future__ import annotations

import hashlib
import hmac
import os
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, quote, urlsplit

import boto3
import httpx
import pytest

from service.s3 import S3Storage
from service.storage import (
    BlobNotFound,
    LocalStorage,
    Storage,
    StorageUnavailable,
    class_key,
    class_prefix,
    make_storage,
    sample_key,
    shot_key,
)
from tests.api_support import ApiFactory, add_class, add_sample

pytest_plugins = ["tests.api_support"]

# Every S3 storage under test keeps its blobs below this prefix, as a shared bucket would.
S3_PREFIX = "team/blobs"
INVALID_KEYS = ["../x", "/abs", "a//b", "", "a/./b", "a/b/", "a/../b"]


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
    return port


def _wait_until_answers(url: str, process: subprocess.Popen[bytes], timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            pytest.fail(f"the moto server exited with status {process.returncode}")
        try:
            httpx.get(url, timeout=1)
            return
        except httpx.TransportError:
            time.sleep(0.1)
    pytest.fail(f"the moto server at {url} did not answer within {timeout} s")


@pytest.fixture(scope="session")
def aws_environment() -> Iterator[None]:
    """Dummy credentials, and nothing that could send boto3 anywhere but loopback."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("AWS_ACCESS_KEY_ID", "testing")
        patch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
        patch.setenv("AWS_CONFIG_FILE", os.devnull)
        patch.setenv("AWS_SHARED_CREDENTIALS_FILE", os.devnull)
        patch.setenv("AWS_EC2_METADATA_DISABLED", "true")
        for name in ("AWS_SESSION_TOKEN", "AWS_PROFILE", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3"):
            patch.delenv(name, raising=False)
        yield


@pytest.fixture(scope="session")
def s3_endpoint(aws_environment: None) -> Iterator[str]:
    """A real S3 endpoint: moto's server in its own process, on a free loopback port."""
    port = _free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        _wait_until_answers(url, process)
        yield url
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@pytest.fixture(scope="session")
def s3_client(s3_endpoint: str) -> Any:
    """A plain boto3 client, to look at the bucket behind the storage's back."""
    return boto3.client("s3", endpoint_url=s3_endpoint, region_name="us-east-1")


@pytest.fixture
def bucket(s3_client: Any) -> str:
    """A fresh bucket per test, so tests never see each other's blobs."""
    name = f"aligndiff-test-{uuid.uuid4().hex[:12]}"
    s3_client.create_bucket(Bucket=name)
    return name


@pytest.fixture
def s3_storage(s3_endpoint: str, bucket: str) -> S3Storage:
    return S3Storage(bucket, prefix=S3_PREFIX, endpoint_url=s3_endpoint)


@pytest.fixture
def local_storage(tmp_path: Path) -> LocalStorage:
    return LocalStorage(tmp_path / "blobs")


@pytest.fixture(params=["local", "s3"])
def storage(request: pytest.FixtureRequest) -> Storage:
    """Each behaviour test runs once per backend."""
    store: Storage = request.getfixturevalue(f"{request.param}_storage")
    return store


def _closed_port_url() -> str:
    return f"http://127.0.0.1:{_free_port()}"


# --- the same behaviour from every backend ---------------------------------------------------


def test_put_then_get_returns_the_same_bytes(storage: Storage) -> None:
    key = sample_key(uuid.uuid4(), 0, "image.png")

    storage.put(key, b"\x89PNG bytes", content_type="image/png")

    assert storage.get(key) == b"\x89PNG bytes"


def test_put_again_replaces_the_blob(storage: Storage) -> None:
    class_id = uuid.uuid4()
    key = class_key(class_id, "embedding.safetensors")
    storage.put(key, b"first try", content_type="application/octet-stream")

    storage.put(key, b"retried", content_type="application/octet-stream")

    assert storage.get(key) == b"retried"
    assert list(storage.list_keys(class_prefix(class_id))) == [key]


def test_missing_blob_raises_blob_not_found(storage: Storage) -> None:
    key = sample_key(uuid.uuid4(), 7, "mask.png")

    with pytest.raises(BlobNotFound):
        storage.get(key)
    # Before the first chunk, so a streamed response can still answer 404.
    with pytest.raises(BlobNotFound):
        storage.iter_chunks(key)


def test_iter_chunks_streams_a_large_blob_in_pieces(storage: Storage) -> None:
    key = class_key(uuid.uuid4(), "dataset.zip")
    data = os.urandom(3 * 1024 * 1024 + 123)
    storage.put(key, data, content_type="application/zip")

    chunks = list(storage.iter_chunks(key, chunk_size=1 << 20))

    assert len(chunks) >= 4
    assert all(len(chunk) <= 1 << 20 for chunk in chunks)
    assert b"".join(chunks) == data


def test_exists_tells_stored_from_missing(storage: Storage) -> None:
    key = sample_key(uuid.uuid4(), 1, "image.png")
    assert not storage.exists(key)

    storage.put(key, b"x", content_type="image/png")

    assert storage.exists(key)


def test_list_keys_returns_only_keys_under_the_prefix(storage: Storage) -> None:
    mine, other = uuid.uuid4(), uuid.uuid4()
    my_keys = [shot_key(mine, 0, "image.jpg")] + [
        sample_key(mine, index, "image.png") for index in range(3)
    ]
    other_key = sample_key(other, 0, "image.png")
    for key in [*my_keys, other_key]:
        storage.put(key, b"x", content_type="image/png")

    listed = list(storage.list_keys(class_prefix(mine)))

    assert sorted(listed) == sorted(my_keys)
    assert sorted(storage.list_keys("")) == sorted([*my_keys, other_key])
    assert list(storage.list_keys(class_prefix(uuid.uuid4()))) == []


def test_a_prefix_is_a_whole_folder_not_the_start_of_a_name(storage: Storage) -> None:
    storage.put("classes/1/image.png", b"x", content_type="image/png")
    storage.put("classes/12/image.png", b"x", content_type="image/png")

    assert list(storage.list_keys("classes/1")) == ["classes/1/image.png"]
    assert list(storage.list_keys("classes/1/image.png")) == []
    assert storage.delete_prefix("classes/1") == 1
    assert storage.exists("classes/12/image.png")


def test_list_keys_hands_out_each_folder_s_keys_together(storage: Storage) -> None:
    # given: folders whose names sort differently as strings and as path parts
    keys = [f"classes/{folder}/{name}" for folder in ("a", "a-b", "a.c", "ab") for name in "yx"]
    keys += ["classes/a/z/deeper.png", "classes/a-b/z/deeper.png"]
    for key in keys:
        storage.put(key, b"x", content_type="image/png")

    listed = list(storage.list_keys("classes"))

    # then: every key once, and each class folder's keys one run (what the sweeper relies on to
    # hold one folder at a time)
    assert sorted(listed) == sorted(keys)
    folders = [key.split("/")[1] for key in listed]
    runs = [folder for i, folder in enumerate(folders) if i == 0 or folders[i - 1] != folder]
    assert sorted(runs) == ["a", "a-b", "a.c", "ab"]


def test_the_local_listing_walks_folder_by_folder_as_it_is_read(
    local_storage: LocalStorage,
) -> None:
    # given: three classes' folders, and a listing that has handed out the first key
    first, doomed, last = sorted(uuid.uuid4() for _ in range(3))
    for class_id in (first, doomed, last):
        local_storage.put(shot_key(class_id, 0, "image.png"), b"x", content_type="image/png")
    listing = local_storage.list_keys("classes")
    assert next(listing) == shot_key(first, 0, "image.png")

    # when: a folder not reached yet is deleted, and one gets a new blob
    local_storage.delete_prefix(class_prefix(doomed))
    local_storage.put(shot_key(last, 1, "image.png"), b"x", content_type="image/png")

    # then: the listing reads each folder when it gets there (it never held the whole store)
    assert list(listing) == [shot_key(last, 0, "image.png"), shot_key(last, 1, "image.png")]


def test_a_folder_is_not_a_blob(storage: Storage) -> None:
    storage.put("classes/a/image.png", b"x", content_type="image/png")

    assert not storage.exists("classes/a")
    with pytest.raises(BlobNotFound):
        storage.get("classes/a")
    with pytest.raises(BlobNotFound):
        storage.get("classes/a/image.png/more")


def test_delete_prefix_removes_exactly_one_class(storage: Storage) -> None:
    doomed, kept = uuid.uuid4(), uuid.uuid4()
    for index in range(5):
        storage.put(sample_key(doomed, index, "image.png"), b"x", content_type="image/png")
    storage.put(sample_key(kept, 0, "image.png"), b"keep me", content_type="image/png")

    deleted = storage.delete_prefix(class_prefix(doomed))

    assert deleted == 5
    assert list(storage.list_keys(class_prefix(doomed))) == []
    assert storage.get(sample_key(kept, 0, "image.png")) == b"keep me"
    assert storage.delete_prefix(class_prefix(doomed)) == 0


def test_delete_prefix_refuses_to_delete_everything(storage: Storage) -> None:
    storage.put("classes/a/image.png", b"x", content_type="image/png")

    for prefix in ("", "/"):
        with pytest.raises(ValueError):
            storage.delete_prefix(prefix)

    assert storage.exists("classes/a/image.png")


@pytest.mark.parametrize("key", INVALID_KEYS)
def test_invalid_keys_are_rejected(storage: Storage, key: str) -> None:
    with pytest.raises(ValueError):
        storage.put(key, b"x", content_type="image/png")
    with pytest.raises(ValueError):
        storage.get(key)
    with pytest.raises(ValueError):
        storage.exists(key)


@pytest.mark.parametrize("prefix", ["../", "/abs/", "a//b/"])
def test_invalid_prefixes_are_rejected(storage: Storage, prefix: str) -> None:
    with pytest.raises(ValueError):
        list(storage.list_keys(prefix))
    with pytest.raises(ValueError):
        storage.delete_prefix(prefix)


def test_check_passes_when_the_store_is_up(storage: Storage) -> None:
    storage.check()


# --- local folder ----------------------------------------------------------------------------


def test_local_presigned_url_is_none(local_storage: LocalStorage) -> None:
    local_storage.put("classes/a/image.png", b"x", content_type="image/png")

    assert local_storage.presigned_url("classes/a/image.png", expires_seconds=60) is None


def test_local_put_leaves_no_partial_file_when_it_fails(
    local_storage: LocalStorage, monkeypatch: pytest.MonkeyPatch
) -> None:
    def fail_replace(*_: object) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", fail_replace)

    with pytest.raises(OSError, match="disk full"):
        local_storage.put("classes/a/image.png", b"new bytes", content_type="image/png")

    folder = local_storage.root / "classes" / "a"
    assert list(folder.iterdir()) == []
    assert not local_storage.exists("classes/a/image.png")


def test_local_failed_overwrite_keeps_the_old_blob(
    local_storage: LocalStorage, monkeypatch: pytest.MonkeyPatch
) -> None:
    local_storage.put("classes/a/image.png", b"old bytes", content_type="image/png")

    def fail_replace(*_: object) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", fail_replace)

    with pytest.raises(OSError):
        local_storage.put("classes/a/image.png", b"new bytes", content_type="image/png")

    assert local_storage.get("classes/a/image.png") == b"old bytes"
    assert list(local_storage.list_keys("classes/")) == ["classes/a/image.png"]


def test_local_check_leaves_nothing_behind(local_storage: LocalStorage) -> None:
    local_storage.check()

    assert list(local_storage.root.iterdir()) == []


def test_local_check_fails_when_the_folder_is_gone(local_storage: LocalStorage) -> None:
    local_storage.root.rmdir()

    with pytest.raises(StorageUnavailable):
        local_storage.check()


# --- S3 --------------------------------------------------------------------------------------


def test_s3_keys_live_under_the_storage_prefix(
    s3_storage: S3Storage, s3_client: Any, bucket: str
) -> None:
    s3_storage.put("classes/a/image.png", b"x", content_type="image/png")

    head = s3_client.head_object(Bucket=bucket, Key=f"{S3_PREFIX}/classes/a/image.png")

    assert head["ContentType"] == "image/png"


def test_s3_list_keys_ignores_objects_outside_the_storage_prefix(
    s3_storage: S3Storage, s3_client: Any, bucket: str
) -> None:
    s3_storage.put("classes/a/image.png", b"x", content_type="image/png")
    for stranger in ("classes/a/image.png", f"{S3_PREFIX}-old/classes/a/mask.png", "other.txt"):
        s3_client.put_object(Bucket=bucket, Key=stranger, Body=b"not ours")

    assert list(s3_storage.list_keys("")) == ["classes/a/image.png"]
    assert list(s3_storage.list_keys("classes/")) == ["classes/a/image.png"]
    assert s3_storage.delete_prefix("classes/a/") == 1
    remaining = s3_client.list_objects_v2(Bucket=bucket)["Contents"]
    assert len(remaining) == 3


def test_s3_delete_prefix_deletes_more_than_one_request_can_hold(
    s3_storage: S3Storage, s3_client: Any, bucket: str
) -> None:
    doomed, kept = uuid.uuid4(), uuid.uuid4()
    keys = [sample_key(doomed, index, "m") for index in range(1100)]
    with ThreadPoolExecutor(max_workers=16) as pool:
        list(pool.map(lambda k: s3_client.put_object(Bucket=bucket, Key=f"{S3_PREFIX}/{k}"), keys))
    s3_storage.put(sample_key(kept, 0, "m"), b"keep me", content_type="image/png")
    # NOTE: real S3 rejects a DeleteObjects request of more than 1000 keys; moto does not, so
    # count the keys per request to see the batching.
    batch_sizes: list[int] = []

    def record(params: dict[str, Any], **_: object) -> None:
        batch_sizes.append(len(params["Delete"]["Objects"]))

    s3_storage._client.meta.events.register("provide-client-params.s3.DeleteObjects", record)

    deleted = s3_storage.delete_prefix(class_prefix(doomed))

    assert deleted == 1100
    assert sorted(batch_sizes) == [100, 1000]
    assert list(s3_storage.list_keys(class_prefix(doomed))) == []
    assert s3_storage.get(sample_key(kept, 0, "m")) == b"keep me"


def test_s3_presigned_url_serves_the_bytes_over_plain_http(s3_storage: S3Storage) -> None:
    s3_storage.put("classes/a/image.png", b"\x89PNG bytes", content_type="image/png")

    url = s3_storage.presigned_url("classes/a/image.png", expires_seconds=60)

    assert url is not None
    response = httpx.get(url)
    assert response.status_code == 200
    assert response.content == b"\x89PNG bytes"
    assert response.headers["content-type"] == "image/png"


def _public_name(internal_endpoint: str) -> str:
    """The same moto server under another loopback name, as clients outside compose's network
    reach MinIO by another name than the containers do."""
    return internal_endpoint.replace("//127.0.0.1:", "//localhost:")


def _signature_matches(url: str, secret: str = "testing") -> bool:
    """Whether a presigned URL's SigV4 query signature is valid for the host it names: the
    check S3 makes on the request it receives (moto's server skips it)."""
    parts = urlsplit(url)
    query = parse_qsl(parts.query, keep_blank_values=True)
    params = dict(query)
    canonical_query = "&".join(
        f"{quote(k, safe='-_.~')}={quote(v, safe='-_.~')}"
        for k, v in sorted(query)
        if k != "X-Amz-Signature"
    )
    canonical_request = "\n".join(
        ["GET", parts.path, canonical_query, f"host:{parts.netloc}", "", "host", "UNSIGNED-PAYLOAD"]
    )
    scope = params["X-Amz-Credential"].split("/", 1)[1]
    date, region, service, _ = scope.split("/")
    string_to_sign = "\n".join(
        [
            "AWS4-HMAC-SHA256",
            params["X-Amz-Date"],
            scope,
            hashlib.sha256(canonical_request.encode()).hexdigest(),
        ]
    )
    key = f"AWS4{secret}".encode()
    for part in (date, region, service, "aws4_request"):
        key = hmac.new(key, part.encode(), hashlib.sha256).digest()
    signature = hmac.new(key, string_to_sign.encode(), hashlib.sha256).hexdigest()
    return hmac.compare_digest(signature, params["X-Amz-Signature"])


def test_s3_presigned_url_names_the_public_endpoint_and_is_signed_for_it(
    s3_endpoint: str, bucket: str
) -> None:
    public = _public_name(s3_endpoint)
    store = S3Storage(
        bucket, prefix=S3_PREFIX, endpoint_url=s3_endpoint, public_endpoint_url=public
    )
    store.put("classes/a/image.png", b"\x89PNG bytes", content_type="image/png")

    url = store.presigned_url("classes/a/image.png", expires_seconds=60)

    assert url is not None
    assert url.startswith(f"{public}/{bucket}/{S3_PREFIX}/classes/a/image.png?")
    assert _signature_matches(url)
    # The same URL with its host rewritten afterwards would be refused by S3: the Host is signed.
    assert not _signature_matches(url.replace(public, s3_endpoint))
    response = httpx.get(url)
    assert response.status_code == 200
    assert response.content == b"\x89PNG bytes"


def test_s3_public_endpoint_is_used_only_for_presigned_urls(s3_endpoint: str, bucket: str) -> None:
    # Nothing listens there: the store's own calls must go to the internal endpoint.
    unreachable = _closed_port_url()
    store = S3Storage(bucket, endpoint_url=s3_endpoint, public_endpoint_url=unreachable)

    store.check()
    store.put("classes/a/image.png", b"x", content_type="image/png")
    assert store.get("classes/a/image.png") == b"x"
    url = store.presigned_url("classes/a/image.png", expires_seconds=60)

    assert url is not None and url.startswith(f"{unreachable}/{bucket}/classes/a/image.png?")
    assert _signature_matches(url)


def test_s3_presigned_url_without_a_public_endpoint_names_the_endpoint(
    s3_storage: S3Storage,
) -> None:
    url = s3_storage.presigned_url("classes/a/image.png", expires_seconds=60)

    assert url is not None and url.startswith(f"{s3_storage.endpoint_url}/")
    assert _signature_matches(url)


def test_sample_image_redirects_to_the_public_s3_endpoint(
    make_api: ApiFactory, s3_endpoint: str, bucket: str
) -> None:
    public = _public_name(s3_endpoint)
    api = make_api(
        storage_url=f"s3://{bucket}/{S3_PREFIX}",
        s3_endpoint_url=s3_endpoint,
        s3_public_endpoint_url=public,
    )
    class_id, _ = add_class(api, owner_id=api.alice_id)
    sample_id = add_sample(api, class_id, 2)

    response = api.alice.get(f"/v1/samples/{sample_id}/image", follow_redirects=False)

    assert response.status_code == 307
    location = response.headers["location"]
    assert location.startswith(f"{public}/{bucket}/{S3_PREFIX}/classes/{class_id}/samples/")
    assert _signature_matches(location)
    image = httpx.get(location)
    assert image.status_code == 200
    assert image.content == api.storage.get(sample_key(class_id, 2, "image.png"))


def test_s3_check_fails_fast_when_the_endpoint_is_down(aws_environment: None) -> None:
    down = S3Storage("any-bucket", endpoint_url=_closed_port_url())

    started = time.monotonic()
    with pytest.raises(StorageUnavailable):
        down.check()

    assert time.monotonic() - started < 5


def test_s3_calls_raise_storage_unavailable_when_the_endpoint_is_down(
    aws_environment: None,
) -> None:
    down = S3Storage("any-bucket", endpoint_url=_closed_port_url())

    with pytest.raises(StorageUnavailable):
        down.get("classes/a/image.png")
    with pytest.raises(StorageUnavailable):
        down.put("classes/a/image.png", b"x", content_type="image/png")


def test_s3_check_fails_when_the_bucket_does_not_exist(s3_endpoint: str) -> None:
    missing = S3Storage(f"no-such-bucket-{uuid.uuid4().hex[:8]}", endpoint_url=s3_endpoint)

    with pytest.raises(StorageUnavailable):
        missing.check()
    with pytest.raises(StorageUnavailable):
        missing.get("classes/a/image.png")


# --- building a storage from its URL ----------------------------------------------------------


def test_make_storage_builds_s3_storage_under_the_url_prefix(
    s3_endpoint: str, s3_client: Any, bucket: str
) -> None:
    store = make_storage(f"s3://{bucket}/some/prefix", endpoint_url=s3_endpoint)
    assert isinstance(store, S3Storage)

    store.put("classes/a/image.png", b"x", content_type="image/png")

    assert s3_client.get_object(Bucket=bucket, Key="some/prefix/classes/a/image.png")
    assert list(store.list_keys("")) == ["classes/a/image.png"]


def test_make_storage_builds_local_storage_from_a_file_url(tmp_path: Path) -> None:
    store = make_storage(f"file://{tmp_path / 'blobs'}")

    assert isinstance(store, LocalStorage)
    assert store.root == tmp_path / "blobs"


def test_make_storage_keeps_a_relative_file_url_relative(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)

    store = make_storage("file://data/blobs")

    assert isinstance(store, LocalStorage)
    assert store.root.resolve() == tmp_path / "data" / "blobs"


@pytest.mark.parametrize("url", ["gs://bucket/prefix", "http://127.0.0.1/blobs", "/just/a/path"])
def test_make_storage_rejects_an_unknown_scheme(url: str) -> None:
    with pytest.raises(ValueError, match="unsupported storage URL"):
        make_storage(url)
