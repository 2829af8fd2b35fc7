"""``/api/v2/jobs``: submit, list, get, cancel (Comfy API v2)."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends, Header, Query, Request
from sqlalchemy.ext.asyncio import AsyncConnection

from comfyfleet.api.auth import Authenticator, Principal
from comfyfleet.api.deps import ReadConn, Uow, base_url, get_runtime, read_json
from comfyfleet.api.responses import Json
from comfyfleet.assets import repository as asset_repo
from comfyfleet.assets.schemas import output_body
from comfyfleet.errors import ValidationFailed
from comfyfleet.jobs import idempotency, service
from comfyfleet.jobs import repository as job_repo
from comfyfleet.jobs.events import record_transition
from comfyfleet.jobs.repository import JobRow
from comfyfleet.jobs.schemas import job_body
from comfyfleet.jobs.states import JobStatus
from comfyfleet.queue.bus import NEW_WORK, job_topic
from comfyfleet.runtime import Runtime
from comfyfleet.timeutil import utcnow
from comfyfleet.webhooks import service as webhooks

router = APIRouter(prefix="/api/v2/jobs", tags=["jobs"])

JobsReader = Annotated[Principal, Depends(Authenticator("jobs:read"))]
JobsWriter = Annotated[Principal, Depends(Authenticator("jobs:write"))]

SUBMIT_SCOPE = "jobs.create"


async def render_job(conn: AsyncConnection, runtime: Runtime, job: JobRow, base: str) -> dict[str, Any]:
    outputs: list[dict[str, Any]] = []
    position = None
    if job.status == JobStatus.QUEUED:
        position = (
            job.queue_position if job.queue_position is not None else await job_repo.queue_position(conn, job)
        )
    else:
        lifetime = runtime.settings.url_lifetime_s
        for asset in await asset_repo.outputs_for_job(conn, job.tenant_id, job.id):
            outputs.append(await output_body(asset, storage=runtime.storage, lifetime_s=lifetime))
    return job_body(job, base_url=base, outputs=outputs, queue_position=position)


@router.post("", status_code=201)
async def submit_job(
    request: Request,
    principal: JobsWriter,
    uow: Uow,
    idempotency_key: Annotated[str | None, Header(alias="Idempotency-Key")] = None,
) -> Json:
    runtime = get_runtime(request)
    await request.app.state.limiter.check(
        request, kind="submit", rate=principal.plan.submit_rate, identity=principal.key_id
    )
    body, raw = await read_json(request, runtime.settings.max_body_bytes)
    submit = service.parse_submit(body, runtime.settings, principal.plan)
    if submit.webhook_url is not None:
        # Resolving the URL happens before the transaction begins: no lock is held while DNS answers.
        await webhooks.check_webhook_url(runtime.settings, submit.webhook_url, principal.tenant)
    conn, now = uow.conn, utcnow()
    digest = idempotency.request_digest(raw)
    key = idempotency.check_key(idempotency_key) if idempotency_key is not None else None
    if key is not None:
        remembered = await idempotency.lookup(
            conn, tenant_id=principal.tenant_id, scope=SUBMIT_SCOPE, key=key, digest=digest, now=now
        )
        if remembered is not None and remembered.resource_id is not None:
            return await _replay(conn, runtime, principal, remembered.resource_id, request)
    if submit.webhook_url is not None:
        await webhooks.require_job_url_secret(conn, principal.tenant_id)
    await service.check_against_catalog(conn, runtime.catalog_cache, submit.workflow)
    await service.check_assets(conn, principal.tenant_id, submit.workflow)
    job = await service.create_job(conn, principal.tenant, principal.plan, submit)
    if key is not None and not await idempotency.remember(
        conn,
        tenant_id=principal.tenant_id,
        scope=SUBMIT_SCOPE,
        key=key,
        digest=digest,
        resource_id=job.id,
        status_code=201,
        now=now,
        ttl_s=runtime.settings.idempotency_ttl_s,
    ):
        # A concurrent request with this key won: drop our job and answer like that request.
        await conn.rollback()
        await conn.begin()
        remembered = await idempotency.lookup(
            conn, tenant_id=principal.tenant_id, scope=SUBMIT_SCOPE, key=key, digest=digest, now=now
        )
        if remembered is None or remembered.resource_id is None:
            raise ValidationFailed("Idempotency-Key conflict; retry", code="idempotency_key_reuse")
        return await _replay(conn, runtime, principal, remembered.resource_id, request)

    # Nobody follows a job that did not exist before this commit: only the workers need telling.
    uow.after_commit(lambda: runtime.bus.publish(NEW_WORK, {"job_id": job.id}))
    return Json(await render_job(conn, runtime, job, base_url(request)), status_code=201)


async def _replay(
    conn: AsyncConnection, runtime: Runtime, principal: Principal, job_id: str, request: Request
) -> Json:
    job = await service.get_job(conn, principal.tenant_id, job_id)
    return Json(
        await render_job(conn, runtime, job, base_url(request)),
        status_code=201,
        headers={"Idempotency-Replayed": "true"},
    )


@router.get("")
async def list_jobs(
    request: Request,
    principal: JobsReader,
    conn: ReadConn,
    status: str | None = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 20,
    cursor: str | None = None,
) -> Json:
    runtime = get_runtime(request)
    await request.app.state.limiter.check(
        request, kind="read", rate=principal.plan.read_rate, identity=principal.key_id
    )
    limit = min(limit, runtime.settings.list_max_limit)
    position = None
    if cursor is not None:
        position = job_repo.decode_cursor(cursor)
        if position is None:
            raise ValidationFailed("Invalid cursor", code="invalid_request")
    rows = await job_repo.list_jobs(
        conn,
        principal.tenant_id,
        statuses=service.parse_statuses(status),
        limit=limit,
        cursor=position,
        labels=service.parse_label_filter(request.query_params) or None,
    )
    page, more = rows[:limit], len(rows) > limit
    base = base_url(request)
    return Json(
        {
            "jobs": [await render_job(conn, runtime, job, base) for job in page],
            "truncated": more,
            "next_cursor": job_repo.encode_cursor(page[-1]) if more and page else None,
        }
    )


@router.get("/{job_id}")
async def get_job(job_id: str, request: Request, principal: JobsReader, conn: ReadConn) -> Json:
    runtime = get_runtime(request)
    await request.app.state.limiter.check(
        request, kind="read", rate=principal.plan.read_rate, identity=principal.key_id
    )
    job = await service.get_job(conn, principal.tenant_id, job_id)
    return Json(await render_job(conn, runtime, job, base_url(request)))


@router.post("/{job_id}/cancel")
async def cancel_job(job_id: str, request: Request, principal: JobsWriter, uow: Uow) -> Json:
    runtime = get_runtime(request)
    job, changed = await service.cancel_job(uow.conn, principal.tenant_id, job_id)
    if changed:
        await record_transition(uow.conn, job)
        message = {"kind": "status", "status": job.status}
        uow.after_commit(lambda: runtime.bus.publish(job_topic(job.id), message))
    return Json(await render_job(uow.conn, runtime, job, base_url(request)))
