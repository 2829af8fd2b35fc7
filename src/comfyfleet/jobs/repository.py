"""All job SQL. Tenant-facing reads and writes take the caller's tenant and go through
``tenants.scope.for_tenant``; worker-facing statements act on a job the worker holds a lease on and
say so in their WHERE clause. Every state change is a conditional UPDATE following ``jobs.states``.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import and_, bindparam, case, func, or_, select, update
from sqlalchemy.ext.asyncio import AsyncConnection

from comfyfleet.config import PlanLimits
from comfyfleet.db.tables import jobs, node_catalogs, tenants
from comfyfleet.jobs.states import ACTIVE, JobStatus
from comfyfleet.tenants.scope import for_tenant
from comfyfleet.timeutil import utcnow


@dataclass(frozen=True)
class JobRow:
    id: str
    tenant_id: str
    status: str
    priority: int
    workflow: dict[str, Any]
    extra_data: dict[str, Any] | None
    labels: dict[str, str] | None
    webhook_url: str | None
    created_at: datetime
    started_at: datetime | None
    completed_at: datetime | None
    expires_at: datetime
    queue_deadline_at: datetime
    attempts: int
    max_attempts: int
    lease_owner: str | None
    lease_expires_at: datetime | None
    cancel_requested_at: datetime | None
    dispatch_ref: str | None
    dispatch_call_id: str | None
    dispatched_at: datetime | None
    progress: dict[str, Any] | None
    error: dict[str, Any] | None
    version: int
    # Filled by the reads that compute it (``get_job``): queued jobs that run before this one.
    queue_position: int | None = None


def _row(mapping: Mapping[Any, Any]) -> JobRow:
    return JobRow(**{c.name: mapping[c.name] for c in jobs.columns})


# Columns a listing or GET needs; the workflow graph stays in the database.
_SUMMARY = [c for c in jobs.columns if c.name not in ("workflow",)]


def _summary_row(mapping: Mapping[Any, Any]) -> JobRow:
    values = {c.name: mapping[c.name] for c in _SUMMARY}
    return JobRow(workflow={}, queue_position=mapping.get("queue_position"), **values)


def _position_of(job: Any) -> Any:
    """Queued jobs (all tenants) that run before ``job`` by priority and age, as a correlated count."""
    ahead = jobs.alias("ahead")
    return (
        select(func.count())
        .select_from(ahead)
        .where(
            ahead.c.status == JobStatus.QUEUED.value,
            or_(
                ahead.c.priority > job.c.priority,
                and_(ahead.c.priority == job.c.priority, ahead.c.created_at < job.c.created_at),
            ),
        )
        .scalar_subquery()
    )


# The poll path's statement, built once: one round trip answers the job and its queue position.
_GET_JOB = for_tenant(
    select(
        *_SUMMARY,
        case((jobs.c.status == JobStatus.QUEUED.value, _position_of(jobs)), else_=None).label(
            "queue_position"
        ),
    ),
    jobs,
    bindparam("tenant_id"),
).where(jobs.c.id == bindparam("job_id"))


# ---------------------------------------------------------------- tenant-facing


async def insert_job(conn: AsyncConnection, values: Mapping[str, Any]) -> None:
    """Insert a new queued job (values are complete; ``jobs.service`` builds them)."""
    await conn.execute(jobs.insert(), dict(values))


def row_from_values(values: Mapping[str, Any]) -> JobRow:
    """The row an insert of ``values`` created, without reading it back."""
    defaults = {c.name: None for c in jobs.columns}
    return _row({**defaults, **values})


async def get_job(conn: AsyncConnection, tenant_id: str, job_id: str) -> JobRow | None:
    """One of the tenant's jobs, without its workflow, with its queue position when queued."""
    row = (await conn.execute(_GET_JOB, {"tenant_id": tenant_id, "job_id": job_id})).first()
    return _summary_row(row._mapping) if row else None


