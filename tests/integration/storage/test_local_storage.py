"""LocalStorage against a real directory: blobs, ranges, key confinement and signed download URLs."""

from __future__ import annotations

import base64
import json
import os
import random
from datetime import UTC, datetime
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from comfyfleet.storage.base import (
    BlobNotFound,
    InvalidKey,
    Storage,
    StorageError,
    blob_key,
    content_disposition,
)
from comfyfleet.storage.factory import build_storage
from comfyfleet.storage.local import (
    READ_CHUNK,
    URL_PATH,
    ExpiredSignedUrl,
    InvalidSignedUrl,
    LocalStorage,
)

KEY = blob_key("tenant-1", "ab" * 32)
SIGNING_KEY = b"local-storage-test-signing-key-0123456789"
BASE_URL = "http://files.example.test"
NOW = 1_800_000_000.0


class FakeClock:
    def __init__(self) -> None:
        self.now = NOW

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def storage(tmp_path: Path, clock: FakeClock) -> LocalStorage:
    return LocalStorage(
        tmp_path / "blobs", signing_key=SIGNING_KEY, public_base_url=BASE_URL + "/", clock=clock
    )


def write(path: Path, data: bytes) -> str:
    path.write_bytes(data)
    return str(path)


async def read_all(storage: Storage, key: str, start: int = 0, end: int | None = None) -> bytes:
    return b"".join([chunk async for chunk in storage.open_read(key, start, end)])


def pattern(size: int) -> bytes:
    # Non-repeating bytes, so a read at the wrong offset cannot pass by accident; seeded to be stable.
    return random.Random(size).randbytes(size)


def test_satisfies_the_storage_protocol(storage: LocalStorage) -> None:
    backend: Storage = storage  # checked by mypy
    assert backend is storage


async def test_put_exists_size_delete(storage: LocalStorage, tmp_path: Path) -> None:
    src = write(tmp_path / "src.bin", b"hello blob")
    assert not await storage.exists(KEY)

    await storage.put_file(KEY, src, "application/octet-stream")

    assert await storage.exists(KEY)
    assert await storage.size(KEY) == len(b"hello blob")
    assert await read_all(storage, KEY) == b"hello blob"
    assert storage.local_path(KEY).read_bytes() == b"hello blob"

    await storage.delete(KEY)
    assert not await storage.exists(KEY)
    await storage.delete(KEY)  # deleting a missing key is not an error


async def test_put_replaces_whole_file_and_leaves_no_temporaries(
    storage: LocalStorage, tmp_path: Path
) -> None:
    await storage.put_file(KEY, write(tmp_path / "a", b"first version, longer"), "text/plain")
    await storage.put_file(KEY, write(tmp_path / "b", b"second"), "text/plain")

    assert await read_all(storage, KEY) == b"second"
    assert os.listdir(storage.local_path(KEY).parent) == [KEY.rsplit("/", 1)[1]]


async def test_missing_key(storage: LocalStorage, tmp_path: Path) -> None:
    assert not await storage.exists(KEY)
    with pytest.raises(BlobNotFound):
        await storage.size(KEY)
    with pytest.raises(BlobNotFound):
        await read_all(storage, KEY)
    dest = tmp_path / "out.bin"
    with pytest.raises(BlobNotFound):
        await storage.get_to_file(KEY, str(dest))
    assert not dest.exists()


async def test_a_key_prefix_is_not_a_blob(storage: LocalStorage, tmp_path: Path) -> None:
    await storage.put_file(KEY, write(tmp_path / "src", b"x"), "text/plain")
    prefix = KEY.rsplit("/", 1)[0]
    assert not await storage.exists(prefix)
    with pytest.raises(BlobNotFound):
        await storage.size(prefix)
    with pytest.raises(BlobNotFound):
        await read_all(storage, prefix)
    await storage.delete(prefix)
    assert await storage.exists(KEY)


async def test_put_from_missing_source_is_a_storage_error(storage: LocalStorage, tmp_path: Path) -> None:
    with pytest.raises(StorageError):
        await storage.put_file(KEY, str(tmp_path / "nope"), "text/plain")
    assert not await storage.exists(KEY)


async def test_get_to_file(storage: LocalStorage, tmp_path: Path) -> None:
    data = pattern(READ_CHUNK + 123)
    await storage.put_file(KEY, write(tmp_path / "src", data), "application/octet-stream")
    dest = tmp_path / "dest.bin"
    dest.write_bytes(b"old content")

    await storage.get_to_file(KEY, str(dest))

    assert dest.read_bytes() == data
    assert sorted(p.name for p in tmp_path.iterdir()) == ["blobs", "dest.bin", "src"]


SIZE = 2 * READ_CHUNK + READ_CHUNK // 2


