"""Asset behaviour: storing uploaded bytes under their blake3 hash (dedup inside a tenant only),
creating assets from a known hash, and the worker's two needs: staging an input to a local path and
committing a produced file as an output, with retries and never a base64 fallback."""

from __future__ import annotations

import asyncio
import logging
import mimetypes
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path

import blake3
from sqlalchemy.ext.asyncio import AsyncConnection

from comfyfleet.assets import repository as repo
from comfyfleet.assets.repository import AssetRow, BlobRow
from comfyfleet.errors import NotFound, Retryable, ValidationFailed
from comfyfleet.filenames import sanitize_filename
from comfyfleet.runtime import Runtime
from comfyfleet.security.media_fetch import canonical_content_type, sniff_content_type
from comfyfleet.storage.base import StorageError, blob_key
from comfyfleet.timeutil import utcnow

log = logging.getLogger(__name__)

HASH_PREFIX = "blake3:"
# Declared types the bytes must confirm (inputs reach ComfyUI's decoders).
_CHECKED_FAMILIES = ("image/", "video/", "audio/")


def parse_hash(value: str) -> str:
    """``blake3:<64 hex>`` → the hex; a bad hash is a 422, not a lookup."""
    value = value.strip().lower()
    hex_part = value.removeprefix(HASH_PREFIX)
    well_formed = len(hex_part) == 64 and all(c in "0123456789abcdef" for c in hex_part)
    if not value.startswith(HASH_PREFIX) or not well_formed:
        raise ValidationFailed("A hash is 'blake3:' followed by 64 hex digits", code="invalid_request")
    return hex_part


def clean_file_path(raw: str | None) -> str | None:
    """Only a file name survives: no folders, no traversal, into storage keys or ComfyUI."""
    if raw is None or not raw.strip():
        return None
    return sanitize_filename(raw)


def decide_content_type(declared: str | None, head: bytes, file_path: str | None) -> str:
    """The recorded type: sniffed from the bytes when recognisable. A declared media type that the
    bytes contradict is refused, so ComfyUI never receives a PNG that is not one."""
    sniffed = sniff_content_type(head)
    declared_type = canonical_content_type(declared) if declared else ""
    confirmed = (
        sniffed is not None
        and sniffed.split("/")[0] == declared_type.split("/")[0]
        and _compatible(declared_type, sniffed)
    )
    if declared_type.startswith(_CHECKED_FAMILIES) and not confirmed:
        actual = sniffed or "not a known media format"
        raise ValidationFailed(
            f"Declared content type {declared_type} but the bytes are {actual}", code="content_type_mismatch"
        )
    if sniffed:
        return sniffed
    if declared_type and declared_type != "application/octet-stream":
        return declared_type
    guessed = mimetypes.guess_type(file_path or "")[0]
    return guessed or "application/octet-stream"


def _compatible(declared: str, sniffed: str) -> bool:
    families = (
        {"video/mp4", "video/quicktime", "audio/mp4"},
        {"video/webm", "audio/webm", "video/x-matroska"},
        {"audio/ogg", "video/ogg"},
    )
    return declared == sniffed or any(declared in f and sniffed in f for f in families)


@dataclass(frozen=True)
class Stored:
    asset: AssetRow
    new_blob: bool
    new_asset: bool


async def store_blob(
    runtime: Runtime, tenant_id: str, path: Path, blob_hex: str, size: int, content_type: str,
    *, consume: bool = False,
) -> bool:
    """Put the bytes in storage unless this tenant already has them. True when newly stored.
    ``consume``: the file is the caller's to give away (a spooled upload), see ``Storage.put_file``."""
    async with runtime.reader.connect() as conn:  # a read: no SQLite write lock for it
        if await repo.get_blob(conn, tenant_id, HASH_PREFIX + blob_hex) is not None:
            return False
    key = blob_key(tenant_id, blob_hex)
    await runtime.storage.put_file(key, str(path), content_type, consume=consume)
    async with runtime.engine.begin() as conn:
        return await repo.insert_blob(
            conn, BlobRow(tenant_id=tenant_id, hash=HASH_PREFIX + blob_hex, size_bytes=size, storage_key=key,
                          created_at=utcnow())
        )


