"""Every query on tenants and API keys."""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import select, update
from sqlalchemy.ext.asyncio import AsyncConnection

from comfyfleet.db.tables import api_keys, tenants
from comfyfleet.timeutil import utcnow


@dataclass(frozen=True)
class Tenant:
    id: str
    name: str
    plan: str
    created_at: datetime
    url_allowed_domains: list[str] | None = None


@dataclass(frozen=True)
class ApiKeyRecord:
    id: str
    tenant_id: str
    lookup: str
    digest: str
    scopes: list[str]
    name: str | None
    created_at: datetime
    last_used_at: datetime | None
    revoked_at: datetime | None


async def create_tenant(conn: AsyncConnection, name: str, plan: str) -> Tenant:
    tenant = Tenant(id=str(uuid.uuid4()), name=name, plan=plan, created_at=utcnow())
    await conn.execute(
        tenants.insert().values(id=tenant.id, name=name, plan=plan, created_at=tenant.created_at)
    )
    return tenant


async def get_tenant(conn: AsyncConnection, tenant_id_or_name: str) -> Tenant | None:
    row = (
        await conn.execute(
            select(tenants).where((tenants.c.id == tenant_id_or_name) | (tenants.c.name == tenant_id_or_name))
        )
    ).first()
    return Tenant(**row._mapping) if row else None


async def list_tenants(conn: AsyncConnection) -> list[Tenant]:
    rows = await conn.execute(select(tenants).order_by(tenants.c.created_at))
    return [Tenant(**row._mapping) for row in rows]


async def set_plan(conn: AsyncConnection, tenant_id: str, plan: str) -> None:
    await conn.execute(update(tenants).where(tenants.c.id == tenant_id).values(plan=plan))


async def insert_key(
    conn: AsyncConnection, *, tenant_id: str, lookup: str, digest: str, scopes: list[str], name: str | None
) -> ApiKeyRecord:
    record = ApiKeyRecord(
        id=str(uuid.uuid4()),
        tenant_id=tenant_id,
        lookup=lookup,
        digest=digest,
        scopes=scopes,
        name=name,
        created_at=utcnow(),
        last_used_at=None,
        revoked_at=None,
    )
    await conn.execute(
        api_keys.insert().values(
            id=record.id,
            tenant_id=tenant_id,
            lookup=lookup,
            digest=digest,
            scopes=scopes,
            name=name,
            created_at=record.created_at,
        )
    )
    return record


async def key_by_lookup(conn: AsyncConnection, lookup: str) -> tuple[ApiKeyRecord, Tenant] | None:
    row = (
        await conn.execute(
            select(
                api_keys,
                tenants.c.name.label("tenant_name"),
                tenants.c.plan,
                tenants.c.created_at.label("tenant_created_at"),
                tenants.c.url_allowed_domains,
            )
            .join(tenants, tenants.c.id == api_keys.c.tenant_id)
            .where(api_keys.c.lookup == lookup)
        )
    ).first()
    if row is None:
        return None
    m = row._mapping
    key = ApiKeyRecord(**{c.name: m[c.name] for c in api_keys.columns})
    tenant = Tenant(
        id=m["tenant_id"],
        name=m["tenant_name"],
        plan=m["plan"],
        created_at=m["tenant_created_at"],
        url_allowed_domains=m["url_allowed_domains"],
    )
    return key, tenant


async def list_keys(conn: AsyncConnection, tenant_id: str | None = None) -> list[ApiKeyRecord]:
    query = select(api_keys).order_by(api_keys.c.created_at)
    if tenant_id is not None:
        query = query.where(api_keys.c.tenant_id == tenant_id)
    return [ApiKeyRecord(**row._mapping) for row in await conn.execute(query)]


async def revoke_key(conn: AsyncConnection, key_id_or_lookup: str) -> bool:
    result = await conn.execute(
        update(api_keys)
        .where((api_keys.c.id == key_id_or_lookup) | (api_keys.c.lookup == key_id_or_lookup))
        .where(api_keys.c.revoked_at.is_(None))
        .values(revoked_at=utcnow())
    )
    return result.rowcount > 0


async def touch_key(conn: AsyncConnection, key_id: str, when: datetime) -> None:
    await conn.execute(update(api_keys).where(api_keys.c.id == key_id).values(last_used_at=when))
