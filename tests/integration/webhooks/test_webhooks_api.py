"""The ``/api/v2/webhooks`` surface on SQLite and PostgreSQL: CRUD, secrets shown once and encrypted at
rest, the delivery log, tenant isolation on every route, scopes, and the contract's error envelope."""

from __future__ import annotations

import uuid
from datetime import timedelta

import httpx
from comfy_low.models import ErrorEnvelope
from sqlalchemy import select, update

from comfyfleet.db.tables import webhook_deliveries, webhook_endpoints
from comfyfleet.runtime import Runtime
from comfyfleet.timeutil import utcnow
from comfyfleet.webhooks.secrets import decrypt_secret
from comfyfleet.webhooks.sender import deliver_due
from tests.integration.webhooks.helpers import admin_tenant, create_endpoint, deliveries, run_job
from tests.integration.webhooks.receiver import Receiver
from tests.support.factories import add_key


def assert_error(response: httpx.Response, status: int, code: str) -> None:
    assert response.status_code == status, response.text
    assert ErrorEnvelope.model_validate(response.json()).error.code == code


async def test_endpoint_crud_shows_the_secret_once(
    api: httpx.AsyncClient, runtime: Runtime, receiver: Receiver
) -> None:
    tenant = await admin_tenant(runtime)
    created = await api.post(
        "/api/v2/webhooks",
        json={"url": receiver.url("a"), "description": "prod", "events": ["job.failed", "job.succeeded"]},
        headers=tenant.headers,
    )
    assert created.status_code == 201, created.text
    assert created.headers["cache-control"] == "no-store"
    body = created.json()
    assert body["secret"].startswith("whsec_") and body["enabled"] is True
    assert body["events"] == ["job.succeeded", "job.failed"]  # canonical order
    endpoint_id = body["id"]

    listed = (await api.get("/api/v2/webhooks", headers=tenant.headers)).json()["webhooks"]
    assert [e["id"] for e in listed] == [endpoint_id] and "secret" not in listed[0]
    shown = (await api.get(f"/api/v2/webhooks/{endpoint_id}", headers=tenant.headers)).json()
    assert "secret" not in shown and shown["description"] == "prod"

    patched = await api.patch(
        f"/api/v2/webhooks/{endpoint_id}",
        json={"events": ["job.started", "job.expired"], "url": receiver.url("b"), "description": None},
        headers=tenant.headers,
    )
    assert patched.status_code == 200, patched.text
    assert patched.json()["events"] == ["job.expired", "job.started"]
    assert patched.json()["url"] == receiver.url("b") and patched.json()["description"] is None

    refused = await api.patch(
        f"/api/v2/webhooks/{endpoint_id}",
        json={"url": "http://169.254.169.254/latest"},
        headers=tenant.headers,
    )
    assert_error(refused, 422, "url_not_allowed")
    assert refused.json()["error"]["details"]["reason"]

    deleted = await api.delete(f"/api/v2/webhooks/{endpoint_id}", headers=tenant.headers)
    assert deleted.status_code == 204
    assert_error(await api.get(f"/api/v2/webhooks/{endpoint_id}", headers=tenant.headers), 404, "not_found")
    assert_error(
        await api.delete(f"/api/v2/webhooks/{endpoint_id}", headers=tenant.headers), 404, "not_found"
    )


