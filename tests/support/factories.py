"""Small factories: a tenant with a key, through the project's own repositories."""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy.ext.asyncio import AsyncEngine

from comfyfleet.config import Settings
from comfyfleet.tenants import keys as key_codec
from comfyfleet.tenants import repository as repo


@dataclass(frozen=True)
class TenantWithKey:
    id: str
    name: str
    key: str
    key_id: str

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.key}"}


async def make_tenant(
    engine: AsyncEngine,
    settings: Settings,
    name: str | None = None,
    *,
    plan: str = "pro",
    scopes: list[str] | None = None,
) -> TenantWithKey:
    import uuid

    async with engine.begin() as conn:
        tenant = await repo.create_tenant(conn, name or f"tenant-{uuid.uuid4().hex[:8]}", plan)
        new = key_codec.generate_key(settings.env, settings.secret_bytes("key_pepper"))
        record = await repo.insert_key(
            conn,
            tenant_id=tenant.id,
            lookup=new.lookup,
            digest=new.digest,
            scopes=scopes or list(key_codec.SCOPES[:4]),
            name=None,
        )
    return TenantWithKey(id=tenant.id, name=tenant.name, key=new.plaintext, key_id=record.id)


async def add_key(engine: AsyncEngine, settings: Settings, tenant_id: str, scopes: list[str]) -> str:
    async with engine.begin() as conn:
        new = key_codec.generate_key(settings.env, settings.secret_bytes("key_pepper"))
        await repo.insert_key(
            conn, tenant_id=tenant_id, lookup=new.lookup, digest=new.digest, scopes=scopes, name=None
        )
    return new.plaintext
