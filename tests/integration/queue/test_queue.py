"""The database queue: claims, fair share, quotas, leases, the reaper, cancel against a worker."""

from __future__ import annotations

import asyncio
from datetime import timedelta

import httpx

from comfyfleet.jobs import repository as repo
from comfyfleet.jobs.states import JobStatus
from comfyfleet.queue.claim import claim_next, finish
from comfyfleet.queue.executor import Failed, Retry, Succeeded
from comfyfleet.queue.reaper import reap_once
from comfyfleet.queue.worker_loop import WorkerLoop, run_claimed
from comfyfleet.runtime import Runtime
from comfyfleet.timeutil import utcnow
from tests.support.executors import ScriptedExecutor
from tests.support.factories import TenantWithKey, make_tenant
from tests.support.workflows import empty_image_save


async def submit_n(api: httpx.AsyncClient, tenant: TenantWithKey, n: int) -> list[str]:
    ids = []
    for i in range(n):
        r = await api.post(
            "/api/v2/jobs", json={"workflow": empty_image_save(color=i)}, headers=tenant.headers
        )
        assert r.status_code == 201, r.text
        ids.append(r.json()["id"])
    return ids


async def status_of(runtime: Runtime, job_id: str) -> str | None:
    async with runtime.engine.connect() as conn:
        return await repo.read_status(conn, job_id)


async def test_fair_share_between_a_heavy_and_a_light_tenant(
    api: httpx.AsyncClient, runtime: Runtime
) -> None:
    heavy = await make_tenant(runtime.engine, runtime.settings, plan="enterprise")
    light = await make_tenant(runtime.engine, runtime.settings, plan="enterprise")
    await submit_n(api, heavy, 10)
    light_ids = await submit_n(api, light, 2)
    # Four claims while nothing finishes: the light tenant's two jobs are among them.
    claimed = [await claim_next(runtime, f"w{i}") for i in range(4)]
    tenants = [job.tenant_id for job in claimed if job]
    assert tenants.count(light.id) == 2 and tenants.count(heavy.id) == 2
    assert {job.id for job in claimed if job and job.tenant_id == light.id} == set(light_ids)


async def test_priority_by_plan_runs_first(api: httpx.AsyncClient, runtime: Runtime) -> None:
    free = await make_tenant(runtime.engine, runtime.settings, plan="free")
    pro = await make_tenant(runtime.engine, runtime.settings, plan="pro")
    await submit_n(api, free, 1)
    await submit_n(api, pro, 1)
    first = await claim_next(runtime, "w")
    assert first is not None and first.tenant_id == pro.id


async def test_max_running_is_enforced(api: httpx.AsyncClient, runtime: Runtime) -> None:
    tenant = await make_tenant(runtime.engine, runtime.settings, plan="free")  # max_running 1
    await submit_n(api, tenant, 3)
    first = await claim_next(runtime, "w1")
    assert first is not None
    assert await claim_next(runtime, "w2") is None
    await finish(runtime, first, "w1", Succeeded())
    assert await claim_next(runtime, "w2") is not None


async def test_many_concurrent_claimers_never_share_a_job(
    api: httpx.AsyncClient, runtime: Runtime, db_backend: str
) -> None:
    tenants = [await make_tenant(runtime.engine, runtime.settings, plan="enterprise") for _ in range(4)]
    for tenant in tenants:
        await submit_n(api, tenant, 12)
    claims: list[str] = []

    async def claimer(name: str) -> None:
        while True:
            job = await claim_next(runtime, name)
            if job is None:
                return
            claims.append(job.id)
            await finish(runtime, job, name, Succeeded())

    await asyncio.gather(*(claimer(f"w{i}") for i in range(16)))
    assert len(claims) == 48 and len(set(claims)) == 48


