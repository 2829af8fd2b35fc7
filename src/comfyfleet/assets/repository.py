"""All asset and blob SQL. Tenant-facing queries go through ``tenants.scope.for_tenant``."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import func, select, update
from sqlalchemy.ext.asyncio import AsyncConnection

from comfyfleet.db.tables import assets, blobs
from comfyfleet.tenants.scope import for_tenant


@dataclass(frozen=True)
class AssetRow:
    id: str
    tenant_id: str
    hash: str
    size_bytes: int
    content_type: str
    file_path: str | None
    tags: list[str] | None
    job_id: str | None
    node_id: str | None
    output_type: str | None
    created_at: datetime
    expires_at: datetime | None


@dataclass(frozen=True)
class BlobRow:
    tenant_id: str
    hash: str
    size_bytes: int
    storage_key: str
    created_at: datetime


def _asset(mapping: Mapping[Any, Any]) -> AssetRow:
    return AssetRow(**{c.name: mapping[c.name] for c in assets.columns})


async def existing_ids(conn: AsyncConnection, tenant_id: str, ids: Iterable[str]) -> set[str]:
    wanted = list(ids)
    if not wanted:
        return set()
    rows = await conn.execute(
        for_tenant(select(assets.c.id), assets, tenant_id).where(assets.c.id.in_(wanted))
    )
    return {r[0] for r in rows}


async def get_asset(conn: AsyncConnection, tenant_id: str, asset_id: str) -> AssetRow | None:
    row = (
        await conn.execute(for_tenant(select(assets), assets, tenant_id).where(assets.c.id == asset_id))
    ).first()
    return _asset(row._mapping) if row else None


async def get_assets(conn: AsyncConnection, tenant_id: str, asset_ids: Sequence[str]) -> list[AssetRow]:
    rows = await conn.execute(
        for_tenant(select(assets), assets, tenant_id).where(assets.c.id.in_(list(asset_ids)))
    )
    return [_asset(r._mapping) for r in rows]


async def outputs_for_job(conn: AsyncConnection, tenant_id: str, job_id: str) -> list[AssetRow]:
    rows = await conn.execute(
        for_tenant(select(assets), assets, tenant_id)
        .where(assets.c.job_id == job_id)
        .order_by(assets.c.created_at, assets.c.id)
    )
    return [_asset(r._mapping) for r in rows]


async def get_blob(conn: AsyncConnection, tenant_id: str, blob_hash: str) -> BlobRow | None:
    row = (
        await conn.execute(for_tenant(select(blobs), blobs, tenant_id).where(blobs.c.hash == blob_hash))
    ).first()
    return BlobRow(**row._mapping) if row else None


async def insert_blob(conn: AsyncConnection, blob: BlobRow) -> bool:
    """Record a stored blob; False when it was already recorded (a concurrent upload of the same bytes)."""
    from sqlalchemy.exc import IntegrityError

    try:
        async with conn.begin_nested():
            await conn.execute(blobs.insert().values(**blob.__dict__))
    except IntegrityError:
        return False
    return True


async def find_asset_by_hash(
    conn: AsyncConnection, tenant_id: str, blob_hash: str, *, file_path: str | None
) -> AssetRow | None:
    """The tenant's uploaded (not produced) asset for these bytes and name, for dedup."""
    query = for_tenant(select(assets), assets, tenant_id).where(
        assets.c.hash == blob_hash, assets.c.job_id.is_(None)
    )
    query = query.where(
        assets.c.file_path.is_(None) if file_path is None else assets.c.file_path == file_path
    )
    row = (await conn.execute(query.order_by(assets.c.created_at).limit(1))).first()
    return _asset(row._mapping) if row else None


async def insert_asset(conn: AsyncConnection, asset: AssetRow) -> None:
    await conn.execute(assets.insert().values(**asset.__dict__))


async def extend_expiry(conn: AsyncConnection, tenant_id: str, asset_id: str, expires_at: datetime) -> None:
    """Re-referencing content extends its retention, never shortens it."""
    await conn.execute(
        for_tenant(update(assets), assets, tenant_id)
        .where(assets.c.id == asset_id, assets.c.expires_at.is_not(None), assets.c.expires_at < expires_at)
        .values(expires_at=expires_at)
    )


async def expired_assets(conn: AsyncConnection, *, now: datetime, limit: int = 500) -> list[AssetRow]:
    rows = await conn.execute(
        select(assets).where(assets.c.expires_at.is_not(None), assets.c.expires_at < now).limit(limit)
    )
    return [_asset(r._mapping) for r in rows]


async def delete_assets(conn: AsyncConnection, asset_ids: Sequence[str]) -> None:
    if asset_ids:
        await conn.execute(assets.delete().where(assets.c.id.in_(list(asset_ids))))


async def delete_assets_of_jobs(conn: AsyncConnection, job_ids: Sequence[str]) -> list[AssetRow]:
    if not job_ids:
        return []
    rows = [
        _asset(r._mapping)
        for r in await conn.execute(select(assets).where(assets.c.job_id.in_(list(job_ids))))
    ]
    await delete_assets(conn, [a.id for a in rows])
    return rows


async def orphan_blobs(conn: AsyncConnection, candidates: Iterable[tuple[str, str]]) -> list[BlobRow]:
    """Of the (tenant, hash) pairs given, the blobs no remaining asset points to."""
    orphans: list[BlobRow] = []
    for tenant_id, blob_hash in set(candidates):
        still_used = (
            await conn.execute(
                for_tenant(select(func.count()).select_from(assets), assets, tenant_id).where(
                    assets.c.hash == blob_hash
                )
            )
        ).scalar_one()
        if still_used == 0:
            blob = await get_blob(conn, tenant_id, blob_hash)
            if blob is not None:
                orphans.append(blob)
    return orphans


async def delete_blob(conn: AsyncConnection, tenant_id: str, blob_hash: str) -> None:
    await conn.execute(for_tenant(blobs.delete(), blobs, tenant_id).where(blobs.c.hash == blob_hash))
