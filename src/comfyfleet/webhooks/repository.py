"""All webhook SQL. Tenant-facing statements take the caller's tenant and go through
``tenants.scope.for_tenant``, so another tenant's endpoint or delivery is indistinguishable from a
missing one. Sender-facing statements act on deliveries the sender holds a lease on (``locked_by``
is the sender's claim token) and say so in their WHERE clause."""

from __future__ import annotations

import base64
import json
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import RowMapping, and_, delete, func, or_, select, update
from sqlalchemy.ext.asyncio import AsyncConnection
from sqlalchemy.sql.elements import ColumnElement

from comfyfleet.db.tables import tenants, webhook_attempts, webhook_deliveries, webhook_endpoints
from comfyfleet.tenants.scope import for_tenant

E, D, A = webhook_endpoints, webhook_deliveries, webhook_attempts

KIND_ENDPOINT = "endpoint"
KIND_JOB_URL = "job_url"

PENDING, DELIVERED, DEAD, DISABLED = "pending", "delivered", "dead", "disabled"
DELIVERY_STATUSES = (PENDING, DELIVERED, DEAD, DISABLED)


@dataclass(frozen=True)
class EndpointRow:
    id: str
    tenant_id: str
    kind: str
    url: str
    description: str | None
    events: list[str]
    secret: str  # ciphertext
    previous_secret: str | None  # ciphertext
    previous_secret_expires_at: datetime | None
    enabled: bool
    disabled_reason: str | None
    created_at: datetime
    updated_at: datetime


@dataclass(frozen=True)
class DeliveryRow:
    id: str
    tenant_id: str
    endpoint_id: str | None
    url: str | None
    target: str
    event_type: str
    job_id: str | None
    payload: dict[str, Any]
    status: str
    attempts: int
    next_attempt_at: datetime
    locked_by: str | None
    locked_until: datetime | None
    created_at: datetime
    delivered_at: datetime | None


@dataclass(frozen=True)
class AttemptRow:
    id: int
    delivery_id: str
    tenant_id: str
    attempted_at: datetime
    status_code: int | None
    error: str | None
    response_excerpt: bytes | None
    duration_ms: int | None


def _endpoint(m: RowMapping) -> EndpointRow:
    return EndpointRow(**{c.name: m[c.name] for c in E.columns})


def _delivery(m: RowMapping) -> DeliveryRow:
    return DeliveryRow(**{c.name: m[c.name] for c in D.columns})


def _attempt(m: RowMapping) -> AttemptRow:
    return AttemptRow(**{c.name: m[c.name] for c in A.columns})


# ---------------------------------------------------------------- outbox (inside a job transition)


async def enabled_endpoints(conn: AsyncConnection, tenant_id: str) -> list[EndpointRow]:
    query = for_tenant(select(E), E, tenant_id).where(E.c.kind == KIND_ENDPOINT, E.c.enabled.is_(True))
    return [_endpoint(r._mapping) for r in await conn.execute(query.order_by(E.c.created_at, E.c.id))]


async def insert_deliveries(conn: AsyncConnection, rows: Sequence[Mapping[str, Any]]) -> None:
    if rows:
        await conn.execute(D.insert(), [dict(r) for r in rows])


# ---------------------------------------------------------------- endpoints (tenant-facing)


async def insert_endpoint(conn: AsyncConnection, values: Mapping[str, Any]) -> None:
    await conn.execute(E.insert().values(**values))


async def get_endpoint(
    conn: AsyncConnection, tenant_id: str, endpoint_id: str, *, kind: str = KIND_ENDPOINT
) -> EndpointRow | None:
    query = for_tenant(select(E), E, tenant_id).where(E.c.id == endpoint_id, E.c.kind == kind)
    row = (await conn.execute(query)).first()
    return _endpoint(row._mapping) if row else None


async def list_endpoints(conn: AsyncConnection, tenant_id: str) -> list[EndpointRow]:
    query = for_tenant(select(E), E, tenant_id).where(E.c.kind == KIND_ENDPOINT)
    return [_endpoint(r._mapping) for r in await conn.execute(query.order_by(E.c.created_at, E.c.id))]


async def count_endpoints(conn: AsyncConnection, tenant_id: str) -> int:
    query = for_tenant(select(func.count()).select_from(E), E, tenant_id).where(E.c.kind == KIND_ENDPOINT)
    return int((await conn.execute(query)).scalar_one())


async def update_endpoint(
    conn: AsyncConnection,
    tenant_id: str,
    endpoint_id: str,
    values: Mapping[str, Any],
    *,
    kind: str = KIND_ENDPOINT,
) -> EndpointRow | None:
    statement = (
        for_tenant(update(E), E, tenant_id)
        .where(E.c.id == endpoint_id, E.c.kind == kind)
        .values(**values)
        .returning(*E.columns)
    )
    row = (await conn.execute(statement)).first()
    return _endpoint(row._mapping) if row else None


