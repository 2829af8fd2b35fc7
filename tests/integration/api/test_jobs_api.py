"""The jobs API against a real database (SQLite and PostgreSQL): contract shapes, tenant isolation,
auth, idempotency, validation, cancel."""

from __future__ import annotations

import uuid

import httpx
import pytest
from comfy_low.models import ErrorEnvelope, Job

from comfyfleet.runtime import Runtime
from tests.support.factories import add_key, make_tenant
from tests.support.workflows import empty_image_save

pytestmark = pytest.mark.asyncio


async def submit(api: httpx.AsyncClient, headers: dict[str, str], **extra: object) -> httpx.Response:
    return await api.post("/api/v2/jobs", json={"workflow": empty_image_save(), **extra}, headers=headers)


def assert_error(response: httpx.Response, status: int, code: str) -> None:
    assert response.status_code == status, response.text
    envelope = ErrorEnvelope.model_validate(response.json())
    assert envelope.error.code == code


async def test_submit_answers_201_with_a_contract_job(api: httpx.AsyncClient, runtime: Runtime) -> None:
    tenant = await make_tenant(runtime.engine, runtime.settings)
    response = await submit(api, tenant.headers, metadata={"run": "a"})
    assert response.status_code == 201, response.text
    job = Job.model_validate(response.json())
    assert job.status.value == "queued"
    assert job.queue_position == 0
    assert job.urls.self.endswith(f"/api/v2/jobs/{job.id}")
    assert response.json()["metadata"] == {"run": "a"}
    got = await api.get(f"/api/v2/jobs/{job.id}", headers=tenant.headers)
    assert got.status_code == 200
    assert Job.model_validate(got.json()).id == job.id


async def test_health_and_readiness(api: httpx.AsyncClient) -> None:
    assert (await api.get("/api/v2/health")).json()["status"] == "ok"
    ready = await api.get("/readyz")
    assert ready.status_code == 200 and ready.json()["checks"]["database"] == "ok"


async def test_another_tenants_job_is_a_404_like_a_missing_one(
    api: httpx.AsyncClient, runtime: Runtime
) -> None:
    owner = await make_tenant(runtime.engine, runtime.settings)
    other = await make_tenant(runtime.engine, runtime.settings)
    job_id = (await submit(api, owner.headers)).json()["id"]
    missing_id = str(uuid.uuid4())
    for path in ("/api/v2/jobs/{}", "/api/v2/jobs/{}/cancel"):
        method = api.post if path.endswith("cancel") else api.get
        foreign = await method(path.format(job_id), headers=other.headers)
        missing = await method(path.format(missing_id), headers=other.headers)
        assert foreign.status_code == missing.status_code == 404
        assert foreign.json() == missing.json()
    listing = await api.get("/api/v2/jobs", headers=other.headers)
    assert listing.json()["jobs"] == []
    own = await api.get("/api/v2/jobs", headers=owner.headers)
    assert [j["id"] for j in own.json()["jobs"]] == [job_id]
    # The owner's job was not canceled by the other tenant's attempt.
    assert (await api.get(f"/api/v2/jobs/{job_id}", headers=owner.headers)).json()["status"] == "queued"


async def test_unknown_revoked_and_missing_keys_get_401(api: httpx.AsyncClient, runtime: Runtime) -> None:
    from comfyfleet.tenants import repository as tenant_repo

    tenant = await make_tenant(runtime.engine, runtime.settings)
    assert_error(await api.get("/api/v2/jobs"), 401, "unauthorized")
    assert_error(await api.get("/api/v2/jobs", headers={"Authorization": "Bearer nope"}), 401, "unauthorized")
    forged = tenant.key[:-4] + ("AAAA" if not tenant.key.endswith("AAAA") else "BBBB")
    assert_error(
        await api.get("/api/v2/jobs", headers={"Authorization": f"Bearer {forged}"}), 401, "unauthorized"
    )
    assert (await api.get("/api/v2/jobs", headers=tenant.headers)).status_code == 200
    async with runtime.engine.begin() as conn:
        assert await tenant_repo.revoke_key(conn, tenant.key_id)
    assert_error(await api.get("/api/v2/jobs", headers=tenant.headers), 401, "unauthorized")


async def test_a_key_without_the_scope_gets_403(api: httpx.AsyncClient, runtime: Runtime) -> None:
    tenant = await make_tenant(runtime.engine, runtime.settings)
    reader = await add_key(runtime.engine, runtime.settings, tenant.id, ["jobs:read"])
    headers = {"Authorization": f"Bearer {reader}"}
    assert (await api.get("/api/v2/jobs", headers=headers)).status_code == 200
    assert_error(await submit(api, headers), 403, "forbidden")
    assets_only = await add_key(runtime.engine, runtime.settings, tenant.id, ["assets:read"])
    assert_error(
        await api.get("/api/v2/jobs", headers={"Authorization": f"Bearer {assets_only}"}), 403, "forbidden"
    )


