"""The transactional outbox for webhooks (filled in by the webhooks work)."""

from __future__ import annotations

from sqlalchemy.ext.asyncio import AsyncConnection

from comfyfleet.jobs.repository import JobRow


async def enqueue_job_event(conn: AsyncConnection, job: JobRow) -> None:
    return None
