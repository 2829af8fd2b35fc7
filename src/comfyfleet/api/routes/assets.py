"""``/api/v2/assets``: upload, from-hash, by-hash, metadata, content (Comfy API v2), and
``from-url`` (our extension: fetched through the SSRF guard in the API tier)."""

from __future__ import annotations

import asyncio
import base64
import hashlib
from datetime import timedelta
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Header, Request
from fastapi.responses import RedirectResponse, Response, StreamingResponse

from comfyfleet.api.auth import Authenticator, Principal
from comfyfleet.api.deps import ReadConn, get_runtime, read_json
from comfyfleet.api.responses import Json
from comfyfleet.assets import repository as repo
from comfyfleet.assets import service
from comfyfleet.assets.schemas import asset_body, display_name
from comfyfleet.assets.upload import parse_upload
from comfyfleet.errors import Conflict, ValidationFailed
from comfyfleet.jobs import idempotency
from comfyfleet.runtime import Runtime
from comfyfleet.storage.base import blob_key, content_disposition
from comfyfleet.storage.ranges import RangeNotSatisfiable, parse_range
from comfyfleet.timeutil import utcnow

router = APIRouter(prefix="/api/v2/assets", tags=["assets"])

AssetsReader = Annotated[Principal, Depends(Authenticator("assets:read"))]
AssetsWriter = Annotated[Principal, Depends(Authenticator("assets:write"))]
UPLOAD_SCOPE = "assets.create"


def parse_tags(values: list[str] | None) -> list[str] | None:
    if not values:
        return None
    if len(values) > 32 or any(len(t) > 128 for t in values):
        raise ValidationFailed("At most 32 tags of at most 128 characters", code="invalid_request")
    return values


def name_and_tags(body: dict[str, Any]) -> tuple[str | None, list[str] | None]:
    """The optional ``file_path`` (sanitised) and ``tags`` of a JSON asset request."""
    file_path = body.get("file_path")
    if file_path is not None and not isinstance(file_path, str):
        raise ValidationFailed("'file_path' must be a string", code="invalid_request")
    tags = body.get("tags")
    if tags is not None and not (isinstance(tags, list) and all(isinstance(t, str) for t in tags)):
        raise ValidationFailed("'tags' must be a list of strings", code="invalid_request")
    return service.clean_file_path(file_path), parse_tags(tags)


async def _answer(runtime: Runtime, stored: service.Stored, *, replayed: bool = False) -> Json:
    body = await asset_body(
        stored.asset,
        storage=runtime.storage,
        lifetime_s=runtime.settings.url_lifetime_s,
        created_new=stored.new_blob,
    )
    headers = {"Idempotency-Replayed": "true"} if replayed else None
    return Json(body, status_code=201 if stored.new_blob else 200, headers=headers)