async def test_idempotency_replay_and_reuse(api: httpx.AsyncClient, runtime: Runtime) -> None:
    tenant = await make_tenant(runtime.engine, runtime.settings)
    headers = {**tenant.headers, "Idempotency-Key": "key-1"}
    first = await submit(api, headers)
    again = await submit(api, headers)
    assert first.status_code == again.status_code == 201
    assert again.headers["Idempotency-Replayed"] == "true"
    assert "Idempotency-Replayed" not in first.headers
    assert again.json()["id"] == first.json()["id"]
    different = await api.post("/api/v2/jobs", json={"workflow": empty_image_save(color=5)}, headers=headers)
    assert_error(different, 422, "idempotency_key_reuse")
    # Keys are per tenant: the same key from another tenant is a new request.
    other = await make_tenant(runtime.engine, runtime.settings)
    theirs = await submit(api, {**other.headers, "Idempotency-Key": "key-1"})
    assert theirs.status_code == 201 and theirs.json()["id"] != first.json()["id"]
    listing = await api.get("/api/v2/jobs", headers=tenant.headers)
    assert len(listing.json()["jobs"]) == 1


@pytest.mark.parametrize(
    ("body", "status", "code"),
    [
        ({"workflow": {"nodes": [], "links": [], "version": 0.4}}, 422, "workflow_format_ui"),
        ({"workflow": {"1": {"inputs": {}}}}, 422, "invalid_workflow"),
        (
            {"workflow": {"1": {"class_type": "SaveImage", "inputs": {"images": ["9", 0]}}}},
            422,
            "invalid_workflow",
        ),
        ({"workflow": []}, 422, "invalid_workflow"),
        ({}, 422, "invalid_request"),
        (
            {"workflow": {"1": {"class_type": "EmptyImage", "inputs": {}}}, "metadata": "x"},
            422,
            "invalid_request",
        ),
        ({"workflow": {"1": {"class_type": "EmptyImage", "inputs": {}}}, "bogus": 1}, 422, "invalid_request"),
    ],
)
async def test_bad_workflows_are_refused_with_the_contract_codes(
    api: httpx.AsyncClient, runtime: Runtime, body: dict[str, object], status: int, code: str
) -> None:
    tenant = await make_tenant(runtime.engine, runtime.settings)
    assert_error(await api.post("/api/v2/jobs", json=body, headers=tenant.headers), status, code)


async def test_malformed_json_and_oversized_bodies(api: httpx.AsyncClient, runtime: Runtime) -> None:
    tenant = await make_tenant(runtime.engine, runtime.settings)
    bad = await api.post("/api/v2/jobs", content=b"{not json", headers=tenant.headers)
    assert_error(bad, 422, "invalid_request")
    huge = {"workflow": empty_image_save(), "metadata": {"x": "y" * 100}, "pad": "z" * (3 * 1024 * 1024)}
    assert_error(await api.post("/api/v2/jobs", json=huge, headers=tenant.headers), 413, "payload_too_large")


async def test_too_many_nodes_is_refused(api: httpx.AsyncClient, runtime: Runtime) -> None:
    tenant = await make_tenant(runtime.engine, runtime.settings, plan="free")
    limit = runtime.settings.plan("free").max_nodes
    workflow = {str(i): {"class_type": "EmptyImage", "inputs": {}} for i in range(limit + 1)}
    response = await api.post("/api/v2/jobs", json={"workflow": workflow}, headers=tenant.headers)
    assert response.status_code == 422
    assert response.json()["error"]["code"] in ("too_many_nodes", "invalid_workflow")


async def test_max_queued_answers_429_queue_full(api: httpx.AsyncClient, runtime: Runtime) -> None:
    tenant = await make_tenant(runtime.engine, runtime.settings, plan="free")
    for _ in range(runtime.settings.plan("free").max_queued):
        assert (await submit(api, tenant.headers)).status_code == 201
    refused = await submit(api, tenant.headers)
    assert_error(refused, 429, "queue_full")
    assert int(refused.headers["Retry-After"]) > 0


async def test_listing_filters_pages_and_orders_newest_first(
    api: httpx.AsyncClient, runtime: Runtime
) -> None:
    tenant = await make_tenant(runtime.engine, runtime.settings)
    ids = [(await submit(api, tenant.headers)).json()["id"] for _ in range(5)]
    await api.post(f"/api/v2/jobs/{ids[0]}/cancel", headers=tenant.headers)
    seen: list[str] = []
    cursor = None
    while True:
        params = {"limit": "2", **({"cursor": cursor} if cursor else {})}
        page = (await api.get("/api/v2/jobs", params=params, headers=tenant.headers)).json()
        seen += [j["id"] for j in page["jobs"]]
        cursor = page["next_cursor"]
        if not page["truncated"]:
            break
    assert seen == list(reversed(ids))
    canceled = (await api.get("/api/v2/jobs", params={"status": "canceled"}, headers=tenant.headers)).json()
    assert [j["id"] for j in canceled["jobs"]] == [ids[0]]
    assert_error(
        await api.get("/api/v2/jobs", params={"status": "nope"}, headers=tenant.headers),
        422,
        "invalid_request",
    )
    assert_error(
        await api.get("/api/v2/jobs", params={"cursor": "%%%"}, headers=tenant.headers),
        422,
        "invalid_request",
    )


async def test_cancel_of_a_queued_job_is_immediate_and_idempotent(
    api: httpx.AsyncClient, runtime: Runtime
) -> None:
    tenant = await make_tenant(runtime.engine, runtime.settings)
    job_id = (await submit(api, tenant.headers)).json()["id"]
    first = await api.post(f"/api/v2/jobs/{job_id}/cancel", headers=tenant.headers)
    second = await api.post(f"/api/v2/jobs/{job_id}/cancel", headers=tenant.headers)
    assert first.status_code == second.status_code == 200
    assert first.json()["status"] == second.json()["status"] == "canceled"
    assert Job.model_validate(second.json()).completed_at is not None
