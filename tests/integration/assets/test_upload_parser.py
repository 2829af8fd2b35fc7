"""The streaming multipart parser on its own: the spooled file and its blake3 are exact whatever the
chunking (boundaries split across chunks, sizes around the write buffer), and a failure mid-way
leaves no spool file behind."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from pathlib import Path

import blake3
import pytest

from comfyfleet.assets.upload import parse_upload
from comfyfleet.errors import PayloadTooLarge, ValidationFailed

BOUNDARY = "----parser-test-boundary"
# Sizes are taken around the spool file's 1 MiB write buffer.
FLUSH_BYTES = 1024 * 1024
CONTENT_TYPE = f"multipart/form-data; boundary={BOUNDARY}"


def body(data: bytes, fields: dict[str, str] | None = None) -> bytes:
    out = b""
    for name, value in (fields or {}).items():
        out += f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n{value}\r\n'.encode()
    out += (
        f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="file"; filename="x.bin"\r\n'
        "Content-Type: application/octet-stream\r\n\r\n"
    ).encode()
    return out + data + f"\r\n--{BOUNDARY}--\r\n".encode()


async def chunks(raw: bytes, size: int) -> AsyncIterator[bytes]:
    for start in range(0, len(raw), size):
        yield raw[start : start + size]


LENGTHS = [0, 1, FLUSH_BYTES - 1, FLUSH_BYTES, FLUSH_BYTES + 1, 2 * FLUSH_BYTES + 12345]
# Byte-sized chunks only for tiny files: over megabytes they would only slow the suite down.
CASES = [(0, 7), (1, 7)] + [(length, chunk) for length in LENGTHS for chunk in (4099, 65536, 1 << 20)]


@pytest.mark.parametrize(("length", "chunk"), CASES)
async def test_spooled_file_and_hash_are_exact(tmp_path: Path, length: int, chunk: int) -> None:
    # Data that contains pieces of the boundary, so the parser's lookbehind is exercised too.
    data = (os.urandom(997) + f"\r\n--{BOUNDARY[:-3]}".encode()) * (length // 1000 + 1)
    data = data[:length]
    raw = body(data, {"file_path": "a.png", "tags": "x"})
    parsed = await parse_upload(chunks(raw, chunk), CONTENT_TYPE, spool_dir=tmp_path, max_file_bytes=1 << 30)
    try:
        assert parsed.path is not None and parsed.path.read_bytes() == data
        assert parsed.size == length
        assert parsed.blake3_hex == blake3.blake3(data).hexdigest()
        assert parsed.head == data[:512]
        assert parsed.field("file_path") == "a.png" and parsed.fields["tags"] == ["x"]
    finally:
        parsed.discard()
    assert list(tmp_path.iterdir()) == []


async def test_over_the_cap_fails_and_leaves_no_spool_file(tmp_path: Path) -> None:
    raw = body(os.urandom(3 * FLUSH_BYTES))
    with pytest.raises(PayloadTooLarge):
        await parse_upload(
            chunks(raw, 65536), CONTENT_TYPE, spool_dir=tmp_path, max_file_bytes=FLUSH_BYTES + 5
        )
    assert list(tmp_path.iterdir()) == []


async def test_a_broken_stream_leaves_no_spool_file(tmp_path: Path) -> None:
    raw = body(os.urandom(2 * FLUSH_BYTES))

    async def dropped() -> AsyncIterator[bytes]:
        async for piece in chunks(raw[: FLUSH_BYTES + 100], 65536):
            yield piece
        raise ConnectionResetError("client went away")

    with pytest.raises(ConnectionResetError):
        await parse_upload(dropped(), CONTENT_TYPE, spool_dir=tmp_path, max_file_bytes=1 << 30)
    assert list(tmp_path.iterdir()) == []


async def test_two_file_parts_or_none_are_refused(tmp_path: Path) -> None:
    twice = body(b"one")[: -len(f"--{BOUNDARY}--\r\n")] + body(b"two")
    with pytest.raises(ValidationFailed):
        await parse_upload(chunks(twice, 64), CONTENT_TYPE, spool_dir=tmp_path, max_file_bytes=1 << 20)
    none = f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="a"\r\n\r\nb\r\n--{BOUNDARY}--\r\n'.encode()
    with pytest.raises(ValidationFailed):
        await parse_upload(chunks(none, 64), CONTENT_TYPE, spool_dir=tmp_path, max_file_bytes=1 << 20)
    assert list(tmp_path.iterdir()) == []
