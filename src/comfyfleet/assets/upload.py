"""Streaming multipart parsing for ``POST /api/v2/assets``: the ``file`` part is hashed (blake3) and
written to a temporary file in one pass as it arrives, never held whole in memory; the other parts
are small text fields.

Everything runs on the event loop, per received chunk. Handing the hashing and writing to a worker
thread was tried and measured slower over HTTP on a 2-vCPU host (about 90-190 MB/s against 190-250 MB/s
for this, 256 MiB uploads, alternating runs): the thread waits for the GIL behind the parser, and
blake3 plus a page-cache write of one chunk cost less than the hand-off.
"""

from __future__ import annotations

import asyncio
import os
import tempfile
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import blake3
from python_multipart.multipart import MultipartParser, parse_options_header

from comfyfleet.errors import PayloadTooLarge, ValidationFailed

TEXT_FIELD_LIMIT = 64 * 1024
SNIFF_BYTES = 512


@dataclass
class ParsedUpload:
    fields: dict[str, list[str]] = field(default_factory=dict)
    path: Path | None = None
    filename: str | None = None
    part_content_type: str | None = None
    size: int = 0
    blake3_hex: str = ""
    head: bytes = b""

    def field(self, name: str) -> str | None:
        values = self.fields.get(name)
        return values[-1] if values else None

    def discard(self) -> None:
        if self.path is not None:
            self.path.unlink(missing_ok=True)
            self.path = None


async def parse_upload(
    stream: AsyncIterator[bytes], content_type: str, *, spool_dir: Path, max_file_bytes: int
) -> ParsedUpload:
    media_type, params = parse_options_header(content_type)
    boundary = params.get(b"boundary")
    if media_type != b"multipart/form-data" or not boundary:
        raise ValidationFailed("Send the upload as multipart/form-data", code="invalid_request")
    await asyncio.to_thread(spool_dir.mkdir, parents=True, exist_ok=True)
    result = ParsedUpload()
    state = _PartState(result, spool_dir, max_file_bytes)
    parser = MultipartParser(boundary, state.callbacks())  # type: ignore[arg-type]  # a TypedDict of callbacks
    try:
        async for chunk in stream:
            parser.write(chunk)
            state.raise_pending()
        parser.finalize()
        state.raise_pending()
    except BaseException:
        state.close()
        result.discard()
        raise
    state.close()
    if result.path is None:
        raise ValidationFailed("The multipart body has no 'file' part", code="invalid_request")
    return result


class _PartState:
    def __init__(self, result: ParsedUpload, spool_dir: Path, max_file_bytes: int) -> None:
        self.result = result
        self.spool_dir = spool_dir
        self.max_file_bytes = max_file_bytes
        self.header_name = b""
        self.header_value = b""
        self.headers: dict[bytes, bytes] = {}
        self.name: str | None = None
        self.text = bytearray()
        self.file: object = None
        self.hasher = blake3.blake3()
        self.error: BaseException | None = None

    def callbacks(self) -> dict[str, object]:
        return {
            "on_part_begin": self.part_begin,
            "on_header_field": lambda data, start, end: self._append("header_name", data[start:end]),
            "on_header_value": lambda data, start, end: self._append("header_value", data[start:end]),
            "on_header_end": self.header_end,
            "on_headers_finished": self.headers_finished,
            "on_part_data": self.part_data,
            "on_part_end": self.part_end,
        }

    def _append(self, attribute: str, data: bytes) -> None:
        setattr(self, attribute, getattr(self, attribute) + data)

    def raise_pending(self) -> None:
        if self.error is not None:
            raise self.error

    def part_begin(self) -> None:
        self.headers, self.name, self.text = {}, None, bytearray()

    def header_end(self) -> None:
        self.headers[self.header_name.lower()] = self.header_value
        self.header_name = self.header_value = b""

    def headers_finished(self) -> None:
        _, params = parse_options_header(self.headers.get(b"content-disposition", b""))
        self.name = params.get(b"name", b"").decode("utf-8", "replace")
        if self.name == "file":
            if self.result.path is not None:
                self.error = ValidationFailed("Send exactly one 'file' part", code="invalid_request")
                return
            filename = params.get(b"filename")
            self.result.filename = filename.decode("utf-8", "replace") if filename else None
            part_type = self.headers.get(b"content-type")
            self.result.part_content_type = part_type.decode("latin-1") if part_type else None
            handle, path = tempfile.mkstemp(prefix="upload-", dir=self.spool_dir)
            self.file = os.fdopen(handle, "wb", buffering=1024 * 1024)
            self.result.path = Path(path)

    def part_data(self, data: bytes, start: int, end: int) -> None:
        if self.error is not None:
            return
        if self.name == "file" and self.file is not None:
            self.result.size += end - start
            if self.result.size > self.max_file_bytes:
                limit = self.max_file_bytes
                self.error = PayloadTooLarge(f"The file exceeds this plan's upload limit of {limit} bytes")
                return
            if len(self.result.head) < SNIFF_BYTES:
                self.result.head += data[start : min(end, start + SNIFF_BYTES - len(self.result.head))]
            # A view, not a slice: both consumers take buffers, so the chunk is not copied first.
            piece = memoryview(data)[start:end]
            self.hasher.update(piece)
            self.file.write(piece)  # type: ignore[attr-defined]
        else:
            self.text += data[start:end]
            if len(self.text) > TEXT_FIELD_LIMIT:
                self.error = PayloadTooLarge("A text field of the upload is too large")

    def part_end(self) -> None:
        if self.name == "file" and self.file is not None:
            self.file.close()  # type: ignore[attr-defined]
            self.file = None
            self.result.blake3_hex = self.hasher.hexdigest()
        elif self.name:
            self.result.fields.setdefault(self.name, []).append(self.text.decode("utf-8", "replace"))

    def close(self) -> None:
        if self.file is not None:
            self.file.close()  # type: ignore[attr-defined]
            self.file = None