async def list_jobs(
    conn: AsyncConnection,
    tenant_id: str,
    *,
    statuses: Sequence[str] | None,
    limit: int,
    cursor: tuple[datetime, str] | None,
    labels: Mapping[str, str] | None = None,
) -> list[JobRow]:
    """The tenant's jobs newest first; ``limit + 1`` rows so the caller can tell if there are more."""
    query = for_tenant(select(*_SUMMARY), jobs, tenant_id)
    if statuses:
        query = query.where(jobs.c.status.in_(list(statuses)))
    if cursor is not None:
        created_at, job_id = cursor
        query = query.where(
            or_(jobs.c.created_at < created_at, and_(jobs.c.created_at == created_at, jobs.c.id < job_id))
        )
    query = query.order_by(jobs.c.created_at.desc(), jobs.c.id.desc())
    if not labels:
        rows = await conn.execute(query.limit(limit + 1))
        return [_summary_row(r._mapping) for r in rows]
    # Labels are a small JSON object; filter in Python over a bounded scan to stay portable.
    found: list[JobRow] = []
    async for batch in _batches(conn, query, 500):
        for job in batch:
            if job.labels and all(job.labels.get(k) == v for k, v in labels.items()):
                found.append(job)
                if len(found) > limit:
                    return found
    return found


async def _batches(conn: AsyncConnection, query: Any, size: int) -> Any:
    offset = 0
    while True:
        rows = [_summary_row(r._mapping) for r in await conn.execute(query.limit(size).offset(offset))]
        if not rows:
            return
        yield rows
        offset += size
        if offset >= 10 * size:
            return


_COUNT_WAITING = for_tenant(select(func.count()).select_from(jobs), jobs, bindparam("tenant_id")).where(
    jobs.c.status == JobStatus.QUEUED.value
)


async def count_waiting(conn: AsyncConnection, tenant_id: str) -> int:
    """Queued jobs of a tenant (max_queued applies to these)."""
    return int((await conn.execute(_COUNT_WAITING, {"tenant_id": tenant_id})).scalar_one())


_QUEUE_POSITION = (
    select(func.count())
    .select_from(jobs)
    .where(
        jobs.c.status == JobStatus.QUEUED.value,
        or_(
            jobs.c.priority > bindparam("priority"),
            and_(jobs.c.priority == bindparam("priority"), jobs.c.created_at < bindparam("created_at")),
        ),
    )
)


async def queue_position(conn: AsyncConnection, job: JobRow) -> int:
    """Queued jobs (of all tenants) that run before this one by priority and age; 0 = next."""
    params = {"priority": job.priority, "created_at": job.created_at}
    return int((await conn.execute(_QUEUE_POSITION, params)).scalar_one())


async def cancel_queued(conn: AsyncConnection, tenant_id: str, job_id: str) -> JobRow | None:
    """queued → canceled at once."""
    now = utcnow()
    statement = (
        for_tenant(update(jobs), jobs, tenant_id)
        .where(jobs.c.id == job_id, jobs.c.status == JobStatus.QUEUED)
        .values(
            status=JobStatus.CANCELED, completed_at=now, cancel_requested_at=now, version=jobs.c.version + 1
        )
        .returning(*_SUMMARY)
    )
    row = (await conn.execute(statement)).first()
    return _summary_row(row._mapping) if row else None


async def cancel_running(conn: AsyncConnection, tenant_id: str, job_id: str) -> JobRow | None:
    """running → canceling; the worker holding the lease interrupts ComfyUI and ends it canceled."""
    statement = (
        for_tenant(update(jobs), jobs, tenant_id)
        .where(jobs.c.id == job_id, jobs.c.status == JobStatus.RUNNING)
        .values(status=JobStatus.CANCELING, cancel_requested_at=utcnow(), version=jobs.c.version + 1)
        .returning(*_SUMMARY)
    )
    row = (await conn.execute(statement)).first()
    return _summary_row(row._mapping) if row else None


# ---------------------------------------------------------------- worker-facing


