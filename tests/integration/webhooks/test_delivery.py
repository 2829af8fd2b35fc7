"""Webhook delivery end to end, on SQLite and PostgreSQL: job transitions write outbox rows, the sender
delivers them signed to a loopback receiver that verifies each one with the ``standardwebhooks``
package. Time moves by passing ``now=`` to ``deliver_due``; nothing sleeps to wait for a retry."""

from __future__ import annotations

import asyncio
from datetime import timedelta
from email.utils import format_datetime
from pathlib import Path
from typing import Any

import httpx
import pytest
from comfy_low.models import Job
from standardwebhooks.webhooks import WebhookVerificationError

from comfyfleet.config import Settings
from comfyfleet.queue.executor import Failed
from comfyfleet.runtime import Runtime
from comfyfleet.timeutil import utcnow
from comfyfleet.webhooks import retry
from comfyfleet.webhooks.sender import deliver_due, run_sender
from tests.integration.webhooks.conftest import webhook_api, webhook_settings
from tests.integration.webhooks.helpers import (
    admin_tenant,
    after_retry_delay,
    create_endpoint,
    deliveries,
    run_job,
    submit,
)
from tests.integration.webhooks.receiver import Answer, Receiver
from tests.support.workflows import empty_image_save


async def delivery_log(
    api: httpx.AsyncClient, headers: dict[str, str], endpoint_id: str
) -> list[dict[str, Any]]:
    response = await api.get(f"/api/v2/webhooks/{endpoint_id}/deliveries", headers=headers)
    assert response.status_code == 200, response.text
    return list(response.json()["deliveries"])


async def test_a_finished_job_is_delivered_once_signed_with_the_job_object(
    api: httpx.AsyncClient, runtime: Runtime, receiver: Receiver
) -> None:
    tenant = await admin_tenant(runtime)
    endpoint_id, secret = await create_endpoint(api, tenant, receiver.url("a"))
    receiver.accept("a", secret)
    job_id = await run_job(api, runtime, tenant)

    assert await deliver_due(runtime) == 1
    assert await deliver_due(runtime) == 0  # delivered means done

    [got] = receiver.at("a")
    event = got.payload(secret)
    assert event["type"] == "job.succeeded"
    job = Job.model_validate(event["data"])  # the contract's job object
    assert job.id == job_id and job.status.value == "succeeded"
    assert event["data"]["urls"]["self"] == f"http://testserver/api/v2/jobs/{job_id}"
    assert got.webhook_id.startswith("msg_")
    assert got.headers["content-type"] == "application/json"
    [logged] = await delivery_log(api, tenant.headers, endpoint_id)
    assert logged["id"] == got.webhook_id and logged["status"] == "delivered"
    assert [a["status_code"] for a in logged["attempt_log"]] == [200]


async def test_a_receiver_down_for_a_while_gets_each_event_once_after_retries(
    api: httpx.AsyncClient, runtime: Runtime, receiver: Receiver
) -> None:
    tenant = await admin_tenant(runtime)
    endpoint_id, secret = await create_endpoint(api, tenant, receiver.url("a"))
    receiver.accept("a", secret)
    await run_job(api, runtime, tenant)
    await run_job(api, runtime, tenant, Failed(code="boom", message="it broke"))
    await receiver.go_down()

    now = utcnow()
    for attempt in (1, 2, 3):
        assert await deliver_due(runtime, now=now) == 2
        assert await deliver_due(runtime, now=now) == 0  # not due again before its retry time
        now = after_retry_delay(now, attempt)
    await receiver.start()
    assert await deliver_due(runtime, now=now) == 2
    for _ in range(3):
        now += timedelta(hours=12)
        assert await deliver_due(runtime, now=now) == 0

    ids = [d.webhook_id for d in receiver.at("a")]
    assert len(ids) == len(set(ids)) == 2
    assert sorted(d.payload(secret)["type"] for d in receiver.at("a")) == ["job.failed", "job.succeeded"]
    for logged in await delivery_log(api, tenant.headers, endpoint_id):
        assert logged["status"] == "delivered" and logged["attempts"] == 4
        statuses = [a["status_code"] for a in logged["attempt_log"]]
        assert statuses == [None, None, None, 200]
        assert all(a["error"] for a in logged["attempt_log"][:3])


