"""The storage seam: a blob store addressed by keys, with short-lived download URLs.

Keys are laid out per tenant (``tenants/<tenant_id>/blobs/<blake3 hex>``) so that a bucket policy or a
lifecycle rule can act per tenant. Backends: ``local`` (a directory; URLs are HMAC-signed and served by
the API) and ``s3`` (boto3; presigned GET URLs).
"""

from __future__ import annotations

import re
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import datetime
from typing import Protocol
from urllib.parse import quote


class StorageError(Exception):
    """A backend failed (network, disk, credentials). Callers may retry."""


class BlobNotFound(StorageError):
    """The key does not exist. Unlike its parent, retrying will not help."""


class InvalidKey(ValueError):
    """A key that could escape the store's namespace (``..``, absolute, odd characters)."""


@dataclass(frozen=True)
class SignedUrl:
    url: str
    expires_at: datetime


def blob_key(tenant_id: str, blake3_hex: str) -> str:
    return validate_key(f"tenants/{tenant_id}/blobs/{blake3_hex}")


# One segment: a conservative character set that means the same thing on every filesystem and in an S3
# key, so a key accepted here is safe to join to a directory. A leading dot is refused: that rules out
# ``.``/``..`` and keeps dot-names free for a backend's own temporary files.
_SEGMENT = re.compile(r"[A-Za-z0-9_~=+@,-][A-Za-z0-9_~=+@,.-]{0,254}")
MAX_KEY_LEN = 1024


def validate_key(key: str) -> str:
    """Return ``key`` unchanged if it is a relative, ``/``-separated path of safe, non-dot segments.

    Both backends call this so that a key valid on one is valid on the other.
    """
    if not key or len(key) > MAX_KEY_LEN:
        raise InvalidKey(f"key length must be 1..{MAX_KEY_LEN}")
    for segment in key.split("/"):
        if not _SEGMENT.fullmatch(segment):
            raise InvalidKey(f"invalid key segment {segment!r} in {key!r}")
    return key


def check_range(start: int, end: int | None) -> None:
    """Refuse a range ``open_read`` cannot mean (HTTP parsing and clamping belong to the caller)."""
    if start < 0 or (end is not None and end < start):
        raise ValueError(f"invalid byte range {start}-{end}")


def check_content_type(content_type: str) -> str:
    """Refuse control characters: a download response copies the value into a header, where CR/LF
    would start a header of the caller's choosing."""
    if any(ord(c) < 0x20 or ord(c) == 0x7F for c in content_type):
        raise ValueError("content_type contains control characters")
    return content_type


def content_disposition(filename: str, disposition: str = "attachment") -> str:
    """A ``Content-Disposition`` value that survives any filename (RFC 6266 + RFC 5987).

    The quoted ASCII fallback drops characters that would break the header; ``filename*`` carries the
    exact name for clients that understand it (all current browsers, curl ``-J``).
    """
    fallback = "".join(c if 0x20 <= ord(c) < 0x7F and c not in '"\\' else "_" for c in filename)
    return f"{disposition}; filename=\"{fallback}\"; filename*=UTF-8''{quote(filename, safe='')}"


class Storage(Protocol):
    """What the asset service needs of a backend. All methods are async and stream.

    Errors: ``BlobNotFound`` for a missing key, ``StorageError`` for backend failures, ``InvalidKey``
    for a key ``validate_key`` refuses.
    """

    async def put_file(self, key: str, path: str, content_type: str, *, consume: bool = False) -> None:
        """Store the file at ``path`` under ``key`` (multipart for large files on S3).

        ``consume``: the caller hands the file over (it only deletes it afterwards, never writes to it
        again), so a backend may adopt it instead of copying it; whether a file is left at ``path``
        afterwards is then unspecified. Without it the source is only read.
        """

    async def exists(self, key: str) -> bool: ...

    async def size(self, key: str) -> int:
        """Size in bytes of ``key``; ``BlobNotFound`` if missing."""
        ...

    async def delete(self, key: str) -> None:
        """Delete ``key``; a missing key is not an error."""

    def open_read(self, key: str, start: int = 0, end: int | None = None) -> AsyncIterator[bytes]:
        """Stream bytes ``start..end`` (inclusive end, as in HTTP Range) of ``key``.

        ``end`` past the end of the blob is clamped; ``start`` past it yields nothing. Being a
        generator, a missing key raises ``BlobNotFound`` on the first iteration, not on the call: check
        ``size`` first when a response status depends on it.
        """
        ...

    async def get_to_file(self, key: str, path: str) -> None:
        """Download ``key`` to ``path``, replacing it atomically (no partial file on failure)."""

    async def download_url(self, key: str, *, filename: str, content_type: str, lifetime_s: int) -> SignedUrl:
        """A URL a client can GET without credentials until it expires."""
        ...