async def record_asset(
    conn: AsyncConnection,
    *,
    tenant_id: str,
    blob_hash: str,
    size: int,
    content_type: str,
    file_path: str | None,
    tags: list[str] | None,
    expires_at: datetime | None,
    reuse: bool = True,
) -> tuple[AssetRow, bool]:
    """The tenant's asset for these bytes and name: reused (retention extended) or created."""
    if reuse:
        existing = await repo.find_asset_by_hash(conn, tenant_id, blob_hash, file_path=file_path)
        if existing is not None:
            if expires_at is not None:
                await repo.extend_expiry(conn, tenant_id, existing.id, expires_at)
            return existing, False
    asset = AssetRow(
        id=str(uuid.uuid4()), tenant_id=tenant_id, hash=blob_hash, size_bytes=size, content_type=content_type,
        file_path=file_path, tags=tags or None, job_id=None, node_id=None, output_type=None,
        created_at=utcnow(), expires_at=expires_at,
    )
    await repo.insert_asset(conn, asset)
    return asset, True


async def asset_from_hash(
    conn: AsyncConnection, *, tenant_id: str, blob_hex: str, file_path: str | None, tags: list[str] | None,
    retention_s: int, content_type: str | None = None,
) -> Stored:
    blob = await repo.get_blob(conn, tenant_id, HASH_PREFIX + blob_hex)
    if blob is None:
        raise NotFound("No blob with this hash", code="blob_not_found")
    known = None
    if content_type is None:
        known = await repo.find_asset_by_hash(conn, tenant_id, blob.hash, file_path=None)
    kind = content_type or (known.content_type if known else None) or "application/octet-stream"
    asset, created = await record_asset(
        conn, tenant_id=tenant_id, blob_hash=blob.hash, size=blob.size_bytes, content_type=kind,
        file_path=file_path, tags=tags, expires_at=utcnow() + timedelta(seconds=retention_s),
    )
    return Stored(asset=asset, new_blob=False, new_asset=created)


async def get_asset(conn: AsyncConnection, tenant_id: str, asset_id: str) -> AssetRow:
    try:
        uuid.UUID(asset_id)
    except ValueError:
        raise NotFound("Asset not found") from None
    asset = await repo.get_asset(conn, tenant_id, asset_id)
    if asset is None:
        raise NotFound("Asset not found")
    return asset


async def inline_bytes(runtime: Runtime, asset: AssetRow) -> bytes:
    """An asset's bytes for an inline answer: only up to ``settings.inline_max_bytes`` (422 beyond),
    so a large file can never swell a JSON response."""
    limit = runtime.settings.inline_max_bytes
    if asset.size_bytes > limit:
        raise ValidationFailed(
            f"The asset has {asset.size_bytes} bytes; inline answers carry at most {limit}",
            code="inline_too_large", details={"size_bytes": asset.size_bytes, "inline_max_bytes": limit},
        )
    if asset.size_bytes == 0:
        return b""
    key = blob_key(asset.tenant_id, asset.hash.removeprefix(HASH_PREFIX))
    buffer = bytearray()
    try:
        # Bounded by the recorded size, so the read stays under the limit whatever the store holds.
        async for chunk in runtime.storage.open_read(key, 0, asset.size_bytes - 1):
            buffer += chunk
    except StorageError as exc:
        raise Retryable(f"Could not read asset {asset.id}: {exc}") from exc
    return bytes(buffer)


# ---------------------------------------------------------------- the worker's side


async def stage_asset(runtime: Runtime, asset: AssetRow, destination: Path) -> None:
    """Stream an asset's bytes to a local file (the job's own input folder)."""
    destination.parent.mkdir(parents=True, exist_ok=True)
    key = blob_key(asset.tenant_id, asset.hash.removeprefix(HASH_PREFIX))
    partial = destination.with_name(destination.name + ".part")
    try:
        with partial.open("wb") as handle:
            async for chunk in runtime.storage.open_read(key):
                handle.write(chunk)
        partial.replace(destination)
    except StorageError as exc:
        partial.unlink(missing_ok=True)
        raise Retryable(f"Could not stage input {asset.id}: {exc}") from exc