async def test_gone_disables_the_endpoint_and_parks_its_deliveries(
    api: httpx.AsyncClient, runtime: Runtime, receiver: Receiver
) -> None:
    tenant = await admin_tenant(runtime)
    endpoint_id, secret = await create_endpoint(api, tenant, receiver.url("gone"))
    receiver.accept("gone", secret)
    receiver.answer("gone", default=Answer(410))
    await run_job(api, runtime, tenant)
    await run_job(api, runtime, tenant)

    assert await deliver_due(runtime) == 2
    endpoint = (await api.get(f"/api/v2/webhooks/{endpoint_id}", headers=tenant.headers)).json()
    assert endpoint["enabled"] is False and "410" in endpoint["disabled_reason"]
    assert {row.status for row in await deliveries(runtime)} == {"disabled"}

    # A disabled endpoint hears of nothing new, and nothing is retried.
    await run_job(api, runtime, tenant)
    assert len(await deliveries(runtime)) == 2
    assert await deliver_due(runtime, now=utcnow() + timedelta(hours=30)) == 0

    # Switched back on, a parked delivery goes out on request.
    receiver.answer("gone", default=Answer(200))
    patched = await api.patch(
        f"/api/v2/webhooks/{endpoint_id}", json={"enabled": True}, headers=tenant.headers
    )
    assert patched.status_code == 200 and patched.json()["disabled_reason"] is None
    parked = (await deliveries(runtime))[0].id
    redo = await api.post(f"/api/v2/webhooks/deliveries/{parked}/redeliver", headers=tenant.headers)
    assert redo.status_code == 202, redo.text
    assert await deliver_due(runtime) == 1
    assert [d.webhook_id for d in receiver.at("gone")].count(parked) == 2


@pytest.mark.parametrize("form", ["seconds", "http-date"])
async def test_retry_after_postpones_the_next_attempt(
    api: httpx.AsyncClient, runtime: Runtime, receiver: Receiver, form: str
) -> None:
    tenant = await admin_tenant(runtime)
    endpoint_id, secret = await create_endpoint(api, tenant, receiver.url("busy"))
    receiver.accept("busy", secret)
    await run_job(api, runtime, tenant)
    now = utcnow()
    value = "3600" if form == "seconds" else format_datetime(now + timedelta(hours=1), usegmt=True)
    receiver.answer("busy", Answer(503, {"Retry-After": value}))

    assert await deliver_due(runtime, now=now) == 1
    [row] = await deliveries(runtime)
    assert row.next_attempt_at >= now + timedelta(seconds=3599)  # not the schedule's 5 s
    assert await deliver_due(runtime, now=now + timedelta(minutes=30)) == 0
    assert await deliver_due(runtime, now=now + timedelta(minutes=61)) == 1
    [logged] = await delivery_log(api, tenant.headers, endpoint_id)
    assert logged["status"] == "delivered"
    assert [a["status_code"] for a in logged["attempt_log"]] == [503, 200]


async def test_dead_letter_after_the_last_attempt_then_redeliver_on_request(
    api: httpx.AsyncClient, runtime: Runtime, receiver: Receiver
) -> None:
    tenant = await admin_tenant(runtime)
    endpoint_id, secret = await create_endpoint(api, tenant, receiver.url("broken"))
    receiver.accept("broken", secret)
    receiver.answer("broken", default=Answer(500))
    await run_job(api, runtime, tenant)

    now = utcnow()
    for attempt in range(1, retry.MAX_ATTEMPTS + 1):
        assert await deliver_due(runtime, now=now) == 1
        now = after_retry_delay(now, min(attempt, len(retry.SCHEDULE)))
    [row] = await deliveries(runtime)
    assert row.status == "dead" and row.attempts == retry.MAX_ATTEMPTS
    assert await deliver_due(runtime, now=now + timedelta(days=2)) == 0
    [logged] = await delivery_log(api, tenant.headers, endpoint_id)
    assert logged["status"] == "dead" and logged["next_attempt_at"] is None
    assert [a["status_code"] for a in logged["attempt_log"]] == [500] * retry.MAX_ATTEMPTS

    receiver.answer("broken", default=Answer(200))
    redo = await api.post(f"/api/v2/webhooks/deliveries/{row.id}/redeliver", headers=tenant.headers)
    assert redo.status_code == 202, redo.text
    assert redo.json()["status"] == "pending"
    assert await deliver_due(runtime) == 1
    assert {d.webhook_id for d in receiver.at("broken")} == {row.id}  # same webhook-id throughout
    [logged] = await delivery_log(api, tenant.headers, endpoint_id)
    assert logged["status"] == "delivered" and len(logged["attempt_log"]) == retry.MAX_ATTEMPTS + 1