async def get_job_for_worker(conn: AsyncConnection, job_id: str) -> JobRow | None:
    """A job by id with its workflow, for the worker that claimed it (no tenant: the claim is the check)."""
    row = (await conn.execute(select(jobs).where(jobs.c.id == job_id))).first()
    return _row(row._mapping) if row else None


async def claimable_tenants(
    conn: AsyncConnection, plans: Mapping[str, PlanLimits], *, now: datetime
) -> list[tuple[str, int]]:
    """Tenants with queued work and room under their plan's max_running, fairest first.

    Fair share: higher priority first; within a priority, the tenant with the fewest active jobs, then
    the one whose oldest queued job is oldest. So a tenant with many queued jobs cannot starve one with
    a few: after each claim the heavy tenant has one more active job and yields.
    """
    active = (
        select(jobs.c.tenant_id, func.count().label("active"))
        .where(
            or_(
                jobs.c.status.in_([s.value for s in ACTIVE]),
                and_(jobs.c.status == JobStatus.QUEUED, jobs.c.dispatched_at.is_not(None)),
            )
        )
        .group_by(jobs.c.tenant_id)
        .subquery()
    )
    waiting = (
        select(
            jobs.c.tenant_id,
            func.max(jobs.c.priority).label("priority"),
            func.min(jobs.c.created_at).label("oldest"),
        )
        .where(
            jobs.c.status == JobStatus.QUEUED,
            jobs.c.dispatched_at.is_(None),
            jobs.c.queue_deadline_at > now,
        )
        .group_by(jobs.c.tenant_id)
        .subquery()
    )
    query = (
        select(waiting.c.tenant_id, tenants.c.plan, func.coalesce(active.c.active, 0), waiting.c.priority)
        .join(tenants, tenants.c.id == waiting.c.tenant_id)
        .outerjoin(active, active.c.tenant_id == waiting.c.tenant_id)
        .order_by(waiting.c.priority.desc(), func.coalesce(active.c.active, 0), waiting.c.oldest)
    )
    result: list[tuple[str, int]] = []
    for tenant_id, plan_name, active_count, _priority in await conn.execute(query):
        plan = plans.get(plan_name)
        max_running = plan.max_running if plan else 1
        if active_count < max_running:
            result.append((tenant_id, max_running))
    return result


async def lock_tenant(conn: AsyncConnection, tenant_id: str) -> bool:
    """Serialise claims per tenant on Postgres (SKIP LOCKED: a tenant another claimer holds is skipped).
    SQLite's write lock already serialises everything."""
    if conn.dialect.name != "postgresql":
        return True
    row = (
        await conn.execute(
            select(tenants.c.id).where(tenants.c.id == tenant_id).with_for_update(skip_locked=True)
        )
    ).first()
    return row is not None


async def count_active(conn: AsyncConnection, tenant_id: str) -> int:
    query = (
        select(func.count())
        .select_from(jobs)
        .where(
            jobs.c.tenant_id == tenant_id,
            or_(
                jobs.c.status.in_([s.value for s in ACTIVE]),
                and_(jobs.c.status == JobStatus.QUEUED, jobs.c.dispatched_at.is_not(None)),
            ),
        )
    )
    return int((await conn.execute(query)).scalar_one())


async def next_queued_id(conn: AsyncConnection, tenant_id: str, *, now: datetime) -> str | None:
    query = (
        select(jobs.c.id)
        .where(
            jobs.c.tenant_id == tenant_id,
            jobs.c.status == JobStatus.QUEUED,
            jobs.c.dispatched_at.is_(None),
            jobs.c.queue_deadline_at > now,
        )
        .order_by(jobs.c.priority.desc(), jobs.c.created_at, jobs.c.id)
        .limit(1)
    )
    if conn.dialect.name == "postgresql":
        query = query.with_for_update(skip_locked=True)
    return (await conn.execute(query)).scalar_one_or_none()