async def test_an_expired_lease_requeues_then_fails_past_the_budget(
    api: httpx.AsyncClient, runtime: Runtime
) -> None:
    tenant = await make_tenant(runtime.engine, runtime.settings)
    (job_id,) = await submit_n(api, tenant, 1)
    budget = runtime.settings.plan("pro").max_attempts
    for attempt in range(1, budget + 1):
        job = await claim_next(runtime, f"w{attempt}")
        assert job is not None and job.id == job_id and job.attempts == attempt
        report = await reap_once(runtime, now=utcnow() + timedelta(seconds=runtime.settings.lease_s + 1))
        if attempt < budget:
            assert report.requeued == [job_id]
            assert await status_of(runtime, job_id) == JobStatus.QUEUED
    assert await status_of(runtime, job_id) == JobStatus.FAILED
    got = (await api.get(f"/api/v2/jobs/{job_id}", headers=tenant.headers)).json()
    assert got["error"]["code"] == "worker_lost"
    # The worker whose lease was lost cannot finish the job any more.
    assert await finish(runtime, job, f"w{budget}", Succeeded()) is None


async def test_the_queue_deadline_expires_a_job_without_any_get(
    api: httpx.AsyncClient, runtime: Runtime
) -> None:
    tenant = await make_tenant(runtime.engine, runtime.settings)
    (job_id,) = await submit_n(api, tenant, 1)
    deadline = runtime.settings.plan("pro").queue_deadline_s
    assert (await reap_once(runtime)).expired == []
    report = await reap_once(runtime, now=utcnow() + timedelta(seconds=deadline + 1))
    assert report.expired == [job_id]
    assert await status_of(runtime, job_id) == JobStatus.EXPIRED


async def test_cancel_of_a_running_job_reaches_the_worker(api: httpx.AsyncClient, runtime: Runtime) -> None:
    tenant = await make_tenant(runtime.engine, runtime.settings)
    (job_id,) = await submit_n(api, tenant, 1)
    executor = ScriptedExecutor()
    loop = WorkerLoop(runtime, executor, name="w")
    stop = asyncio.Event()
    task = asyncio.create_task(loop.run(stop))
    try:
        ctx = await asyncio.wait_for(executor.started.get(), 5)
        assert ctx.job.id == job_id
        response = await api.post(f"/api/v2/jobs/{job_id}/cancel", headers=tenant.headers)
        assert response.json()["status"] == "canceling"
        for _ in range(100):
            if await status_of(runtime, job_id) == JobStatus.CANCELED:
                break
            await asyncio.sleep(0.05)
        assert await status_of(runtime, job_id) == JobStatus.CANCELED
        assert executor.seen_cancel == [job_id]
    finally:
        stop.set()
        task.cancel()


async def test_a_canceling_job_never_becomes_succeeded(api: httpx.AsyncClient, runtime: Runtime) -> None:
    tenant = await make_tenant(runtime.engine, runtime.settings)
    (job_id,) = await submit_n(api, tenant, 1)
    job = await claim_next(runtime, "w")
    assert job is not None
    await api.post(f"/api/v2/jobs/{job_id}/cancel", headers=tenant.headers)
    final = await finish(runtime, job, "w", Succeeded())
    assert final is not None and final.status == JobStatus.CANCELED


async def test_cancel_after_success_is_a_noop(api: httpx.AsyncClient, runtime: Runtime) -> None:
    tenant = await make_tenant(runtime.engine, runtime.settings)
    (job_id,) = await submit_n(api, tenant, 1)
    job = await claim_next(runtime, "w")
    assert job is not None
    await finish(runtime, job, "w", Succeeded())
    response = await api.post(f"/api/v2/jobs/{job_id}/cancel", headers=tenant.headers)
    assert response.status_code == 200 and response.json()["status"] == "succeeded"
    assert await status_of(runtime, job_id) == JobStatus.SUCCEEDED


async def test_failures_and_retries_end_in_one_terminal_state(
    api: httpx.AsyncClient, runtime: Runtime
) -> None:
    tenant = await make_tenant(runtime.engine, runtime.settings)
    failing, retried = await submit_n(api, tenant, 2)
    executor = ScriptedExecutor()
    job = await claim_next(runtime, "w")
    assert job is not None
    executor.finish(job.id, Failed("node_execution_error", "boom", node_id="2", class_type="SaveImage"))
    final = await run_claimed(runtime, executor, job, "w")
    assert final is not None and final.status == JobStatus.FAILED
    assert final.error is not None and final.error["node_id"] == "2"
    job2 = await claim_next(runtime, "w")
    assert job2 is not None
    executor.finish(job2.id, Retry("comfyui died"))
    final2 = await run_claimed(runtime, executor, job2, "w")
    assert final2 is not None and final2.status == JobStatus.QUEUED
    assert {failing, retried} == {job.id, job2.id}