async def test_rotation_signs_with_both_secrets_during_the_overlap(
    api: httpx.AsyncClient, runtime: Runtime, receiver: Receiver
) -> None:
    tenant = await admin_tenant(runtime)
    endpoint_id, old = await create_endpoint(api, tenant, receiver.url("a"))
    rotated = await api.post(f"/api/v2/webhooks/{endpoint_id}/rotate-secret", headers=tenant.headers)
    assert rotated.status_code == 200, rotated.text
    new = rotated.json()["secret"]
    assert new != old and new.startswith("whsec_") and rotated.json()["previous_secret_expires_at"]
    assert "secret" not in (await api.get(f"/api/v2/webhooks/{endpoint_id}", headers=tenant.headers)).json()
    receiver.accept("a", new)

    await run_job(api, runtime, tenant)
    assert await deliver_due(runtime) == 1
    [during] = receiver.at("a")
    assert len(during.headers["webhook-signature"].split(" ")) == 2
    assert during.payload(old) == during.payload(new)  # each secret alone verifies

    await run_job(api, runtime, tenant)
    assert await deliver_due(runtime, now=utcnow() + timedelta(hours=25)) == 1
    after = receiver.at("a")[1]
    assert len(after.headers["webhook-signature"].split(" ")) == 1
    after.payload(new)
    with pytest.raises(WebhookVerificationError):
        after.payload(old)


async def test_the_outbox_survives_a_restart_between_the_state_change_and_the_delivery(
    settings: Settings, receiver: Receiver
) -> None:
    before = await Runtime.create(settings)
    try:
        async with webhook_api(before) as api:
            tenant = await admin_tenant(before)
            _, secret = await create_endpoint(api, tenant, receiver.url("a"))
            job_id = await run_job(api, before, tenant)
    finally:
        await before.close()  # the process is gone; only the database remains
    receiver.accept("a", secret)

    after = await Runtime.create(settings)
    try:
        assert await deliver_due(after) == 1
    finally:
        await after.close()
    [got] = receiver.at("a")
    assert got.payload(secret)["data"]["id"] == job_id


@pytest.mark.parametrize("settings_overrides", [{"webhook_timeout_s": 3.0}])
async def test_a_slow_endpoint_does_not_delay_another_tenants_delivery(
    api: httpx.AsyncClient, runtime: Runtime, receiver: Receiver
) -> None:
    slow, fast = await admin_tenant(runtime), await admin_tenant(runtime)
    slow_endpoint, slow_secret = await create_endpoint(api, slow, receiver.url("slow"))
    fast_endpoint, fast_secret = await create_endpoint(api, fast, receiver.url("fast"))
    receiver.accept("slow", slow_secret)
    receiver.accept("fast", fast_secret)
    release = receiver.hang("slow")  # answers only after the sender has given up on it
    await run_job(api, runtime, slow)  # the slow tenant's event is older: first in the batch
    await run_job(api, runtime, fast)

    sending = asyncio.create_task(deliver_due(runtime))
    await asyncio.wait_for(receiver.arrived["slow"].wait(), 30)
    await asyncio.wait_for(receiver.arrived["fast"].wait(), 30)
    # The fast delivery completes (answered and recorded) while the slow one is still hanging.
    while (await delivery_log(api, fast.headers, fast_endpoint))[0]["status"] != "delivered":
        assert not sending.done()
        await asyncio.sleep(0.01)
    assert not sending.done() and not release.is_set()

    assert await sending == 2
    [slow_logged] = await delivery_log(api, slow.headers, slow_endpoint)
    assert slow_logged["status"] == "pending"
    assert "no answer within" in slow_logged["attempt_log"][0]["error"]


async def test_concurrent_senders_never_send_the_same_delivery_twice(
    api: httpx.AsyncClient, runtime: Runtime, receiver: Receiver
) -> None:
    for path in ("p", "q", "r"):
        tenant = await admin_tenant(runtime)
        _, secret = await create_endpoint(api, tenant, receiver.url(path))
        receiver.accept(path, secret)
        for _ in range(3):
            await run_job(api, runtime, tenant)
    counts = await asyncio.gather(*(deliver_due(runtime) for _ in range(4)))
    assert sum(counts) == 9
    ids = [d.webhook_id for d in receiver.deliveries]
    assert len(ids) == len(set(ids)) == 9