async def mark_running(
    conn: AsyncConnection,
    job_id: str,
    *,
    worker: str,
    lease_s: float,
    now: datetime,
    dispatch_ref: str | None = None,
) -> JobRow | None:
    """queued → running with a lease. With ``dispatch_ref`` only the job dispatched under that ref
    (a Modal spawn) is taken, so a stale or duplicate spawn finds nothing."""
    statement = update(jobs).where(jobs.c.id == job_id, jobs.c.status == JobStatus.QUEUED)
    if dispatch_ref is not None:
        statement = statement.where(jobs.c.dispatch_ref == dispatch_ref)
    statement = statement.values(
        status=JobStatus.RUNNING,
        lease_owner=worker,
        lease_expires_at=now + timedelta(seconds=lease_s),
        started_at=func.coalesce(jobs.c.started_at, now),
        attempts=jobs.c.attempts + 1,
        progress=None,
        version=jobs.c.version + 1,
    ).returning(*jobs.columns)
    row = (await conn.execute(statement)).first()
    return _row(row._mapping) if row else None


async def mark_dispatched(conn: AsyncConnection, job_id: str, *, ref: str, now: datetime) -> bool:
    """Reserve a queued job for one remote dispatch (Modal spawn); it stays queued until claimed."""
    result = await conn.execute(
        update(jobs)
        .where(jobs.c.id == job_id, jobs.c.status == JobStatus.QUEUED, jobs.c.dispatched_at.is_(None))
        .values(dispatch_ref=ref, dispatched_at=now)
    )
    return result.rowcount == 1


async def clear_dispatch(conn: AsyncConnection, job_id: str, *, ref: str) -> bool:
    """Give a dispatched-but-unclaimed job back to the queue (the spawn failed or went stale)."""
    result = await conn.execute(
        update(jobs)
        .where(jobs.c.id == job_id, jobs.c.status == JobStatus.QUEUED, jobs.c.dispatch_ref == ref)
        .values(dispatch_ref=None, dispatched_at=None)
    )
    return result.rowcount == 1


async def stale_dispatches(conn: AsyncConnection, *, older_than: datetime) -> list[tuple[str, str]]:
    rows = await conn.execute(
        select(jobs.c.id, jobs.c.dispatch_ref).where(
            jobs.c.status == JobStatus.QUEUED,
            jobs.c.dispatched_at.is_not(None),
            jobs.c.dispatched_at < older_than,
        )
    )
    return [(r[0], r[1]) for r in rows]


async def dispatched_count(conn: AsyncConnection) -> int:
    """Jobs handed to remote workers and not finished (the fleet's in-flight count)."""
    query = (
        select(func.count())
        .select_from(jobs)
        .where(
            or_(
                and_(jobs.c.status == JobStatus.QUEUED, jobs.c.dispatched_at.is_not(None)),
                and_(jobs.c.status.in_([s.value for s in ACTIVE]), jobs.c.dispatch_ref.is_not(None)),
            )
        )
    )
    return int((await conn.execute(query)).scalar_one())


async def set_call_id(conn: AsyncConnection, job_id: str, *, ref: str, call_id: str) -> bool:
    """Remember the Modal call that carries dispatch ``ref``. Keyed by the ref, not the status: the
    container may already have claimed the job when the spawn returns."""
    result = await conn.execute(
        update(jobs).where(jobs.c.id == job_id, jobs.c.dispatch_ref == ref).values(dispatch_call_id=call_id)
    )
    return result.rowcount == 1


async def stale_dispatch_calls(
    conn: AsyncConnection, *, older_than: datetime, limit: int = 100
) -> list[tuple[str, str, str | None]]:
    """Dispatched, still unclaimed jobs older than ``older_than``: (id, ref, call id)."""
    rows = await conn.execute(
        select(jobs.c.id, jobs.c.dispatch_ref, jobs.c.dispatch_call_id)
        .where(
            jobs.c.status == JobStatus.QUEUED,
            jobs.c.dispatched_at.is_not(None),
            jobs.c.dispatched_at < older_than,
        )
        .order_by(jobs.c.dispatched_at)
        .limit(limit)
    )
    return [(r[0], r[1], r[2]) for r in rows]