async def delete_endpoint(conn: AsyncConnection, tenant_id: str, endpoint_id: str) -> bool:
    """The endpoint with its deliveries and their attempt log (a deleted endpoint keeps no history)."""
    delivery_ids = for_tenant(select(D.c.id), D, tenant_id).where(D.c.endpoint_id == endpoint_id)
    await conn.execute(
        for_tenant(delete(A), A, tenant_id).where(A.c.delivery_id.in_(delivery_ids.scalar_subquery()))
    )
    await conn.execute(for_tenant(delete(D), D, tenant_id).where(D.c.endpoint_id == endpoint_id))
    result = await conn.execute(
        for_tenant(delete(E), E, tenant_id).where(E.c.id == endpoint_id, E.c.kind == KIND_ENDPOINT)
    )
    return result.rowcount == 1


async def disable_endpoint(
    conn: AsyncConnection, tenant_id: str, endpoint_id: str, *, reason: str, now: datetime
) -> None:
    """Turn an endpoint off and park its pending deliveries (they can be redelivered on request)."""
    await conn.execute(
        for_tenant(update(E), E, tenant_id)
        .where(E.c.id == endpoint_id)
        .values(enabled=False, disabled_reason=reason, updated_at=now)
    )
    await disable_pending(conn, tenant_id, endpoint_id)


async def disable_pending(conn: AsyncConnection, tenant_id: str, endpoint_id: str) -> None:
    await conn.execute(
        for_tenant(update(D), D, tenant_id)
        .where(D.c.endpoint_id == endpoint_id, D.c.status == PENDING)
        .values(status=DISABLED)
    )


# ---------------------------------------------------------------- deliveries (tenant-facing)


async def get_delivery(conn: AsyncConnection, tenant_id: str, delivery_id: str) -> DeliveryRow | None:
    row = (await conn.execute(for_tenant(select(D), D, tenant_id).where(D.c.id == delivery_id))).first()
    return _delivery(row._mapping) if row else None


async def list_deliveries(
    conn: AsyncConnection,
    tenant_id: str,
    endpoint_id: str,
    *,
    limit: int,
    cursor: tuple[datetime, str] | None,
    status: str | None,
) -> list[DeliveryRow]:
    """An endpoint's deliveries newest first; ``limit + 1`` rows so the caller can tell if there are more."""
    query = for_tenant(select(D), D, tenant_id).where(D.c.endpoint_id == endpoint_id)
    if status is not None:
        query = query.where(D.c.status == status)
    if cursor is not None:
        created_at, delivery_id = cursor
        query = query.where(
            or_(D.c.created_at < created_at, and_(D.c.created_at == created_at, D.c.id < delivery_id))
        )
    query = query.order_by(D.c.created_at.desc(), D.c.id.desc()).limit(limit + 1)
    return [_delivery(r._mapping) for r in await conn.execute(query)]


async def attempts_for(
    conn: AsyncConnection, tenant_id: str, delivery_ids: Collection[str]
) -> dict[str, list[AttemptRow]]:
    found: dict[str, list[AttemptRow]] = {i: [] for i in delivery_ids}
    if not delivery_ids:
        return found
    query = (
        for_tenant(select(A), A, tenant_id)
        .where(A.c.delivery_id.in_(list(delivery_ids)))
        .order_by(A.c.attempted_at, A.c.id)
    )
    for row in await conn.execute(query):
        attempt = _attempt(row._mapping)
        found[attempt.delivery_id].append(attempt)
    return found


async def requeue_delivery(
    conn: AsyncConnection, tenant_id: str, delivery_id: str, *, now: datetime
) -> DeliveryRow | None:
    """Redeliver: due now with a fresh schedule (the attempt log keeps the earlier attempts). Not while
    a sender holds it, so an attempt in flight cannot be sent twice."""
    statement = (
        for_tenant(update(D), D, tenant_id)
        .where(D.c.id == delivery_id, or_(D.c.locked_until.is_(None), D.c.locked_until < now))
        .values(
            status=PENDING,
            attempts=0,
            next_attempt_at=now,
            delivered_at=None,
            locked_by=None,
            locked_until=None,
        )
        .returning(*D.columns)
    )
    row = (await conn.execute(statement)).first()
    return _delivery(row._mapping) if row else None


# ---------------------------------------------------------------- sender-facing


def _due(now: datetime) -> ColumnElement[bool]:
    return and_(
        D.c.status == PENDING,
        D.c.next_attempt_at <= now,
        or_(D.c.locked_until.is_(None), D.c.locked_until < now),
    )


