"""S3Storage against a real S3 endpoint (SeaweedFS, see tests/fixtures/seaweedfs.py)."""

from __future__ import annotations

import asyncio
import hashlib
import random
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import httpx
import pytest

from comfyfleet.storage.base import BlobNotFound, InvalidKey, Storage, StorageError
from comfyfleet.storage.factory import build_storage
from comfyfleet.storage.s3 import READ_CHUNK, S3Storage
from tests.fixtures.seaweedfs import SeaweedFS

pytestmark = pytest.mark.s3

MiB = 1 << 20


def make_storage(sw: SeaweedFS, **overrides: object) -> S3Storage:
    params: dict[str, object] = {
        "endpoint_url": sw.endpoint_url,
        "access_key_id": sw.access_key_id,
        "secret_access_key": sw.secret_access_key,
        "region": sw.region,
        "addressing_style": "path",
        # Small enough that a test file goes multipart; s3transfer raises parts to S3's 5 MiB minimum.
        "multipart_threshold": 1 * MiB,
        "multipart_chunk": 5 * MiB,
        "max_attempts": 1,
        **overrides,
    }
    bucket = str(params.pop("bucket", sw.bucket))
    return S3Storage(bucket, **params)  # type: ignore[arg-type]


@pytest.fixture(scope="session")
def s3(seaweedfs: SeaweedFS) -> Iterator[S3Storage]:
    # One backend for the session: a boto3 client costs a noticeable fraction of a second to build.
    # It is bound to no event loop (each call looks up the running one), so every test's loop may use it.
    storage = make_storage(seaweedfs)
    try:
        yield storage
    finally:
        asyncio.run(storage.close())


@pytest.fixture(scope="session")
def raw(seaweedfs: SeaweedFS) -> Iterator[Any]:
    """A plain boto3 client, to look at what the backend did."""
    client = seaweedfs.client()
    yield client
    client.close()


@pytest.fixture
def key() -> str:
    # The bucket lives for the whole session: every test writes under its own prefix.
    return f"tenants/t-{uuid.uuid4().hex[:12]}/blobs/{'cd' * 32}"


def write(path: Path, data: bytes) -> str:
    path.write_bytes(data)
    return str(path)


def pattern(size: int) -> bytes:
    return random.Random(size).randbytes(size)


async def read_all(storage: Storage, key: str, start: int = 0, end: int | None = None) -> bytes:
    return b"".join([chunk async for chunk in storage.open_read(key, start, end)])


def test_satisfies_the_storage_protocol(s3: S3Storage) -> None:
    backend: Storage = s3  # checked by mypy
    assert backend is s3


async def test_put_exists_size_delete(s3: S3Storage, raw: Any, key: str, tmp_path: Path) -> None:
    assert not await s3.exists(key)

    await s3.put_file(key, write(tmp_path / "src", b"hello s3"), "text/plain")

    assert await s3.exists(key)
    assert await s3.size(key) == len(b"hello s3")
    assert await read_all(s3, key) == b"hello s3"
    head = raw.head_object(Bucket=s3.bucket, Key=key)
    assert head["ContentType"] == "text/plain"

    await s3.delete(key)
    assert not await s3.exists(key)
    await s3.delete(key)  # deleting a missing key is not an error


async def test_missing_key(s3: S3Storage, key: str, tmp_path: Path) -> None:
    with pytest.raises(BlobNotFound):
        await s3.size(key)
    with pytest.raises(BlobNotFound):
        await read_all(s3, key)
    dest = tmp_path / "dest"
    with pytest.raises(BlobNotFound):
        await s3.get_to_file(key, str(dest))
    assert not dest.exists()


async def test_ranged_reads(s3: S3Storage, key: str, tmp_path: Path) -> None:
    size = 2 * READ_CHUNK + READ_CHUNK // 2
    data = pattern(size)
    await s3.put_file(key, write(tmp_path / "src", data), "application/octet-stream")
    cases: list[tuple[int, int | None, bytes]] = [
        (0, None, data),
        (0, 0, data[:1]),
        (10, 19, data[10:20]),
        (size - 1, None, data[-1:]),
        (READ_CHUNK - 5, 2 * READ_CHUNK + 5, data[READ_CHUNK - 5 : 2 * READ_CHUNK + 6]),
        (100, size + 1000, data[100:]),  # an end past the blob is clamped
        (size, None, b""),  # a start at the end reads nothing, as on the local backend
        (size + 10, size + 20, b""),
    ]
    for start, end, expected in cases:
        chunks = [chunk async for chunk in s3.open_read(key, start, end)]
        assert b"".join(chunks) == expected, (start, end)
        assert all(0 < len(chunk) <= READ_CHUNK for chunk in chunks)


async def test_reader_closed_early(s3: S3Storage, key: str, tmp_path: Path) -> None:
    await s3.put_file(key, write(tmp_path / "src", pattern(3 * READ_CHUNK)), "application/octet-stream")
    reader = s3.open_read(key)
    first = await anext(reader)
    await reader.aclose()  # type: ignore[attr-defined]
    assert len(first) == READ_CHUNK
    assert await read_all(s3, key, 0, 9) == pattern(3 * READ_CHUNK)[:10]