async def canceling_with_calls(
    conn: AsyncConnection, *, requested_before: datetime, limit: int = 100
) -> list[tuple[str, str]]:
    """Jobs canceling since before ``requested_before`` whose Modal call is known: (id, call id)."""
    rows = await conn.execute(
        select(jobs.c.id, jobs.c.dispatch_call_id)
        .where(
            jobs.c.status == JobStatus.CANCELING,
            jobs.c.cancel_requested_at < requested_before,
            jobs.c.dispatch_call_id.is_not(None),
        )
        .limit(limit)
    )
    return [(r[0], r[1]) for r in rows]


async def take_call_for_cancel(conn: AsyncConnection, job_id: str, *, call_id: str) -> bool:
    """Take a canceling job's call id to cancel it (the id is cleared, so however many dispatchers
    run, one cancels the call, once)."""
    result = await conn.execute(
        update(jobs)
        .where(
            jobs.c.id == job_id,
            jobs.c.status == JobStatus.CANCELING,
            jobs.c.dispatch_call_id == call_id,
        )
        .values(dispatch_call_id=None)
    )
    return result.rowcount == 1


async def restore_call_id(conn: AsyncConnection, job_id: str, *, call_id: str) -> None:
    """Put back a call id whose cancel did not go through, so a later pass tries again."""
    await conn.execute(
        update(jobs)
        .where(jobs.c.id == job_id, jobs.c.status == JobStatus.CANCELING, jobs.c.dispatch_call_id.is_(None))
        .values(dispatch_call_id=call_id)
    )


# Any fixed 64-bit number; it names the "one dispatch pass at a time" lock on PostgreSQL.
_DISPATCH_LOCK_KEY = 0x636F6D6679666C74


async def try_dispatch_lock(conn: AsyncConnection) -> bool:
    """One dispatch pass at a time across API containers, so the fleet's in-flight cap is exact
    (a transaction-scoped advisory lock on PostgreSQL; SQLite's write lock already serialises)."""
    if conn.dialect.name != "postgresql":
        return True
    return bool((await conn.execute(select(func.pg_try_advisory_xact_lock(_DISPATCH_LOCK_KEY)))).scalar_one())


async def renew_lease(
    conn: AsyncConnection, job_id: str, *, worker: str, lease_s: float, now: datetime
) -> str | None:
    """Extend the lease; returns the job's status (``canceling`` tells the worker to stop), or None
    when the worker no longer holds the job."""
    row = (
        await conn.execute(
            update(jobs)
            .where(
                jobs.c.id == job_id,
                jobs.c.lease_owner == worker,
                jobs.c.status.in_([s.value for s in ACTIVE]),
            )
            .values(lease_expires_at=now + timedelta(seconds=lease_s))
            .returning(jobs.c.status)
        )
    ).first()
    return row[0] if row else None


async def lock_if_running(conn: AsyncConnection, job_id: str, *, worker: str) -> bool:
    """True when the worker holds the job and it is still running (not canceling), with the row
    locked until the transaction ends: whatever the caller writes in this transaction commits before
    any cancel is accepted, or not at all. (SQLite's BEGIN IMMEDIATE already serialises writers.)"""
    query = select(jobs.c.id).where(
        jobs.c.id == job_id, jobs.c.lease_owner == worker, jobs.c.status == JobStatus.RUNNING
    )
    return (await conn.execute(query.with_for_update())).first() is not None


async def read_status(conn: AsyncConnection, job_id: str) -> str | None:
    return (await conn.execute(select(jobs.c.status).where(jobs.c.id == job_id))).scalar_one_or_none()


async def set_progress(conn: AsyncConnection, job_id: str, *, worker: str, progress: dict[str, Any]) -> None:
    await conn.execute(
        update(jobs)
        .where(
            jobs.c.id == job_id, jobs.c.lease_owner == worker, jobs.c.status.in_([s.value for s in ACTIVE])
        )
        .values(progress=progress)
    )


