"""Rate limits per API key (plan settings) and on failed authentications per address; the Redis
storage against the real Redis."""

from __future__ import annotations

import uuid
from pathlib import Path

import httpx
import pytest

from comfyfleet.config import PlanLimits
from comfyfleet.runtime import Runtime
from tests.conftest import api_client, make_settings
from tests.support.factories import make_tenant
from tests.support.services import REDIS_URL, reachable, require
from tests.support.workflows import empty_image_save

# Hour windows: a sliding-window counter weighs in the previous window, so a test that crossed a
# minute boundary could see its budget shrink; an hour boundary falls in a test run too rarely to matter.
TIGHT = {"tight": PlanLimits(submit_rate="3/hour", read_rate="5/hour", max_queued=100)}


def assert_limited(response: httpx.Response, kind: str) -> None:
    assert response.status_code == 429, response.text
    assert response.json()["error"]["code"] == "rate_limited"
    assert int(response.headers["Retry-After"]) >= 1
    assert response.headers["RateLimit-Policy"].startswith(f'"{kind}";q=')
    assert f'"{kind}";r=0;t=' in response.headers["RateLimit"]


async def exercise(runtime: Runtime) -> None:
    async with api_client(runtime) as api:
        first = await make_tenant(runtime.engine, runtime.settings, plan="tight")
        second = await make_tenant(runtime.engine, runtime.settings, plan="tight")
        body = {"workflow": empty_image_save()}
        for i in range(3):
            ok = await api.post("/api/v2/jobs", json=body, headers=first.headers)
            assert ok.status_code == 201
            assert ok.headers["RateLimit-Policy"] == '"submit";q=3;w=3600'
            assert ok.headers["RateLimit"].startswith(f'"submit";r={2 - i};t=')
        assert_limited(await api.post("/api/v2/jobs", json=body, headers=first.headers), "submit")
        # Another tenant's key has its own budget.
        assert (await api.post("/api/v2/jobs", json=body, headers=second.headers)).status_code == 201
        for _ in range(5):
            assert (await api.get("/api/v2/jobs", headers=first.headers)).status_code == 200
        assert_limited(await api.get("/api/v2/jobs", headers=first.headers), "read")
        assert (await api.get("/api/v2/jobs", headers=second.headers)).status_code == 200


async def test_per_key_limits_in_memory(sqlite_url: str, tmp_path: Path) -> None:
    runtime = await Runtime.create(make_settings(sqlite_url, tmp_path, plans=TIGHT))
    try:
        await exercise(runtime)
    finally:
        await runtime.close()


@pytest.mark.redis
async def test_per_key_limits_on_redis(sqlite_url: str, tmp_path: Path) -> None:
    require("Redis at 127.0.0.1:6379", reachable("127.0.0.1", 6379))
    # A fresh key space per run: limits' Redis keys are namespaced by the key ids, which are random.
    runtime = await Runtime.create(
        make_settings(sqlite_url, tmp_path, plans=TIGHT, rate_limit_storage=REDIS_URL)
    )
    try:
        await exercise(runtime)
    finally:
        await runtime.close()


async def test_failed_authentications_are_limited_per_address(sqlite_url: str, tmp_path: Path) -> None:
    runtime = await Runtime.create(make_settings(sqlite_url, tmp_path, auth_failure_rate="4/hour"))
    try:
        async with api_client(runtime) as api:
            tenant = await make_tenant(runtime.engine, runtime.settings)
            for _ in range(4):
                bad = await api.get(
                    "/api/v2/jobs", headers={"Authorization": f"Bearer cf_test_{uuid.uuid4().hex}x"}
                )
                assert bad.status_code == 401
            refused = await api.get("/api/v2/jobs", headers={"Authorization": "Bearer nope"})
            assert refused.status_code == 429 and "Retry-After" in refused.headers
            # A valid key still works: only failures are counted.
            assert (await api.get("/api/v2/jobs", headers=tenant.headers)).status_code == 200
    finally:
        await runtime.close()