@router.post("")
async def upload_asset(
    request: Request,
    principal: AssetsWriter,
    idempotency_key: Annotated[str | None, Header(alias="Idempotency-Key")] = None,
) -> Json:
    runtime = get_runtime(request)
    await request.app.state.limiter.check(
        request, kind="submit", rate=principal.plan.submit_rate, identity=principal.key_id
    )
    upload = await parse_upload(
        request.stream(),
        request.headers.get("content-type", ""),
        spool_dir=runtime.settings.data_dir / "spool",
        max_file_bytes=principal.plan.max_upload_bytes,
    )
    try:
        expected = upload.field("expected_hash")
        if expected is not None and service.parse_hash(expected) != upload.blake3_hex:
            raise Conflict(
                "The uploaded bytes do not match expected_hash",
                code="hash_mismatch",
                details={"expected": expected, "actual": service.HASH_PREFIX + upload.blake3_hex},
            )
        file_path = service.clean_file_path(upload.field("file_path") or upload.filename)
        content_type = service.decide_content_type(
            upload.field("content_type") or upload.part_content_type, upload.head, file_path
        )
        tags = parse_tags(upload.fields.get("tags"))
        digest = hashlib.sha256(repr((upload.blake3_hex, file_path, content_type, tags)).encode()).hexdigest()
        key = idempotency.check_key(idempotency_key) if idempotency_key is not None else None
        now = utcnow()
        if key is not None:
            async with runtime.engine.begin() as conn:
                remembered = await idempotency.lookup(
                    conn, tenant_id=principal.tenant_id, scope=UPLOAD_SCOPE, key=key, digest=digest, now=now
                )
                if remembered is not None and remembered.resource_id is not None:
                    asset = await service.get_asset(conn, principal.tenant_id, remembered.resource_id)
                    stored = service.Stored(asset, new_blob=remembered.status_code == 201, new_asset=False)
                    return await _answer(runtime, stored, replayed=True)
        assert upload.path is not None
        # The spool file is ours and deleted below: the backend may adopt it rather than copy it.
        new_blob = await service.store_blob(
            runtime,
            principal.tenant_id,
            upload.path,
            upload.blake3_hex,
            upload.size,
            content_type,
            consume=True,
        )
        async with runtime.engine.begin() as conn:
            asset, created = await service.record_asset(
                conn,
                tenant_id=principal.tenant_id,
                blob_hash=service.HASH_PREFIX + upload.blake3_hex,
                size=upload.size,
                content_type=content_type,
                file_path=file_path,
                tags=tags,
                expires_at=now + timedelta(seconds=principal.plan.retention_s),
            )
            if key is not None:
                await idempotency.remember(
                    conn,
                    tenant_id=principal.tenant_id,
                    scope=UPLOAD_SCOPE,
                    key=key,
                    digest=digest,
                    resource_id=asset.id,
                    status_code=201 if new_blob else 200,
                    now=now,
                    ttl_s=runtime.settings.idempotency_ttl_s,
                )
        return await _answer(runtime, service.Stored(asset, new_blob=new_blob, new_asset=created))
    finally:
        upload.discard()


@router.post("/from-hash")
async def asset_from_hash(request: Request, principal: AssetsWriter) -> Json:
    runtime = get_runtime(request)
    body, _ = await read_json(request, runtime.settings.max_body_bytes)
    if not isinstance(body, dict) or not isinstance(body.get("hash"), str):
        raise ValidationFailed('Send {"hash": "blake3:<hex>", "file_path"?: ...}', code="invalid_request")
    file_path, tags = name_and_tags(body)
    blob_hex = service.parse_hash(body["hash"])
    async with runtime.engine.begin() as conn:
        stored = await service.asset_from_hash(
            conn,
            tenant_id=principal.tenant_id,
            blob_hex=blob_hex,
            file_path=file_path,
            tags=tags,
            retention_s=principal.plan.retention_s,
        )
    return await _answer(runtime, stored)


@router.post("/from-url")
async def asset_from_url(request: Request, principal: AssetsWriter) -> Json:
    """Our extension (the old ``media.url``): the API fetches the URL through the SSRF guard and stores
    the bytes as an asset of the caller's tenant. Refused URLs are 422 ``url_not_allowed`` with the
    reason, failed fetches 422 ``url_fetch_failed``."""
    runtime = get_runtime(request)
    await request.app.state.limiter.check(
        request, kind="submit", rate=principal.plan.submit_rate, identity=principal.key_id
    )
    body, _ = await read_json(request, runtime.settings.max_body_bytes)
    if not isinstance(body, dict) or not isinstance(body.get("url"), str) or len(body["url"]) > 4096:
        raise ValidationFailed(
            'Send {"url": "https://...", "file_path"?: ..., "tags"?: [...]}', code="invalid_request"
        )
    file_path, tags = name_and_tags(body)
    max_bytes = min(runtime.settings.media_max_bytes, principal.plan.max_upload_bytes)
    path, content_type, final_url = await service.fetch_url_to_spool(
        runtime, body["url"], tenant_domains=principal.tenant.url_allowed_domains, max_bytes=max_bytes
    )
    try:
        blob_hex, size, _head = await asyncio.to_thread(service.hash_file, path)
        new_blob = await service.store_blob(runtime, principal.tenant_id, path, blob_hex, size, content_type)
        async with runtime.engine.begin() as conn:
            asset, created = await service.record_asset(
                conn,
                tenant_id=principal.tenant_id,
                blob_hash=service.HASH_PREFIX + blob_hex,
                size=size,
                content_type=content_type,
                file_path=file_path or service.name_from_url(final_url),
                tags=tags,
                expires_at=utcnow() + timedelta(seconds=principal.plan.retention_s),
            )
    finally:
        path.unlink(missing_ok=True)
    return await _answer(runtime, service.Stored(asset, new_blob=new_blob, new_asset=created))


