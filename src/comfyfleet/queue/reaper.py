"""The reaper: the only thing that moves jobs on time. Expired leases go back to the queue until the
attempt budget is spent (then ``failed`` with ``worker_lost``); jobs queued past their plan's deadline
become ``expired``; retention removes old jobs. GET never does any of this."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import dataclass, field
from datetime import datetime

from sqlalchemy.ext.asyncio import AsyncConnection

from comfyfleet.assets import repository as asset_repo
from comfyfleet.assets import retention
from comfyfleet.jobs import idempotency
from comfyfleet.jobs import repository as repo
from comfyfleet.jobs.events import record_transition
from comfyfleet.jobs.repository import JobRow
from comfyfleet.jobs.schemas import job_error
from comfyfleet.jobs.states import JobStatus
from comfyfleet.queue.bus import NEW_WORK, job_topic
from comfyfleet.runtime import Runtime
from comfyfleet.timeutil import utcnow

log = logging.getLogger(__name__)


@dataclass
class ReapReport:
    requeued: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)
    canceled: list[str] = field(default_factory=list)
    expired: list[str] = field(default_factory=list)
    retention_deleted: int = 0


async def reap_once(runtime: Runtime, now: datetime | None = None) -> ReapReport:
    now = now or utcnow()
    report = ReapReport()
    changed: list[JobRow] = []
    async with runtime.engine.begin() as conn:
        for job in await repo.expired_leases(conn, now=now):
            row = await _recover(conn, job, now)
            if row is None:
                continue
            changed.append(row)
            {
                JobStatus.QUEUED: report.requeued,
                JobStatus.FAILED: report.failed,
                JobStatus.CANCELED: report.canceled,
            }[JobStatus(row.status)].append(row.id)
        for job_id in await repo.past_queue_deadline(conn, now=now):
            error = job_error(
                "queue_deadline_exceeded", "The job waited longer than its plan's queue deadline"
            )
            row = await repo.finish(
                conn,
                job_id,
                worker=None,
                target=JobStatus.EXPIRED,
                sources=[JobStatus.QUEUED],
                now=now,
                error=error,
            )
            if row is not None:
                changed.append(row)
                report.expired.append(row.id)
        for row in changed:
            await record_transition(conn, row)
        await idempotency.purge_expired(conn, now=now)
    for row in changed:
        await runtime.bus.publish(job_topic(row.id), {"kind": "status", "status": row.status})
    if report.requeued:
        await runtime.bus.publish(NEW_WORK, {})
    report.retention_deleted = await retention.cleanup(runtime, now)
    return report


async def _recover(conn: AsyncConnection, job: JobRow, now: datetime) -> JobRow | None:
    """A job whose lease expired: canceling → canceled; running → queued while attempts remain,
    else failed (``worker_lost``)."""
    error = None
    if job.status == JobStatus.CANCELING:
        target, source = JobStatus.CANCELED, JobStatus.CANCELING
    elif job.attempts < job.max_attempts:
        target, source = JobStatus.QUEUED, JobStatus.RUNNING
    else:
        target, source = JobStatus.FAILED, JobStatus.RUNNING
        error = job_error("worker_lost", f"The worker running this job was lost {job.attempts} time(s)")
    row = await repo.finish(
        conn, job.id, worker=None, now=now, lease_expired=True, target=target, sources=[source], error=error
    )
    if row is not None and target == JobStatus.QUEUED:
        # The next attempt produces the outputs again: one set, not two.
        await asset_repo.delete_assets_of_jobs(conn, [job.id])
    return row


async def run_reaper(runtime: Runtime, stop: asyncio.Event) -> None:
    interval = runtime.settings.reaper_interval_s
    while not stop.is_set():
        try:
            report = await reap_once(runtime)
            if report.requeued or report.failed or report.expired or report.canceled:
                log.info("reaper: %s", report)
        except Exception:  # keep reaping; one bad pass must not stop the loop
            log.exception("reaper pass failed")
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), interval)
