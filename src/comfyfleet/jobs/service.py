"""Job behaviour for API callers: submit, read, list, cancel. Takes a connection inside the caller's
transaction and the authenticated tenant; never commits (the endpoint's unit of work does)."""

from __future__ import annotations

import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from sqlalchemy.ext.asyncio import AsyncConnection

from comfyfleet.assets import repository as asset_repo
from comfyfleet.config import PlanLimits, Settings
from comfyfleet.errors import NotFound, TooManyRequests, ValidationFailed
from comfyfleet.jobs import repository as repo
from comfyfleet.jobs.catalog_cache import CatalogCache
from comfyfleet.jobs.repository import JobRow
from comfyfleet.jobs.states import JobStatus
from comfyfleet.tenants.repository import Tenant
from comfyfleet.timeutil import utcnow
from comfyfleet.worker.comfy import graph
from comfyfleet.worker.comfy.catalog import validate_against_catalog


@dataclass(frozen=True)
class SubmitRequest:
    workflow: dict[str, Any]
    extra_data: dict[str, Any] | None
    labels: dict[str, str] | None
    webhook_url: str | None


def parse_submit(body: object, settings: Settings, plan: PlanLimits) -> SubmitRequest:
    """Check the body's shape and the graph's shape; no database needed."""
    if not isinstance(body, dict):
        raise ValidationFailed("The request body must be a JSON object", code="invalid_request")
    unknown = sorted(set(body) - {"workflow", "extra_data", "metadata", "webhook_url"})
    if unknown:
        raise ValidationFailed(
            f"Unknown field(s): {', '.join(unknown)}", code="invalid_request", details={"fields": unknown}
        )
    if "workflow" not in body:
        raise ValidationFailed("'workflow' is required", code="invalid_request")
    workflow = graph.validate_api_format(body["workflow"], max_nodes=plan.max_nodes)
    extra_data = body.get("extra_data")
    if extra_data is not None and not isinstance(extra_data, dict):
        raise ValidationFailed("'extra_data' must be an object", code="invalid_request")
    labels = parse_labels(body.get("metadata"), settings.metadata_max_pairs)
    webhook_url = body.get("webhook_url")
    if webhook_url is not None and (not isinstance(webhook_url, str) or len(webhook_url) > 2048):
        raise ValidationFailed("'webhook_url' must be a URL string", code="invalid_request")
    return SubmitRequest(workflow=workflow, extra_data=extra_data, labels=labels, webhook_url=webhook_url)


def parse_labels(raw: object, max_pairs: int) -> dict[str, str] | None:
    """``metadata``: an object of string labels, as the SDK sends it."""
    if raw is None:
        return None
    if not isinstance(raw, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in raw.items()
    ):
        raise ValidationFailed("'metadata' must be an object of string labels", code="invalid_request")
    if len(raw) > max_pairs:
        raise ValidationFailed(f"'metadata' holds at most {max_pairs} labels", code="invalid_request")
    if any(len(k) > 64 or len(v) > 512 for k, v in raw.items()):
        raise ValidationFailed(
            "metadata keys are at most 64 and values 512 characters", code="invalid_request"
        )
    return dict(raw)


async def check_against_catalog(conn: AsyncConnection, cache: CatalogCache, workflow: dict[str, Any]) -> None:
    """Validate against the node catalog the workers published, when there is one."""
    catalog = await cache.get(conn)
    if catalog is not None:
        validate_against_catalog(workflow, catalog)


async def check_assets(conn: AsyncConnection, tenant_id: str, workflow: dict[str, Any]) -> None:
    refs = graph.find_asset_refs(workflow)
    if not refs:
        return
    owned = await asset_repo.existing_ids(conn, tenant_id, {ref.asset_id for ref in refs})
    missing = [ref for ref in refs if ref.asset_id not in owned]
    if missing:
        raise ValidationFailed(
            "The workflow references assets that do not exist",
            code="missing_asset",
            details={
                "missing": [{"node_id": r.node_id, "input": r.input, "id": r.asset_id} for r in missing]
            },
        )


async def create_job(
    conn: AsyncConnection, tenant: Tenant, plan: PlanLimits, request: SubmitRequest
) -> JobRow:
    waiting = await repo.count_waiting(conn, tenant.id)
    if waiting >= plan.max_queued:
        raise TooManyRequests(
            f"This tenant already has {waiting} queued jobs (plan limit {plan.max_queued})",
            code="queue_full",
            retry_after=5,
        )
    now = utcnow()
    job_id = str(uuid.uuid4())
    values: dict[str, Any] = {
        "id": job_id,
        "tenant_id": tenant.id,
        "status": JobStatus.QUEUED,
        "priority": plan.priority,
        "workflow": request.workflow,
        "extra_data": request.extra_data,
        "labels": request.labels,
        "webhook_url": request.webhook_url,
        "created_at": now,
        "expires_at": now + timedelta(seconds=plan.retention_s),
        "queue_deadline_at": now + timedelta(seconds=plan.queue_deadline_s),
        "attempts": 0,
        "max_attempts": plan.max_attempts,
        "version": 0,
    }
    await repo.insert_job(conn, values)
    return repo.row_from_values(values)


async def get_job(conn: AsyncConnection, tenant_id: str, job_id: str) -> JobRow:
    job = await repo.get_job(conn, tenant_id, job_id) if _looks_like_id(job_id) else None
    if job is None:
        raise NotFound("Job not found")
    return job


async def cancel_job(conn: AsyncConnection, tenant_id: str, job_id: str) -> tuple[JobRow, bool]:
    """Idempotent cancel. Returns the job and whether this call changed it."""
    if not _looks_like_id(job_id):
        raise NotFound("Job not found")
    for attempt in (repo.cancel_queued, repo.cancel_running):
        changed = await attempt(conn, tenant_id, job_id)
        if changed is not None:
            return changed, True
    return await get_job(conn, tenant_id, job_id), False


def parse_statuses(raw: str | None) -> list[str] | None:
    if not raw:
        return None
    statuses = [s.strip() for s in raw.split(",") if s.strip()]
    valid = {s.value for s in JobStatus}
    bad = [s for s in statuses if s not in valid]
    if bad:
        raise ValidationFailed(
            f"Unknown status filter: {', '.join(bad)}",
            code="invalid_request",
            details={"valid": sorted(valid)},
        )
    return statuses


def parse_label_filter(query: Mapping[str, str]) -> dict[str, str]:
    return {
        k[len("metadata[") : -1]: v for k, v in query.items() if k.startswith("metadata[") and k.endswith("]")
    }


def _looks_like_id(value: str) -> bool:
    try:
        uuid.UUID(value)
    except ValueError:
        return False
    return True
