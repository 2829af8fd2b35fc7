"""Downloading a tenant's media URL to disk through the guarded client, with size, time and type caps.

The size cap counts bytes *after* content decoding (``guarded_http.capped_body``), so a gzip bomb
stops at the cap. The content type is taken from the bytes (magic numbers), and a declared type
the bytes contradict is refused.
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
from dataclasses import dataclass
from pathlib import Path

import anyio
import httpx

from comfyfleet.security.guarded_http import GuardedAsyncClient, capped_body, content_length
from comfyfleet.security.ssrf import UrlFetchFailed, UrlNotAllowed

__all__ = ["FetchedMedia", "canonical_content_type", "fetch_to_file", "sniff_content_type"]

_SNIFF_BYTES = 512  # enough for every signature below, including a WebM EBML header

_GENERIC_TYPES = frozenset({"", "application/octet-stream", "binary/octet-stream", "application/unknown"})

_ALIASES = {
    "image/jpg": "image/jpeg",
    "image/pjpeg": "image/jpeg",
    "image/x-png": "image/png",
    "audio/x-wav": "audio/wav",
    "audio/wave": "audio/wav",
    "audio/vnd.wave": "audio/wav",
    "audio/x-flac": "audio/flac",
    "audio/mp3": "audio/mpeg",
    "audio/x-mp3": "audio/mpeg",
    "audio/mpeg3": "audio/mpeg",
    "audio/x-m4a": "audio/mp4",
    "video/x-m4v": "video/mp4",
    "application/ogg": "audio/ogg",
    "audio/opus": "audio/ogg",
}

# Container formats whose sub-type the first bytes cannot always tell apart (an .m4a and an .mp4
# share the ISO-BMFF header, brands are advisory): a declaration inside the family is consistent.
_FAMILIES = (
    frozenset({"video/mp4", "video/quicktime", "audio/mp4", "image/avif", "image/heic"}),
    frozenset({"video/webm", "audio/webm", "video/x-matroska"}),
    frozenset({"audio/ogg", "video/ogg"}),
)


@dataclass(frozen=True, slots=True)
class FetchedMedia:
    final_url: str
    content_type: str  # sniffed from the bytes, canonical
    size: int  # decoded bytes written to ``path``
    path: Path


def canonical_content_type(value: str) -> str:
    """``"Image/JPG; charset=x"`` -> ``"image/jpeg"``."""
    media_type = value.split(";", 1)[0].strip().lower()
    return _ALIASES.get(media_type, media_type)


def _iso_bmff_type(head: bytes) -> str:
    brand = head[8:12]
    if brand == b"qt  ":
        return "video/quicktime"
    if brand in (b"M4A ", b"M4B "):
        return "audio/mp4"
    if brand in (b"avif", b"avis"):
        return "image/avif"
    if brand in (b"heic", b"heix", b"mif1", b"msf1"):
        return "image/heic"
    return "video/mp4"


def _is_mp3_frame(head: bytes) -> bool:
    # An MPEG audio frame header: 11 sync bits, then no "reserved" version, layer, bitrate or
    # sample rate. Checking all four keeps e.g. a UTF-16 byte-order mark (FF FE) from passing.
    if len(head) < 3 or head[0] != 0xFF or head[1] & 0xE0 != 0xE0:
        return False
    version, layer = (head[1] >> 3) & 0b11, (head[1] >> 1) & 0b11
    bitrate, sample_rate = head[2] >> 4, (head[2] >> 2) & 0b11
    return version != 0b01 and layer != 0 and bitrate != 0b1111 and sample_rate != 0b11


def sniff_content_type(head: bytes) -> str | None:
    """The media type the first bytes of a file announce, or ``None`` when unrecognised."""
    if head.startswith(b"\x89PNG\r\n\x1a\n"):
        return "image/png"
    if head.startswith(b"\xff\xd8\xff"):
        return "image/jpeg"
    if head.startswith((b"GIF87a", b"GIF89a")):
        return "image/gif"
    if head.startswith(b"RIFF") and head[8:12] == b"WEBP":
        return "image/webp"
    if head.startswith((b"RIFF", b"RF64")) and head[8:12] == b"WAVE":
        return "audio/wav"
    if head.startswith((b"II*\x00", b"MM\x00*")):
        return "image/tiff"
    if head[4:8] == b"ftyp":
        return _iso_bmff_type(head)
    if head.startswith(b"\x1a\x45\xdf\xa3"):
        return "video/webm" if b"webm" in head[:64] else "video/x-matroska"
    if head.startswith(b"fLaC"):
        return "audio/flac"
    if head.startswith(b"OggS"):
        return "video/ogg" if b"theora" in head[:64] else "audio/ogg"
    if head.startswith(b"ID3") or _is_mp3_frame(head):
        return "audio/mpeg"
    return None


def _same_family(declared: str, sniffed: str) -> bool:
    return declared == sniffed or any(declared in f and sniffed in f for f in _FAMILIES)


def _check_head(head: bytes, declared: str, allowed: frozenset[str]) -> str:
    sniffed = sniff_content_type(head)
    if sniffed is None:
        raise UrlFetchFailed("the content is not a recognised media format")
    if sniffed not in allowed:
        raise UrlFetchFailed(f"content type {sniffed} is not allowed")
    if declared not in _GENERIC_TYPES and not _same_family(declared, sniffed):
        raise UrlFetchFailed(f"declared content type {declared} but the bytes are {sniffed}")
    return sniffed


def _check_headers(response: httpx.Response, max_bytes: int, allowed: frozenset[str]) -> str:
    """Everything refusable before the first body byte. Returns the declared (canonical) type."""
    if not 200 <= response.status_code < 300:
        raise UrlFetchFailed(f"HTTP {response.status_code}")
    length = content_length(response)
    if length is not None and length > max_bytes:
        raise UrlFetchFailed(f"Content-Length {length} exceeds {max_bytes} bytes")
    declared = canonical_content_type(response.headers.get("content-type", ""))
    if declared not in _GENERIC_TYPES and declared not in allowed:
        raise UrlFetchFailed(f"content type {declared} is not allowed")
    return declared


async def _write_body(
    response: httpx.Response, part: Path, max_bytes: int, declared: str, allowed: frozenset[str]
) -> tuple[str, int]:
    head = b""
    sniffed: str | None = None
    size = 0
    pieces = capped_body(response, max_bytes)
    async with contextlib.aclosing(pieces), await anyio.open_file(part, "wb") as file:
        async for piece in pieces:
            size += len(piece)
            if sniffed is None:
                head += piece
                if len(head) < _SNIFF_BYTES:
                    continue
                sniffed = _check_head(head, declared, allowed)
                piece = head
            await file.write(piece)
        if sniffed is None:  # the whole body was shorter than the sniffing window
            sniffed = _check_head(head, declared, allowed)
            await file.write(head)
    return sniffed, size


async def fetch_to_file(
    client: httpx.AsyncClient,
    url: str,
    dest: Path,
    *,
    max_bytes: int,
    allowed_content_types: frozenset[str],
    total_timeout: float,
) -> FetchedMedia:
    """GET ``url`` with a guarded media client and store the body at ``dest``.

    Nothing is left at ``dest`` (or beside it) unless every check passed. Raises ``UrlNotAllowed``
    for policy refusals, ``UrlFetchFailed`` for everything else.
    """
    if not isinstance(client, GuardedAsyncClient):
        # A plain httpx client would fetch a tenant's URL with no SSRF guard at all.
        raise TypeError("fetch_to_file needs a client made by guarded_client()")
    allowed = frozenset(canonical_content_type(t) for t in allowed_content_types)
    if not allowed:
        raise ValueError("allowed_content_types must not be empty")
    try:
        request = client.build_request(
            "GET", url, headers={"Accept": ", ".join(sorted(allowed)), "Accept-Encoding": "gzip, deflate"}
        )
    except httpx.InvalidURL as exc:
        raise UrlNotAllowed("not a valid URL") from exc
    part = dest.with_name(f".{dest.name}.{secrets.token_hex(6)}.part")
    deadline = asyncio.timeout(total_timeout)
    try:
        async with deadline:
            response = await client.send(request, stream=True, follow_redirects=True)
            try:
                declared = _check_headers(response, max_bytes, allowed)
                sniffed, size = await _write_body(response, part, max_bytes, declared, allowed)
            finally:
                await response.aclose()
    except TimeoutError as exc:
        part.unlink(missing_ok=True)
        if deadline.expired():
            raise UrlFetchFailed(f"no complete download within {total_timeout} s") from exc
        raise
    except httpx.TimeoutException as exc:
        part.unlink(missing_ok=True)
        raise UrlFetchFailed(f"timed out ({type(exc).__name__})") from exc
    except httpx.HTTPError as exc:
        part.unlink(missing_ok=True)
        raise UrlFetchFailed(f"download failed ({type(exc).__name__})") from exc
    except BaseException:
        part.unlink(missing_ok=True)
        raise
    part.replace(dest)
    return FetchedMedia(final_url=str(response.url), content_type=sniffed, size=size, path=dest)