@router.head("/by-hash/{blob_hash}")
async def head_by_hash(blob_hash: str, principal: AssetsReader, conn: ReadConn) -> Response:
    try:
        blob_hex = service.parse_hash(blob_hash)
    except ValidationFailed:
        return Response(status_code=404)  # the SDK accepts only 200 or 404 here
    blob = await repo.get_blob(conn, principal.tenant_id, service.HASH_PREFIX + blob_hex)
    if blob is None:
        return Response(status_code=404)
    return Response(status_code=200, headers={"Content-Length": str(blob.size_bytes)})


@router.get("/{asset_id}")
async def get_asset(
    asset_id: str, request: Request, principal: AssetsReader, conn: ReadConn, inline: bool = False
) -> Json:
    """The asset's metadata with a fresh short-lived ``url``.

    ``?inline=true`` (our extension) also returns the bytes as ``data_base64``, for assets of at most
    ``settings.inline_max_bytes``; a larger asset answers 422 ``inline_too_large`` rather than
    silently leaving the field out, so a caller never mistakes a missing field for an empty file.
    Bytes are never inlined unless asked for: the URL is the way to fetch content.
    """
    runtime = get_runtime(request)
    asset = await service.get_asset(conn, principal.tenant_id, asset_id)
    body = await asset_body(asset, storage=runtime.storage, lifetime_s=runtime.settings.url_lifetime_s)
    if inline:
        data = await service.inline_bytes(runtime, asset)
        body["data_base64"] = base64.b64encode(data).decode("ascii")
    return Json(body)


@router.get("/{asset_id}/content", response_model=None)
async def asset_content(
    asset_id: str,
    request: Request,
    principal: AssetsReader,
    conn: ReadConn,
    range_header: Annotated[str | None, Header(alias="Range")] = None,
) -> Response:
    runtime = get_runtime(request)
    asset = await service.get_asset(conn, principal.tenant_id, asset_id)
    key = blob_key(asset.tenant_id, asset.hash.removeprefix(service.HASH_PREFIX))
    if runtime.settings.storage == "s3":
        signed = await runtime.storage.download_url(
            key,
            filename=display_name(asset),
            content_type=asset.content_type,
            lifetime_s=runtime.settings.url_lifetime_s,
        )
        return RedirectResponse(signed.url, status_code=302)
    return stream_blob(
        runtime,
        key,
        size=asset.size_bytes,
        content_type=asset.content_type,
        filename=display_name(asset),
        range_header=range_header,
    )


def stream_blob(
    runtime: Runtime, key: str, *, size: int, content_type: str, filename: str, range_header: str | None
) -> Response:
    headers: dict[str, Any] = {
        "Accept-Ranges": "bytes",
        # Names are sanitised but keep any script ("画像.png"): the RFC 6266 form keeps the header
        # Latin-1 (what HTTP headers can carry) and quotes safe, with the exact name in filename*.
        "Content-Disposition": content_disposition(filename, "inline"),
        "Cache-Control": "private, max-age=60",
    }
    try:
        byte_range = parse_range(range_header, size)
    except RangeNotSatisfiable:
        from comfyfleet.api.errors import envelope

        return Json(
            envelope("range_not_satisfiable", "The requested range is outside the content"),
            status_code=416,
            headers={"Content-Range": f"bytes */{size}"},
        )
    if byte_range is None:
        headers["Content-Length"] = str(size)
        return StreamingResponse(runtime.storage.open_read(key), media_type=content_type, headers=headers)
    start, end = byte_range
    headers["Content-Range"] = f"bytes {start}-{end}/{size}"
    headers["Content-Length"] = str(end - start + 1)
    return StreamingResponse(
        runtime.storage.open_read(key, start, end), status_code=206, media_type=content_type, headers=headers
    )
