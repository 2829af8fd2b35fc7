"""Retention: jobs, assets and blobs past their expiry are deleted. A blob goes only when no
remaining asset of its tenant points to it (dedup shares blobs between assets)."""

from __future__ import annotations

import logging
from datetime import datetime

from comfyfleet.assets import repository as repo
from comfyfleet.jobs import repository as job_repo
from comfyfleet.runtime import Runtime
from comfyfleet.storage.base import StorageError

log = logging.getLogger(__name__)


async def cleanup(runtime: Runtime, now: datetime) -> int:
    """One pass; returns how many assets were removed."""
    async with runtime.engine.begin() as conn:
        expired_jobs = await job_repo.past_retention(conn, now=now)
        removed = await repo.delete_assets_of_jobs(conn, expired_jobs)
        await job_repo.delete_jobs(conn, expired_jobs)
        expired = await repo.expired_assets(conn, now=now)
        await repo.delete_assets(conn, [a.id for a in expired])
        removed += expired
        orphans = await repo.orphan_blobs(conn, [(a.tenant_id, a.hash) for a in removed])
        for blob in orphans:
            await repo.delete_blob(conn, blob.tenant_id, blob.hash)
    # Storage deletes come after the commit: a crash in between leaves an unreferenced object
    # (harmless; a bucket lifecycle rule can sweep), never a record without its bytes.
    for blob in orphans:
        try:
            await runtime.storage.delete(blob.storage_key)
        except StorageError:
            log.warning("could not delete blob %s; it stays unreferenced", blob.storage_key)
    return len(removed)
