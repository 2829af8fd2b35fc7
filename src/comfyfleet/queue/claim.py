"""Claiming and finishing jobs: the worker side of the database queue.

A claim takes the fairest tenant's next job inside that tenant's ``max_running`` (see
``jobs.repository.claimable_tenants``), in one transaction: ``SELECT … FOR UPDATE SKIP LOCKED`` on
the tenant row and the job on PostgreSQL, the single write lock on SQLite. ``finish`` ends a claimed
job with one conditional transition and writes its outbox rows in the same transaction.
"""

from __future__ import annotations

from typing import Any

from comfyfleet.assets import repository as asset_repo
from comfyfleet.jobs import repository as repo
from comfyfleet.jobs.events import record_transition
from comfyfleet.jobs.repository import JobRow
from comfyfleet.jobs.schemas import job_error
from comfyfleet.jobs.states import JobStatus
from comfyfleet.queue.bus import NEW_WORK, announce, job_topic
from comfyfleet.queue.executor import Canceled, Failed, Outcome, Retry, Succeeded
from comfyfleet.runtime import Runtime
from comfyfleet.timeutil import utcnow


async def claim_next(runtime: Runtime, worker: str) -> JobRow | None:
    settings = runtime.settings
    async with runtime.engine.begin() as conn:
        now = utcnow()
        for tenant_id, max_running in await repo.claimable_tenants(conn, settings.plans, now=now):
            if not await repo.lock_tenant(conn, tenant_id):
                continue
            if await repo.count_active(conn, tenant_id) >= max_running:
                continue
            job_id = await repo.next_queued_id(conn, tenant_id, now=now)
            if job_id is None:
                continue
            job = await repo.mark_running(conn, job_id, worker=worker, lease_s=settings.lease_s, now=now)
            if job is not None:
                await record_transition(conn, job)
                break
        else:
            return None
    announce(runtime.bus, job_topic(job.id), {"kind": "status", "status": job.status})
    return job


async def claim_dispatched(runtime: Runtime, job_id: str, *, worker: str, dispatch_ref: str) -> JobRow | None:
    """A remote worker (Modal container) takes the job it was spawned for; None when the spawn is stale
    or a duplicate."""
    async with runtime.engine.begin() as conn:
        job = await repo.mark_running(
            conn, job_id, worker=worker, lease_s=runtime.settings.lease_s, now=utcnow(),
            dispatch_ref=dispatch_ref,
        )
        if job is not None:
            await record_transition(conn, job)
    if job is not None:
        await runtime.bus.publish(job_topic(job.id), {"kind": "status", "status": job.status})
    return job


async def finish(
    runtime: Runtime, job: JobRow, worker: str, outcome: Outcome, *, progress: dict[str, Any] | None = None
) -> JobRow | None:
    """End a claimed job. Returns the final row, or None when the worker no longer held it.
    ``progress``, the job's last snapshot not written yet, is set by the same UPDATE."""
    async with runtime.engine.begin() as conn:
        now = utcnow()
        row = await _transition(conn, job, worker, outcome, now, progress)
        if row is not None:
            await record_transition(conn, row)
    if row is not None:
        # Awaited, unlike the others: the client is waiting for exactly this notification.
        await runtime.bus.publish(job_topic(job.id), {"kind": "status", "status": row.status})
        if row.status == JobStatus.QUEUED:
            announce(runtime.bus, NEW_WORK, {"job_id": job.id})
    return row


async def _transition(
    conn: Any, job: JobRow, worker: str, outcome: Outcome, now: Any, progress: dict[str, Any] | None
) -> JobRow | None:
    running, canceling = [JobStatus.RUNNING], [JobStatus.CANCELING]
    kw: dict[str, Any] = {"worker": worker, "now": now, "progress": progress}
    # Whatever the outcome, a job whose cancel was accepted ends canceled, never succeeded.
    if isinstance(outcome, Succeeded):
        return await repo.finish(conn, job.id, target=JobStatus.SUCCEEDED, sources=running, **kw) or (
            await repo.finish(conn, job.id, target=JobStatus.CANCELED, sources=canceling, **kw)
        )
    if isinstance(outcome, Canceled):
        return await repo.finish(conn, job.id, target=JobStatus.CANCELED, sources=running + canceling, **kw)
    if isinstance(outcome, Failed):
        error = job_error(
            outcome.code, outcome.message, node_id=outcome.node_id, class_type=outcome.class_type,
            traceback=outcome.traceback, details=outcome.details,
        )
        failed = await repo.finish(conn, job.id, target=JobStatus.FAILED, sources=running, error=error, **kw)
        return failed or await repo.finish(conn, job.id, target=JobStatus.CANCELED, sources=canceling, **kw)
    assert isinstance(outcome, Retry)
    current = await repo.get_job_for_worker(conn, job.id)
    if current is None:
        return None
    if current.attempts < current.max_attempts:
        row = await repo.finish(conn, job.id, target=JobStatus.QUEUED, sources=running, **kw)
        if row is not None:
            # The next attempt produces the outputs again: the job ends with one set, not two.
            await asset_repo.delete_assets_of_jobs(conn, [job.id])
    else:
        error = job_error("retries_exhausted", f"Gave up after {current.attempts} attempts: {outcome.reason}")
        row = await repo.finish(conn, job.id, target=JobStatus.FAILED, sources=running, error=error, **kw)
    return row or await repo.finish(conn, job.id, target=JobStatus.CANCELED, sources=canceling, **kw)
