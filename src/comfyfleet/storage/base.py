"""The storage seam: a blob store addressed by keys, with short-lived download URLs.

Keys are laid out per tenant (``tenants/<tenant_id>/blobs/<blake3 hex>``) so that a bucket policy or a
lifecycle rule can act per tenant. Backends: ``local`` (a directory; URLs are HMAC-signed and served by
the API) and ``s3`` (boto3; presigned GET URLs).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import datetime
from typing import Protocol


class StorageError(Exception):
    """A backend failed (network, disk, credentials). Callers may retry."""


@dataclass(frozen=True)
class SignedUrl:
    url: str
    expires_at: datetime


def blob_key(tenant_id: str, blake3_hex: str) -> str:
    return f"tenants/{tenant_id}/blobs/{blake3_hex}"


class Storage(Protocol):
    """What the asset service needs of a backend. All methods are async and stream."""

    async def put_file(self, key: str, path: str, content_type: str) -> None:
        """Store the file at ``path`` under ``key`` (multipart for large files on S3)."""

    async def exists(self, key: str) -> bool: ...

    async def delete(self, key: str) -> None:
        """Delete ``key``; a missing key is not an error."""

    def open_read(
        self, key: str, start: int = 0, end: int | None = None
    ) -> AsyncIterator[bytes]:
        """Stream bytes ``start..end`` (inclusive end, as in HTTP Range) of ``key``."""
        ...

    async def download_url(
        self, key: str, *, filename: str, content_type: str, lifetime_s: int
    ) -> SignedUrl:
        """A URL a client can GET without credentials until it expires."""
        ...