async def finish(
    conn: AsyncConnection,
    job_id: str,
    *,
    worker: str | None,
    target: JobStatus,
    sources: Sequence[JobStatus],
    now: datetime,
    error: dict[str, Any] | None = None,
    progress: dict[str, Any] | None = None,
    lease_expired: bool = False,
) -> JobRow | None:
    """One conditional transition into ``target`` from one of ``sources``. With ``worker`` set, only
    while that worker holds the lease; with ``lease_expired``, only if the lease is still expired."""
    statement = update(jobs).where(jobs.c.id == job_id, jobs.c.status.in_([s.value for s in sources]))
    if worker is not None:
        statement = statement.where(jobs.c.lease_owner == worker)
    if lease_expired:
        statement = statement.where(jobs.c.lease_expires_at < now)
    values: dict[str, Any] = {"status": target, "version": jobs.c.version + 1}
    if target == JobStatus.QUEUED:
        values.update(lease_owner=None, lease_expires_at=None, dispatch_ref=None, dispatched_at=None)
    else:
        values.update(completed_at=now, lease_expires_at=None)
    if error is not None:
        values["error"] = error
    if progress is not None:
        values["progress"] = progress
    row = (await conn.execute(statement.values(**values).returning(*_SUMMARY))).first()
    return _summary_row(row._mapping) if row else None


async def expired_leases(conn: AsyncConnection, *, now: datetime, limit: int = 100) -> list[JobRow]:
    rows = await conn.execute(
        select(*_SUMMARY)
        .where(jobs.c.status.in_([s.value for s in ACTIVE]), jobs.c.lease_expires_at < now)
        .limit(limit)
    )
    return [_summary_row(r._mapping) for r in rows]


async def past_queue_deadline(conn: AsyncConnection, *, now: datetime, limit: int = 500) -> list[str]:
    rows = await conn.execute(
        select(jobs.c.id)
        .where(jobs.c.status == JobStatus.QUEUED, jobs.c.queue_deadline_at < now)
        .limit(limit)
    )
    return [r[0] for r in rows]


async def past_retention(conn: AsyncConnection, *, now: datetime, limit: int = 500) -> list[str]:
    rows = await conn.execute(select(jobs.c.id).where(jobs.c.expires_at < now).limit(limit))
    return [r[0] for r in rows]


async def delete_jobs(conn: AsyncConnection, job_ids: Sequence[str]) -> None:
    if job_ids:
        await conn.execute(jobs.delete().where(jobs.c.id.in_(list(job_ids))))


# ---------------------------------------------------------------- node catalog


async def store_catalog(conn: AsyncConnection, worker: str, object_info: dict[str, Any]) -> None:
    now = utcnow()
    updated = await conn.execute(
        update(node_catalogs)
        .where(node_catalogs.c.worker == worker)
        .values(object_info=object_info, updated_at=now)
    )
    if updated.rowcount == 0:
        await conn.execute(
            node_catalogs.insert().values(worker=worker, object_info=object_info, updated_at=now)
        )


async def latest_catalog_time(conn: AsyncConnection) -> datetime | None:
    query = select(func.max(node_catalogs.c.updated_at))
    latest: datetime | None = (await conn.execute(query)).scalar_one_or_none()
    return latest


async def latest_catalog(conn: AsyncConnection) -> dict[str, Any] | None:
    row = (
        await conn.execute(
            select(node_catalogs.c.object_info).order_by(node_catalogs.c.updated_at.desc()).limit(1)
        )
    ).first()
    return row[0] if row else None


# ---------------------------------------------------------------- listing cursor


def encode_cursor(job: JobRow) -> str:
    raw = json.dumps([job.created_at.isoformat(), job.id]).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_cursor(cursor: str) -> tuple[datetime, str] | None:
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))
        created_at, job_id = json.loads(raw)
        return datetime.fromisoformat(created_at), str(job_id)
    except (ValueError, TypeError):
        return None
