"""``Idempotency-Key`` with Stripe's semantics: the first request with a key is remembered for 24 h
together with a digest of its body; the same key with the same body replays the first answer
(``Idempotency-Replayed: true``), the same key with another body is refused (422
``idempotency_key_reuse``)."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import delete, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncConnection

from comfyfleet.db.tables import idempotency_keys
from comfyfleet.errors import ValidationFailed
from comfyfleet.tenants.scope import for_tenant

MAX_KEY_LENGTH = 255


@dataclass(frozen=True)
class Remembered:
    resource_id: str | None
    status_code: int | None


def request_digest(body: bytes) -> str:
    return hashlib.sha256(body).hexdigest()


def check_key(key: str) -> str:
    key = key.strip()
    if not key or len(key) > MAX_KEY_LENGTH or not key.isprintable():
        raise ValidationFailed(
            f"Idempotency-Key must be 1-{MAX_KEY_LENGTH} printable characters", code="invalid_request"
        )
    return key


async def lookup(
    conn: AsyncConnection, *, tenant_id: str, scope: str, key: str, digest: str, now: datetime
) -> Remembered | None:
    """The remembered answer for a key, or None when the key is new (or expired)."""
    row = (
        await conn.execute(
            for_tenant(select(idempotency_keys), idempotency_keys, tenant_id).where(
                idempotency_keys.c.scope == scope, idempotency_keys.c.key == key
            )
        )
    ).first()
    if row is None:
        return None
    if row.expires_at <= now:
        await conn.execute(
            for_tenant(delete(idempotency_keys), idempotency_keys, tenant_id).where(
                idempotency_keys.c.scope == scope, idempotency_keys.c.key == key
            )
        )
        return None
    if row.request_digest != digest:
        raise ValidationFailed(
            "This Idempotency-Key was already used with a different request body",
            code="idempotency_key_reuse",
        )
    return Remembered(resource_id=row.resource_id, status_code=row.status_code)


async def remember(
    conn: AsyncConnection,
    *,
    tenant_id: str,
    scope: str,
    key: str,
    digest: str,
    resource_id: str,
    status_code: int,
    now: datetime,
    ttl_s: int,
) -> bool:
    """Record the answer in the caller's transaction. False when a concurrent request with the same
    key won the race (the caller then rolls back and replays that one)."""
    try:
        async with conn.begin_nested():
            await conn.execute(
                idempotency_keys.insert().values(
                    tenant_id=tenant_id,
                    scope=scope,
                    key=key,
                    request_digest=digest,
                    resource_id=resource_id,
                    status_code=status_code,
                    created_at=now,
                    expires_at=now + timedelta(seconds=ttl_s),
                )
            )
    except IntegrityError:
        return False
    return True


async def purge_expired(conn: AsyncConnection, *, now: datetime) -> int:
    result = await conn.execute(delete(idempotency_keys).where(idempotency_keys.c.expires_at <= now))
    return result.rowcount