async def test_invalid_bodies_answer_with_the_envelope(
    api: httpx.AsyncClient, runtime: Runtime, receiver: Receiver
) -> None:
    tenant = await admin_tenant(runtime)
    h = tenant.headers
    assert_error(await api.post("/api/v2/webhooks", json={}, headers=h), 422, "invalid_request")
    assert_error(await api.post("/api/v2/webhooks", json=[1], headers=h), 422, "invalid_request")
    assert_error(
        await api.post("/api/v2/webhooks", json={"url": receiver.url("a"), "secret": "mine"}, headers=h),
        422,
        "invalid_request",
    )
    assert_error(
        await api.post(
            "/api/v2/webhooks", json={"url": receiver.url("a"), "events": ["job.exploded"]}, headers=h
        ),
        422,
        "invalid_request",
    )
    assert_error(
        await api.post("/api/v2/webhooks", json={"url": receiver.url("a"), "events": []}, headers=h),
        422,
        "invalid_request",
    )
    assert_error(
        await api.post("/api/v2/webhooks", json={"url": "ftp://example.com/x"}, headers=h),
        422,
        "url_not_allowed",
    )
    userinfo = "http://user:pw@127.0.0.1/x"  # pragma: allowlist secret (a made-up userinfo the guard refuses)
    refused = await api.post("/api/v2/webhooks", json={"url": userinfo}, headers=h)
    assert_error(refused, 422, "url_not_allowed")


async def test_secrets_are_encrypted_at_rest(
    api: httpx.AsyncClient, runtime: Runtime, receiver: Receiver
) -> None:
    tenant = await admin_tenant(runtime)
    endpoint_id, secret = await create_endpoint(api, tenant, receiver.url("a"))
    async with runtime.engine.connect() as conn:
        row = (
            await conn.execute(select(webhook_endpoints).where(webhook_endpoints.c.id == endpoint_id))
        ).one()
    assert secret not in row.secret and secret.removeprefix("whsec_") not in row.secret
    assert decrypt_secret(runtime.settings, row.secret, row_id=endpoint_id) == secret


async def test_the_job_url_secret_is_created_once_and_rotated(
    api: httpx.AsyncClient, runtime: Runtime
) -> None:
    tenant = await admin_tenant(runtime)
    path = "/api/v2/webhooks/job-url-secret"
    assert_error(await api.get(path, headers=tenant.headers), 404, "not_found")
    assert_error(await api.post(f"{path}/rotate-secret", headers=tenant.headers), 404, "not_found")
    created = await api.post(path, headers=tenant.headers)
    assert created.status_code == 201 and created.json()["secret"].startswith("whsec_")
    shown = await api.get(path, headers=tenant.headers)
    assert shown.status_code == 200 and "secret" not in shown.json()
    rotated = await api.post(f"{path}/rotate-secret", headers=tenant.headers)
    assert rotated.status_code == 200
    assert (
        rotated.json()["secret"] != created.json()["secret"] and rotated.json()["previous_secret_expires_at"]
    )
    # It is not an endpoint: never listed, never addressable as one.
    assert (await api.get("/api/v2/webhooks", headers=tenant.headers)).json()["webhooks"] == []


async def test_the_delivery_log_pages_and_filters(
    api: httpx.AsyncClient, runtime: Runtime, receiver: Receiver
) -> None:
    tenant = await admin_tenant(runtime)
    endpoint_id, secret = await create_endpoint(api, tenant, receiver.url("a"))
    receiver.accept("a", secret)
    for _ in range(3):
        await run_job(api, runtime, tenant)
    assert await deliver_due(runtime) == 3
    await run_job(api, runtime, tenant)  # one more, still pending

    seen: list[str] = []
    cursor = None
    while True:
        params: dict[str, str | int] = {"limit": 2}
        if cursor:
            params["cursor"] = cursor
        page = (
            await api.get(f"/api/v2/webhooks/{endpoint_id}/deliveries", params=params, headers=tenant.headers)
        ).json()
        seen += [d["id"] for d in page["deliveries"]]
        cursor = page["next_cursor"]
        if not page["truncated"]:
            break
    assert len(seen) == len(set(seen)) == 4
    pending = (
        await api.get(f"/api/v2/webhooks/{endpoint_id}/deliveries?status=pending", headers=tenant.headers)
    ).json()["deliveries"]
    assert [d["status"] for d in pending] == ["pending"] and pending[0]["attempt_log"] == []
    assert_error(
        await api.get(f"/api/v2/webhooks/{endpoint_id}/deliveries?status=lost", headers=tenant.headers),
        422,
        "invalid_request",
    )
    assert_error(
        await api.get(f"/api/v2/webhooks/{endpoint_id}/deliveries?cursor=%%%", headers=tenant.headers),
        422,
        "invalid_request",
    )