@pytest.mark.parametrize(
    ("start", "end", "expected"),
    [
        (0, None, slice(0, SIZE)),
        (0, 0, slice(0, 1)),
        (10, 19, slice(10, 20)),
        (SIZE - 1, None, slice(SIZE - 1, SIZE)),
        (SIZE - 1, SIZE - 1, slice(SIZE - 1, SIZE)),
        (READ_CHUNK - 5, 2 * READ_CHUNK + 5, slice(READ_CHUNK - 5, 2 * READ_CHUNK + 6)),  # spans chunks
        (100, SIZE + 1000, slice(100, SIZE)),  # an end past the blob is clamped
        (SIZE, None, slice(0, 0)),  # a start at the end reads nothing
        (SIZE + 10, SIZE + 20, slice(0, 0)),
    ],
)
async def test_ranged_reads(
    storage: LocalStorage, tmp_path: Path, start: int, end: int | None, expected: slice
) -> None:
    data = pattern(SIZE)
    await storage.put_file(KEY, write(tmp_path / "src", data), "application/octet-stream")
    chunks = [chunk async for chunk in storage.open_read(KEY, start, end)]
    assert b"".join(chunks) == data[expected]
    assert all(0 < len(chunk) <= READ_CHUNK for chunk in chunks)


@pytest.mark.parametrize(("start", "end"), [(-1, None), (5, 4)])
async def test_invalid_range_is_refused(storage: LocalStorage, start: int, end: int | None) -> None:
    with pytest.raises(ValueError, match="range"):
        await read_all(storage, KEY, start, end)


async def test_reader_closed_early_releases_the_file(storage: LocalStorage, tmp_path: Path) -> None:
    await storage.put_file(KEY, write(tmp_path / "src", pattern(3 * READ_CHUNK)), "application/octet-stream")
    reader = storage.open_read(KEY)
    first = await anext(reader)
    await reader.aclose()  # type: ignore[attr-defined]
    assert len(first) == READ_CHUNK
    await storage.delete(KEY)
    assert not await storage.exists(KEY)


BAD_KEYS = [
    "",
    "../outside",
    "tenants/../../outside",
    "/etc/passwd",
    "tenants//blobs",
    "tenants/./blobs",
    "tenants/blobs/",
    ".hidden",
    "tenants/.tmp-123",
    "a\\..\\b",
    "a/b\x00c",
    "a/b\nc",
    "tenants/t 1/blobs",
    "x" * 1025,
]


@pytest.mark.parametrize("key", BAD_KEYS)
async def test_key_escape_is_refused(storage: LocalStorage, tmp_path: Path, key: str) -> None:
    src = write(tmp_path / "src", b"payload")
    before = sorted(str(p) for p in tmp_path.rglob("*"))

    with pytest.raises(InvalidKey):
        await storage.put_file(key, src, "text/plain")
    with pytest.raises(InvalidKey):
        await storage.exists(key)
    with pytest.raises(InvalidKey):
        await storage.delete(key)
    with pytest.raises(InvalidKey):
        await read_all(storage, key)
    with pytest.raises(InvalidKey):
        await storage.download_url(key, filename="f", content_type="text/plain", lifetime_s=60)
    with pytest.raises(InvalidKey):
        storage.local_path(key)

    assert sorted(str(p) for p in tmp_path.rglob("*")) == before


def test_blob_key_refuses_a_tenant_id_that_escapes() -> None:
    with pytest.raises(InvalidKey):
        blob_key("..", "ab" * 32)


# -- signed URLs -----------------------------------------------------------------------------------------


def token_of(url: str) -> str:
    path = urlsplit(url).path
    assert path.startswith(URL_PATH)
    return path.removeprefix(URL_PATH)


def b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def with_payload_field(token: str, index: int, value: object) -> str:
    """The token with one field of its payload changed and the original signature kept."""
    payload, mac = token.split(".")
    fields = json.loads(unb64(payload))
    fields[index] = value
    return f"{b64(json.dumps(fields, separators=(',', ':')).encode())}.{mac}"


async def signed_token(storage: LocalStorage) -> str:
    url = await storage.download_url(
        KEY, filename="cat picture.png", content_type="image/png", lifetime_s=300
    )
    return token_of(url.url)


async def test_download_url_round_trip(storage: LocalStorage) -> None:
    signed = await storage.download_url(KEY, filename="chat 猫.png", content_type="image/png", lifetime_s=300)

    assert signed.url.startswith(f"{BASE_URL}{URL_PATH}")
    assert signed.expires_at == datetime.fromtimestamp(NOW + 300, UTC)
    grant = storage.verify_signed(token_of(signed.url))
    assert (grant.key, grant.filename, grant.content_type) == (KEY, "chat 猫.png", "image/png")
    assert grant.expires_at == NOW + 300