async def test_started_is_opt_in_and_each_endpoint_gets_what_it_asked_for(
    api: httpx.AsyncClient, runtime: Runtime, receiver: Receiver
) -> None:
    tenant = await admin_tenant(runtime)
    _, every = await create_endpoint(
        api, tenant, receiver.url("every"), events=["job.started", "job.succeeded"]
    )
    _, default = await create_endpoint(api, tenant, receiver.url("default"))
    receiver.accept("every", every)
    receiver.accept("default", default)
    await run_job(api, runtime, tenant)
    canceled = await submit(api, tenant)
    assert (await api.post(f"/api/v2/jobs/{canceled}/cancel", headers=tenant.headers)).status_code == 200

    assert await deliver_due(runtime) == 4
    by_type = sorted(d.payload(every)["type"] for d in receiver.at("every"))
    assert by_type == ["job.started", "job.succeeded"]
    assert sorted(d.payload(default)["type"] for d in receiver.at("default")) == [
        "job.canceled",
        "job.succeeded",
    ]
    started = next(
        d.payload(every) for d in receiver.at("every") if d.payload(every)["type"] == "job.started"
    )
    assert started["data"]["status"] == "running"  # the event as of its transition


async def test_a_per_job_webhook_url_is_signed_with_the_tenants_job_url_secret(
    api: httpx.AsyncClient, runtime: Runtime, receiver: Receiver
) -> None:
    tenant = await admin_tenant(runtime)
    # Submit-time check: no job URL secret yet, so no webhook_url either.
    refused = await api.post(
        "/api/v2/jobs",
        json={"workflow": empty_image_save(), "webhook_url": receiver.url("job")},
        headers=tenant.headers,
    )
    assert refused.status_code == 422 and refused.json()["error"]["code"] == "webhook_secret_missing"

    created = await api.post("/api/v2/webhooks/job-url-secret", headers=tenant.headers)
    assert created.status_code == 201, created.text
    secret = created.json()["secret"]
    again = await api.post("/api/v2/webhooks/job-url-secret", headers=tenant.headers)
    assert again.status_code == 409 and again.json()["error"]["code"] == "already_exists"
    receiver.accept("job", secret)

    job_id = await run_job(api, runtime, tenant, webhook_url=receiver.url("job"))
    assert await deliver_due(runtime) == 1  # the outcome only: job.started is for endpoints that opt in
    [got] = receiver.at("job")
    event = got.payload(secret)
    assert event["type"] == "job.succeeded" and event["data"]["id"] == job_id
    [row] = await deliveries(runtime)
    assert row.endpoint_id is None and row.url == receiver.url("job")
    shown = await api.get(f"/api/v2/webhooks/deliveries/{row.id}", headers=tenant.headers)
    assert shown.status_code == 200 and shown.json()["status"] == "delivered"


async def test_a_loopback_webhook_url_is_refused_at_submit_when_the_switch_is_off(
    db_url: str, tmp_path: Path, receiver: Receiver
) -> None:
    settings = webhook_settings(db_url, tmp_path / "off", receiver, allow_loopback_urls=False)
    runtime = await Runtime.create(settings)
    try:
        async with webhook_api(runtime) as api:
            tenant = await admin_tenant(runtime)
            submitted = await api.post(
                "/api/v2/jobs",
                json={"workflow": empty_image_save(), "webhook_url": receiver.url("job")},
                headers=tenant.headers,
            )
            assert submitted.status_code == 422, submitted.text
            error = submitted.json()["error"]
            assert error["code"] == "url_not_allowed" and "loopback" in error["details"]["reason"]
            registered = await api.post(
                "/api/v2/webhooks", json={"url": receiver.url("a")}, headers=tenant.headers
            )
            assert registered.status_code == 422 and registered.json()["error"]["code"] == "url_not_allowed"
            assert (await api.get("/api/v2/jobs", headers=tenant.headers)).json()["jobs"] == []
    finally:
        await runtime.close()


@pytest.mark.parametrize("settings_overrides", [{"webhook_timeout_s": 3.0}])
async def test_the_running_sender_keeps_delivering_while_an_endpoint_hangs(
    api: httpx.AsyncClient, runtime: Runtime, receiver: Receiver
) -> None:
    slow, fast = await admin_tenant(runtime), await admin_tenant(runtime)
    _, slow_secret = await create_endpoint(api, slow, receiver.url("slow"))
    _, fast_secret = await create_endpoint(api, fast, receiver.url("fast"))
    receiver.accept("slow", slow_secret)
    receiver.accept("fast", fast_secret)
    release = receiver.hang("slow")
    stop = asyncio.Event()
    sender = asyncio.create_task(run_sender(runtime, stop))
    try:
        await run_job(api, runtime, slow)
        await asyncio.wait_for(receiver.arrived["slow"].wait(), 30)
        await run_job(api, runtime, fast)  # its event is written while the slow attempt hangs
        await asyncio.wait_for(receiver.arrived["fast"].wait(), 30)
        assert not release.is_set() and not sender.done()
    finally:
        stop.set()
        await asyncio.wait_for(sender, 30)
    assert [d.payload(fast_secret)["type"] for d in receiver.at("fast")] == ["job.succeeded"]