async def test_multipart_upload_and_download(s3: S3Storage, raw: Any, key: str, tmp_path: Path) -> None:
    data = pattern(11 * MiB + 7)
    await s3.put_file(key, write(tmp_path / "big", data), "application/octet-stream")

    head = raw.head_object(Bucket=s3.bucket, Key=key)
    # A multipart object's ETag is "<md5 of part md5s>-<part count>": 11 MiB in 5 MiB parts is 3.
    assert head["ETag"].strip('"').endswith("-3")
    assert head["ContentLength"] == len(data)

    dest = tmp_path / "down"
    await s3.get_to_file(key, str(dest))
    assert hashlib.sha256(dest.read_bytes()).digest() == hashlib.sha256(data).digest()
    assert await read_all(s3, key, 5 * MiB - 3, 5 * MiB + 2) == data[5 * MiB - 3 : 5 * MiB + 3]


async def test_small_file_is_a_single_put(s3: S3Storage, raw: Any, key: str, tmp_path: Path) -> None:
    await s3.put_file(key, write(tmp_path / "small", b"tiny"), "application/octet-stream")
    head = raw.head_object(Bucket=s3.bucket, Key=key)
    assert "-" not in head["ETag"]


async def test_presigned_url_downloads_the_blob(s3: S3Storage, key: str, tmp_path: Path) -> None:
    data = pattern(300_000)
    await s3.put_file(key, write(tmp_path / "src", data), "application/octet-stream")

    signed = await s3.download_url(key, filename="result 猫.png", content_type="image/png", lifetime_s=300)

    async with httpx.AsyncClient() as http:
        response = await http.get(signed.url)
    assert response.status_code == 200
    assert response.content == data
    assert response.headers["content-type"] == "image/png"
    assert "filename*=UTF-8''result%20%E7%8C%AB.png" in response.headers["content-disposition"]


def replace_query(url: str, **changes: str) -> str:
    parts = urlsplit(url)
    query = dict(parse_qsl(parts.query, keep_blank_values=True))
    query.update(changes)
    return urlunsplit(parts._replace(query=urlencode(query)))


async def test_altered_presigned_url_is_refused(s3: S3Storage, key: str, tmp_path: Path) -> None:
    await s3.put_file(key, write(tmp_path / "src", b"secret"), "text/plain")
    signed = await s3.download_url(key, filename="a.txt", content_type="text/plain", lifetime_s=300)
    other_key = key.rsplit("/", 1)[0] + "/" + "ef" * 32
    altered = [
        replace_query(signed.url, **{"response-content-type": "text/html"}),
        replace_query(signed.url, **{"X-Amz-Expires": "604800"}),
        signed.url.replace(key, other_key),
    ]
    async with httpx.AsyncClient() as http:
        for url in altered:
            response = await http.get(url)
            assert response.status_code == 403, url


async def test_presign_arguments_are_checked(s3: S3Storage, key: str) -> None:
    for lifetime_s in (0, 7 * 24 * 3600 + 1):
        with pytest.raises(ValueError, match="lifetime"):
            await s3.download_url(key, filename="f", content_type="a/b", lifetime_s=lifetime_s)
    with pytest.raises(ValueError, match="control"):
        await s3.download_url(key, filename="f", content_type="text/plain\r\nX-Evil: 1", lifetime_s=60)


@pytest.mark.parametrize("bad_key", ["../x", "/abs", "a//b", "a/./b", ".hidden", ""])
async def test_key_escape_is_refused(s3: S3Storage, bad_key: str, tmp_path: Path) -> None:
    src = write(tmp_path / "src", b"x")
    with pytest.raises(InvalidKey):
        await s3.put_file(bad_key, src, "text/plain")
    with pytest.raises(InvalidKey):
        await s3.exists(bad_key)
    with pytest.raises(InvalidKey):
        await read_all(s3, bad_key)
    with pytest.raises(InvalidKey):
        await s3.download_url(bad_key, filename="f", content_type="a/b", lifetime_s=60)


async def test_backend_failures_are_storage_errors(seaweedfs: SeaweedFS, key: str, tmp_path: Path) -> None:
    src = write(tmp_path / "src", b"x")
    wrong_secret = make_storage(seaweedfs, secret_access_key="not-the-secret")
    no_bucket = make_storage(seaweedfs, bucket=f"missing-{uuid.uuid4().hex[:12]}")
    try:
        for storage in (wrong_secret, no_bucket):
            with pytest.raises(StorageError) as caught:
                await storage.put_file(key, src, "text/plain")
            assert not isinstance(caught.value, BlobNotFound)
            with pytest.raises(StorageError):
                await read_all(storage, key)
        with pytest.raises(StorageError):
            await wrong_secret.size(key)
    finally:
        await wrong_secret.close()
        await no_bucket.close()


async def test_ensure_bucket_creates_once(seaweedfs: SeaweedFS, key: str, tmp_path: Path) -> None:
    storage = make_storage(seaweedfs, bucket=f"fresh-{uuid.uuid4().hex[:12]}")
    try:
        await storage.ensure_bucket()
        await storage.ensure_bucket()  # idempotent
        await storage.put_file(key, write(tmp_path / "src", b"in a new bucket"), "text/plain")
        assert await read_all(storage, key) == b"in a new bucket"
    finally:
        await storage.close()


async def test_factory_builds_s3_storage(seaweedfs: SeaweedFS, key: str, tmp_path: Path) -> None:
    storage = build_storage("s3", **seaweedfs.storage_params())
    assert isinstance(storage, S3Storage)
    try:
        await storage.put_file(key, write(tmp_path / "src", b"via factory"), "text/plain")
        assert await read_all(storage, key) == b"via factory"
    finally:
        await storage.close()