async def commit_output(
    runtime: Runtime,
    *,
    tenant_id: str,
    job_id: str,
    job_expires_at: datetime,
    path: Path,
    node_id: str,
    output_type: str,
    name: str,
    content_type: str | None = None,
    guard: Callable[[AsyncConnection], Awaitable[bool]] | None = None,
) -> AssetRow | None:
    """Hash and store a produced file, and record it as an output asset of the job. Storage errors
    are retried with backoff; after the last retry the caller gets ``Retryable`` (the job runs again)
    — outputs only ever live in storage, never inline in a response. ``guard`` runs in the
    transaction that records the asset; when it answers False nothing is recorded and None is
    returned (the worker's way to commit no output once a cancel was accepted)."""
    hashed = _hash_if_small(path)
    if hashed is None:
        hashed = await asyncio.to_thread(hash_file, path)
    blob_hex, size, head = hashed
    guessed = mimetypes.guess_type(name)[0]
    kind = content_type or sniff_content_type(head) or guessed or "application/octet-stream"
    blob_hash, key = HASH_PREFIX + blob_hex, blob_key(tenant_id, blob_hex)
    async with runtime.reader.connect() as conn:
        known = await repo.get_blob(conn, tenant_id, blob_hash) is not None
    if not known:  # bytes the tenant has already are not stored again
        await _put_with_retries(runtime, key, path, kind, name)
    # One transaction records the blob and the asset (one commit fewer on the job's path); the blob
    # row stays even when the guard refuses the asset, so retention still finds the stored bytes.
    async with runtime.engine.begin() as conn:
        if not known:
            await repo.insert_blob(
                conn, BlobRow(tenant_id=tenant_id, hash=blob_hash, size_bytes=size, storage_key=key,
                              created_at=utcnow())
            )
        if guard is not None and not await guard(conn):
            return None
        asset = AssetRow(
            id=str(uuid.uuid4()), tenant_id=tenant_id, hash=blob_hash, size_bytes=size,
            content_type=kind, file_path=sanitize_filename(name), tags=None, job_id=job_id, node_id=node_id,
            output_type=output_type, created_at=utcnow(), expires_at=job_expires_at,
        )
        await repo.insert_asset(conn, asset)
    return asset


INLINE_HASH_BYTES = 1 << 20


def _hash_if_small(path: Path) -> tuple[str, int, bytes] | None:
    """Hash here when the file is small (most images): quicker than a hop to a worker thread."""
    return hash_file(path) if path.stat().st_size <= INLINE_HASH_BYTES else None


async def _put_with_retries(runtime: Runtime, key: str, path: Path, content_type: str, name: str) -> None:
    attempts = max(1, runtime.settings.storage_retries)
    for attempt in range(1, attempts + 1):
        try:
            await runtime.storage.put_file(key, str(path), content_type)
            return
        except StorageError as exc:
            if attempt == attempts:
                raise Retryable(f"Storing output {name} failed after {attempts} attempts: {exc}") from exc
            delay = min(8.0, 0.2 * 2 ** (attempt - 1))
            log.warning("storing output %s failed (attempt %d/%d): %s; retrying in %.1fs",
                        name, attempt, attempts, exc, delay)
            await asyncio.sleep(delay)


def hash_file(path: Path) -> tuple[str, int, bytes]:
    hasher = blake3.blake3(max_threads=blake3.blake3.AUTO)
    hasher.update_mmap(str(path))
    with path.open("rb") as handle:
        head = handle.read(512)
    return hasher.hexdigest(), path.stat().st_size, head


# ---------------------------------------------------------------- from-url (our extension)

# What a URL input may be: media ComfyUI loads. Sniffed from the bytes, never trusted from headers.
URL_MEDIA_TYPES = frozenset({
    "image/png", "image/jpeg", "image/webp", "image/gif", "image/tiff",
    "video/mp4", "video/webm", "video/quicktime", "video/x-matroska",
    "audio/wav", "audio/mpeg", "audio/flac", "audio/ogg", "audio/mp4",
})
FETCH_TOTAL_TIMEOUT_S = 120.0


async def fetch_url_to_spool(runtime: Runtime, url: str, *, tenant_domains: list[str] | None,
                             max_bytes: int) -> tuple[Path, str, str]:
    """Download a tenant's media URL through the SSRF guard into the spool folder (the API tier, never
    a GPU worker). Returns the file, its sniffed content type and the final URL."""
    from comfyfleet.security.guarded_http import guarded_client
    from comfyfleet.security.media_fetch import fetch_to_file
    from comfyfleet.security.url_policy import url_policy

    spool = runtime.settings.data_dir / "spool"
    spool.mkdir(parents=True, exist_ok=True)
    destination = spool / f"url-{uuid.uuid4().hex}"
    policy = url_policy(runtime.settings, tenant_domains)
    async with guarded_client(policy, purpose="media", max_body_bytes=max_bytes) as client:
        fetched = await fetch_to_file(
            client, url, destination, max_bytes=max_bytes, allowed_content_types=URL_MEDIA_TYPES,
            total_timeout=FETCH_TOTAL_TIMEOUT_S,
        )
    return fetched.path, fetched.content_type, fetched.final_url


def name_from_url(url: str) -> str | None:
    from urllib.parse import unquote, urlsplit

    last = unquote(urlsplit(url).path.rsplit("/", 1)[-1])
    return sanitize_filename(last) if last else None
