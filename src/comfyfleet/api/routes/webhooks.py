"""``/api/v2/webhooks``: webhook endpoints, their delivery log, redelivery, and the signing secret for
per-job ``webhook_url`` deliveries. Our extension to the Comfy API v2 contract; every route needs the
``admin`` scope, and another tenant's endpoint or delivery answers exactly like a missing one."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Query, Request
from starlette.responses import Response

from comfyfleet.api.auth import Authenticator, Principal
from comfyfleet.api.deps import ReadConn, Uow, get_runtime, read_json
from comfyfleet.api.responses import Json
from comfyfleet.errors import ValidationFailed
from comfyfleet.timeutil import utcnow
from comfyfleet.webhooks import repository as repo
from comfyfleet.webhooks import service
from comfyfleet.webhooks.schemas import delivery_body, endpoint_body, job_url_secret_body

router = APIRouter(prefix="/api/v2/webhooks", tags=["webhooks"])

Admin = Annotated[Principal, Depends(Authenticator("admin"))]

# A secret is in this answer and nowhere else: keep it out of every cache.
_SECRET_HEADERS = {"Cache-Control": "no-store"}


async def _limit(request: Request, principal: Principal) -> None:
    await request.app.state.limiter.check(
        request, kind="read", rate=principal.plan.read_rate, identity=principal.key_id
    )


async def _body(request: Request) -> object:
    body, _raw = await read_json(request, get_runtime(request).settings.max_body_bytes)
    return body


# ---------------------------------------------------------------- endpoints


@router.post("", status_code=201)
async def create_endpoint(request: Request, principal: Admin) -> Json:
    await _limit(request, principal)
    runtime = get_runtime(request)
    changes = service.parse_endpoint_body(await _body(request), creating=True)
    # Vetting resolves DNS: done before the transaction, so no database lock waits on a slow resolver.
    vetted = await service.vet_changes(runtime.settings, principal.tenant, changes)
    async with runtime.engine.begin() as conn:
        endpoint, secret = await service.create_endpoint(conn, runtime.settings, principal.tenant, vetted)
    return Json(endpoint_body(endpoint, secret=secret), status_code=201, headers=_SECRET_HEADERS)


@router.get("")
async def list_endpoints(request: Request, principal: Admin, conn: ReadConn) -> Json:
    await _limit(request, principal)
    endpoints = await repo.list_endpoints(conn, principal.tenant_id)
    return Json({"webhooks": [endpoint_body(e) for e in endpoints]})


# Static paths before "/{endpoint_id}", which would otherwise take them.


@router.post("/job-url-secret", status_code=201)
async def create_job_url_secret(request: Request, principal: Admin, uow: Uow) -> Json:
    await _limit(request, principal)
    row, secret = await service.create_job_url_secret(
        uow.conn, get_runtime(request).settings, principal.tenant_id
    )
    return Json(job_url_secret_body(row, secret=secret), status_code=201, headers=_SECRET_HEADERS)


@router.get("/job-url-secret")
async def get_job_url_secret(request: Request, principal: Admin, conn: ReadConn) -> Json:
    await _limit(request, principal)
    return Json(job_url_secret_body(await service.get_job_url_secret(conn, principal.tenant_id)))


@router.post("/job-url-secret/rotate-secret")
async def rotate_job_url_secret(request: Request, principal: Admin, uow: Uow) -> Json:
    await _limit(request, principal)
    row, secret = await service.rotate_job_url_secret(
        uow.conn, get_runtime(request).settings, principal.tenant_id
    )
    return Json(job_url_secret_body(row, secret=secret), headers=_SECRET_HEADERS)


@router.get("/deliveries/{delivery_id}")
async def get_delivery(delivery_id: str, request: Request, principal: Admin, conn: ReadConn) -> Json:
    await _limit(request, principal)
    delivery = await service.get_delivery(conn, principal.tenant_id, delivery_id)
    attempts = await repo.attempts_for(conn, principal.tenant_id, [delivery.id])
    return Json(delivery_body(delivery, attempts[delivery.id]))


@router.post("/deliveries/{delivery_id}/redeliver", status_code=202)
async def redeliver(delivery_id: str, request: Request, principal: Admin, uow: Uow) -> Json:
    await _limit(request, principal)
    delivery = await service.redeliver(uow.conn, principal.tenant_id, delivery_id, now=utcnow())
    attempts = await repo.attempts_for(uow.conn, principal.tenant_id, [delivery.id])
    return Json(delivery_body(delivery, attempts[delivery.id]), status_code=202)


@router.get("/{endpoint_id}")
async def get_endpoint(endpoint_id: str, request: Request, principal: Admin, conn: ReadConn) -> Json:
    await _limit(request, principal)
    return Json(endpoint_body(await service.get_endpoint(conn, principal.tenant_id, endpoint_id)))


@router.patch("/{endpoint_id}")
async def update_endpoint(endpoint_id: str, request: Request, principal: Admin) -> Json:
    await _limit(request, principal)
    runtime = get_runtime(request)
    changes = service.parse_endpoint_body(await _body(request), creating=False)
    vetted = await service.vet_changes(runtime.settings, principal.tenant, changes)
    async with runtime.engine.begin() as conn:
        endpoint = await service.update_endpoint(conn, principal.tenant_id, endpoint_id, vetted)
    return Json(endpoint_body(endpoint))


@router.delete("/{endpoint_id}", status_code=204)
async def delete_endpoint(endpoint_id: str, request: Request, principal: Admin, uow: Uow) -> Response:
    await _limit(request, principal)
    await service.delete_endpoint(uow.conn, principal.tenant_id, endpoint_id)
    return Response(status_code=204)


@router.post("/{endpoint_id}/rotate-secret")
async def rotate_endpoint_secret(endpoint_id: str, request: Request, principal: Admin, uow: Uow) -> Json:
    await _limit(request, principal)
    endpoint, secret = await service.rotate_endpoint_secret(
        uow.conn, get_runtime(request).settings, principal.tenant_id, endpoint_id
    )
    return Json(endpoint_body(endpoint, secret=secret), headers=_SECRET_HEADERS)


@router.get("/{endpoint_id}/deliveries")
async def list_deliveries(
    endpoint_id: str,
    request: Request,
    principal: Admin,
    conn: ReadConn,
    limit: Annotated[int, Query(ge=1, le=1000)] = 20,
    cursor: str | None = None,
    status: str | None = None,
) -> Json:
    await _limit(request, principal)
    endpoint = await service.get_endpoint(conn, principal.tenant_id, endpoint_id)
    limit = min(limit, get_runtime(request).settings.list_max_limit)
    position = None
    if cursor is not None:
        position = repo.decode_cursor(cursor)
        if position is None:
            raise ValidationFailed("Invalid cursor", code="invalid_request")
    rows = await repo.list_deliveries(
        conn,
        principal.tenant_id,
        endpoint.id,
        limit=limit,
        cursor=position,
        status=service.parse_delivery_status(status),
    )
    page, more = rows[:limit], len(rows) > limit
    attempts = await repo.attempts_for(conn, principal.tenant_id, [d.id for d in page])
    return Json(
        {
            "deliveries": [delivery_body(d, attempts[d.id]) for d in page],
            "truncated": more,
            "next_cursor": repo.encode_cursor(page[-1]) if more and page else None,
        }
    )