async def test_expired_url_is_refused(storage: LocalStorage, clock: FakeClock) -> None:
    token = await signed_token(storage)
    assert storage.verify_signed(token, now=NOW + 299).key == KEY

    with pytest.raises(ExpiredSignedUrl):
        storage.verify_signed(token, now=NOW + 300)
    clock.now = NOW + 3600
    with pytest.raises(ExpiredSignedUrl):
        storage.verify_signed(token)


@pytest.mark.parametrize(
    ("index", "value"),
    [
        (0, blob_key("tenant-2", "ab" * 32)),  # another tenant's blob
        (1, int(NOW) + 10 * 365 * 86400),  # a later expiry
        (2, "evil.html"),  # another filename
        (3, "text/html"),  # another content type
    ],
    ids=["key", "expiry", "filename", "content_type"],
)
async def test_altered_payload_is_refused(storage: LocalStorage, index: int, value: object) -> None:
    token = await signed_token(storage)
    with pytest.raises(InvalidSignedUrl) as caught:
        storage.verify_signed(with_payload_field(token, index, value))
    assert not isinstance(caught.value, ExpiredSignedUrl)


def flip_last_char(text: str) -> str:
    return text[:-1] + ("A" if text[-1] != "A" else "B")


@pytest.mark.parametrize(
    "alter",
    [
        lambda t: flip_last_char(t),  # signature altered
        lambda t: t[:-1],  # signature truncated
        lambda t: t + "A",  # signature extended
        lambda t: t + "=",  # padding a lenient decoder would ignore
        lambda t: t.split(".")[0],  # signature removed
        lambda t: t.split(".")[0] + ".",  # signature empty
        lambda t: "." + t.split(".")[1],  # payload removed
        lambda t: "A" + t,  # payload altered
        lambda t: t.replace(".", "", 1),  # separator removed
        lambda t: "",
        lambda t: "x" * 10_000,
    ],
    ids=[
        "mac-flipped",
        "mac-truncated",
        "mac-extended",
        "mac-padded",
        "mac-removed",
        "mac-empty",
        "payload-removed",
        "payload-altered",
        "no-separator",
        "empty",
        "huge",
    ],
)
async def test_altered_token_is_refused(storage: LocalStorage, alter: object) -> None:
    token = await signed_token(storage)
    assert callable(alter)
    with pytest.raises(InvalidSignedUrl):
        storage.verify_signed(alter(token))


async def test_token_signed_with_another_key_is_refused(storage: LocalStorage, tmp_path: Path) -> None:
    other = LocalStorage(
        tmp_path / "other", signing_key=b"another-signing-key-0123456789ab", public_base_url=BASE_URL
    )
    token = token_of((await other.download_url(KEY, filename="f", content_type="a/b", lifetime_s=60)).url)
    with pytest.raises(InvalidSignedUrl):
        storage.verify_signed(token)


async def test_header_injection_in_content_type_is_refused(storage: LocalStorage) -> None:
    with pytest.raises(ValueError, match="control"):
        await storage.download_url(KEY, filename="f", content_type="text/plain\r\nX-Evil: 1", lifetime_s=60)


@pytest.mark.parametrize("lifetime_s", [0, -5])
async def test_non_positive_lifetime_is_refused(storage: LocalStorage, lifetime_s: int) -> None:
    with pytest.raises(ValueError, match="lifetime"):
        await storage.download_url(KEY, filename="f", content_type="a/b", lifetime_s=lifetime_s)


def test_short_signing_key_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="signing_key"):
        LocalStorage(tmp_path, signing_key=b"short", public_base_url=BASE_URL)


def test_content_disposition_keeps_any_filename() -> None:
    value = content_disposition('chat "猫"\r\n.png')
    assert value == (
        "attachment; filename=\"chat _____.png\"; filename*=UTF-8''chat%20%22%E7%8C%AB%22%0D%0A.png"
    )
    assert "\r" not in value and "\n" not in value


async def test_factory_builds_local_storage(tmp_path: Path) -> None:
    storage = build_storage(
        "local",
        root=str(tmp_path / "r"),
        signing_key="a-string-signing-key-0123456789",
        public_base_url=BASE_URL,
    )
    assert isinstance(storage, LocalStorage)
    await storage.put_file(KEY, write(tmp_path / "src", b"via factory"), "text/plain")
    assert await read_all(storage, KEY) == b"via factory"


def test_factory_refuses_unknown_kind() -> None:
    with pytest.raises(ValueError, match="unknown storage kind"):
        build_storage("ftp", root="/tmp")  # type: ignore[arg-type]
