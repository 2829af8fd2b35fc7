"""Small steps the webhook tests share: tenants, endpoints, jobs that reach a state, outbox rows."""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any

import httpx
from sqlalchemy import select

from comfyfleet.db.tables import webhook_deliveries
from comfyfleet.queue.claim import claim_next, finish
from comfyfleet.queue.executor import Outcome, Succeeded
from comfyfleet.runtime import Runtime
from comfyfleet.webhooks import retry
from tests.support.factories import TenantWithKey, make_tenant
from tests.support.workflows import empty_image_save


async def admin_tenant(runtime: Runtime) -> TenantWithKey:
    return await make_tenant(runtime.engine, runtime.settings, scopes=["admin"])


async def create_endpoint(
    api: httpx.AsyncClient, tenant: TenantWithKey, url: str, *, events: list[str] | None = None
) -> tuple[str, str]:
    body: dict[str, Any] = {"url": url}
    if events is not None:
        body["events"] = events
    response = await api.post("/api/v2/webhooks", json=body, headers=tenant.headers)
    assert response.status_code == 201, response.text
    return response.json()["id"], response.json()["secret"]


async def submit(api: httpx.AsyncClient, tenant: TenantWithKey, **extra: Any) -> str:
    response = await api.post(
        "/api/v2/jobs", json={"workflow": empty_image_save(), **extra}, headers=tenant.headers
    )
    assert response.status_code == 201, response.text
    return str(response.json()["id"])


async def run_job(
    api: httpx.AsyncClient,
    runtime: Runtime,
    tenant: TenantWithKey,
    outcome: Outcome | None = None,
    **extra: Any,
) -> str:
    """Submit a job, claim it, end it: the outbox rows of both transitions are committed on return."""
    job_id = await submit(api, tenant, **extra)
    job = await claim_next(runtime, "test-worker")
    assert job is not None and job.id == job_id
    assert await finish(runtime, job, "test-worker", outcome or Succeeded()) is not None
    return job_id


def after_retry_delay(now: datetime, attempts_made: int) -> datetime:
    """A moment past the latest the next attempt can be scheduled (jitter included)."""
    return now + retry.SCHEDULE[attempts_made - 1] * (1 + retry.JITTER) + timedelta(seconds=1)


async def deliveries(runtime: Runtime) -> list[Any]:
    async with runtime.engine.connect() as conn:
        rows = await conn.execute(select(webhook_deliveries).order_by(webhook_deliveries.c.created_at))
        return list(rows)
