"""Side effects of a job's state change that must share its transaction: the webhook outbox rows.
Every transition (API cancel, worker finish, reaper) calls ``record_transition`` with the new row."""

from __future__ import annotations

from sqlalchemy.ext.asyncio import AsyncConnection

from comfyfleet.jobs.repository import JobRow
from comfyfleet.webhooks import outbox


async def record_transition(conn: AsyncConnection, job: JobRow) -> None:
    await outbox.enqueue_job_event(conn, job)