async def test_a_delivery_in_flight_is_not_redelivered(
    api: httpx.AsyncClient, runtime: Runtime, receiver: Receiver
) -> None:
    tenant = await admin_tenant(runtime)
    await create_endpoint(api, tenant, receiver.url("a"))
    await run_job(api, runtime, tenant)
    [row] = await deliveries(runtime)
    async with runtime.engine.begin() as conn:  # as a sender holding the lease would leave it
        await conn.execute(
            update(webhook_deliveries)
            .where(webhook_deliveries.c.id == row.id)
            .values(locked_by="another-sender", locked_until=utcnow() + timedelta(minutes=1))
        )
    response = await api.post(f"/api/v2/webhooks/deliveries/{row.id}/redeliver", headers=tenant.headers)
    assert_error(response, 409, "delivery_in_flight")


async def test_another_tenants_webhooks_are_404_like_missing_ones(
    api: httpx.AsyncClient, runtime: Runtime, receiver: Receiver
) -> None:
    owner, other = await admin_tenant(runtime), await admin_tenant(runtime)
    endpoint_id, secret = await create_endpoint(api, owner, receiver.url("a"))
    receiver.accept("a", secret)
    await run_job(api, runtime, owner)
    [row] = await deliveries(runtime)
    assert await api.post("/api/v2/webhooks/job-url-secret", headers=owner.headers)

    missing_endpoint, missing_delivery = str(uuid.uuid4()), f"msg_{uuid.uuid4().hex}"
    routes = [
        ("GET", "/api/v2/webhooks/{e}", None),
        ("PATCH", "/api/v2/webhooks/{e}", {"description": "mine now"}),
        ("POST", "/api/v2/webhooks/{e}/rotate-secret", None),
        ("GET", "/api/v2/webhooks/{e}/deliveries", None),
        ("GET", "/api/v2/webhooks/deliveries/{d}", None),
        ("POST", "/api/v2/webhooks/deliveries/{d}/redeliver", None),
        ("DELETE", "/api/v2/webhooks/{e}", None),
    ]
    for method, template, body in routes:
        foreign = await api.request(
            method, template.format(e=endpoint_id, d=row.id), json=body, headers=other.headers
        )
        missing = await api.request(
            method, template.format(e=missing_endpoint, d=missing_delivery), json=body, headers=other.headers
        )
        assert_error(foreign, 404, "not_found")
        assert foreign.json() == missing.json(), template
    assert (await api.get("/api/v2/webhooks", headers=other.headers)).json()["webhooks"] == []
    assert_error(await api.get("/api/v2/webhooks/job-url-secret", headers=other.headers), 404, "not_found")

    # Nothing the other tenant tried changed the owner's endpoint or delivery.
    shown = (await api.get(f"/api/v2/webhooks/{endpoint_id}", headers=owner.headers)).json()
    assert shown["description"] is None and shown["previous_secret_expires_at"] is None
    assert [r.status for r in await deliveries(runtime)] == ["pending"]


async def test_webhook_routes_need_the_admin_scope(
    api: httpx.AsyncClient, runtime: Runtime, receiver: Receiver
) -> None:
    tenant = await admin_tenant(runtime)
    endpoint_id, _ = await create_endpoint(api, tenant, receiver.url("a"))
    key = await add_key(runtime.engine, runtime.settings, tenant.id, ["jobs:read", "jobs:write"])
    plain = {"Authorization": f"Bearer {key}"}
    assert_error(await api.get("/api/v2/webhooks", headers=plain), 403, "forbidden")
    assert_error(
        await api.post("/api/v2/webhooks", json={"url": receiver.url("a")}, headers=plain), 403, "forbidden"
    )
    assert_error(
        await api.post(f"/api/v2/webhooks/{endpoint_id}/rotate-secret", headers=plain), 403, "forbidden"
    )
    assert_error(await api.get("/api/v2/webhooks"), 401, "unauthorized")
