"""Asset and output bodies as the contract shapes them."""

from __future__ import annotations

from typing import Any

from comfyfleet.assets.repository import AssetRow
from comfyfleet.storage.base import Storage, blob_key
from comfyfleet.timeutil import isoformat


async def asset_body(
    asset: AssetRow, *, storage: Storage, lifetime_s: int, created_new: bool | None = None
) -> dict[str, Any]:
    signed = await storage.download_url(
        blob_key(asset.tenant_id, asset.hash.removeprefix("blake3:")),
        filename=display_name(asset),
        content_type=asset.content_type,
        lifetime_s=lifetime_s,
    )
    body: dict[str, Any] = {
        "id": asset.id,
        "hash": asset.hash,
        "size_bytes": asset.size_bytes,
        "content_type": asset.content_type,
        "file_path": asset.file_path,
        "tags": asset.tags or [],
        "created_at": isoformat(asset.created_at),
        "url": signed.url,
        "url_expires_at": isoformat(signed.expires_at),
        "expires_at": isoformat(asset.expires_at),
        "job_id": asset.job_id,
    }
    if created_new is not None:
        body["created_new"] = created_new
    return body


async def output_body(asset: AssetRow, *, storage: Storage, lifetime_s: int) -> dict[str, Any]:
    full = await asset_body(asset, storage=storage, lifetime_s=lifetime_s)
    return {
        "node_id": asset.node_id or "",
        "name": display_name(asset),
        "type": asset.output_type or "file",
        "content_type": asset.content_type,
        "size_bytes": asset.size_bytes,
        "id": asset.id,
        "hash": asset.hash,
        "url": full["url"],
        "url_expires_at": full["url_expires_at"],
        "job_id": asset.job_id,
    }


def display_name(asset: AssetRow) -> str:
    return (asset.file_path or asset.id).rsplit("/", 1)[-1]