async def claim_due(
    conn: AsyncConnection,
    *,
    now: datetime,
    token: str,
    lease: timedelta,
    limit: int,
    per_target: int,
    busy_targets: Collection[str] = (),
) -> list[DeliveryRow]:
    """Lease up to ``limit`` due deliveries for one sender pass.

    Fairness is decided here: at most ``per_target`` deliveries per destination, and the batch is
    filled round-robin over tenants (each tenant's first pick before anyone's second), so a backlog
    at one endpoint cannot crowd other tenants out of the batch. ``busy_targets`` (destinations the
    caller still has attempts in flight for) are skipped. On PostgreSQL the chosen rows are locked
    with SKIP LOCKED; on SQLite the transaction's write lock already serialises claimers. The final
    UPDATE re-checks due-ness, so two senders never lease the same delivery either way.
    """
    if limit <= 0:
        return []
    due = _due(now)
    if busy_targets:
        due = and_(due, D.c.target.not_in(list(busy_targets)))
    target_rank = func.row_number().over(partition_by=D.c.target, order_by=(D.c.next_attempt_at, D.c.id))
    ranked = (
        select(D.c.id, D.c.tenant_id, D.c.next_attempt_at, target_rank.label("target_rank"))
        .where(due)
        .subquery()
    )
    tenant_rank = func.row_number().over(
        partition_by=ranked.c.tenant_id,
        order_by=(ranked.c.target_rank, ranked.c.next_attempt_at, ranked.c.id),
    )
    capped = (
        select(ranked.c.id, ranked.c.next_attempt_at, tenant_rank.label("tenant_rank"))
        .where(ranked.c.target_rank <= per_target)
        .subquery()
    )
    picked = (
        select(capped.c.id).order_by(capped.c.tenant_rank, capped.c.next_attempt_at, capped.c.id).limit(limit)
    )
    ids = [r[0] for r in await conn.execute(picked)]
    if not ids:
        return []
    if conn.dialect.name == "postgresql":
        # Window functions cannot carry FOR UPDATE, so the lock is a second, plain statement.
        locked = select(D.c.id).where(D.c.id.in_(ids), _due(now)).with_for_update(skip_locked=True)
        ids = [r[0] for r in await conn.execute(locked)]
        if not ids:
            return []
    statement = (
        update(D)
        .where(D.c.id.in_(ids), _due(now))
        .values(locked_by=token, locked_until=now + lease)
        .returning(*D.columns)
    )
    return [_delivery(r._mapping) for r in await conn.execute(statement)]


async def endpoints_by_id(conn: AsyncConnection, endpoint_ids: Collection[str]) -> dict[str, EndpointRow]:
    if not endpoint_ids:
        return {}
    rows = await conn.execute(select(E).where(E.c.id.in_(list(endpoint_ids))))
    return {r.id: _endpoint(r._mapping) for r in rows}


async def tenant_allowlists(
    conn: AsyncConnection, tenant_ids: Collection[str]
) -> dict[str, list[str] | None]:
    if not tenant_ids:
        return {}
    rows = await conn.execute(
        select(tenants.c.id, tenants.c.url_allowed_domains).where(tenants.c.id.in_(list(tenant_ids)))
    )
    return {r[0]: r[1] for r in rows}


async def finish_attempt(
    conn: AsyncConnection, delivery_id: str, *, token: str, values: Mapping[str, Any]
) -> bool:
    """Write an attempt's outcome and release the lease, only while this sender still holds it."""
    result = await conn.execute(
        update(D)
        .where(D.c.id == delivery_id, D.c.locked_by == token)
        .values(locked_by=None, locked_until=None, **values)
    )
    return result.rowcount == 1


async def insert_attempt(conn: AsyncConnection, values: Mapping[str, Any]) -> None:
    await conn.execute(A.insert().values(**values))


async def purge_finished(conn: AsyncConnection, *, before: datetime, limit: int = 1000) -> int:
    """Forget settled deliveries (and their attempt log) created before ``before``."""
    ids = [
        r[0]
        for r in await conn.execute(
            select(D.c.id).where(D.c.status != PENDING, D.c.created_at < before).limit(limit)
        )
    ]
    if ids:
        await conn.execute(delete(A).where(A.c.delivery_id.in_(ids)))
        await conn.execute(delete(D).where(D.c.id.in_(ids)))
    return len(ids)


# ---------------------------------------------------------------- listing cursor


def encode_cursor(delivery: DeliveryRow) -> str:
    raw = json.dumps([delivery.created_at.isoformat(), delivery.id]).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_cursor(cursor: str) -> tuple[datetime, str] | None:
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))
        created_at, delivery_id = json.loads(raw)
        return datetime.fromisoformat(created_at), str(delivery_id)
    except (ValueError, TypeError):
        return None
