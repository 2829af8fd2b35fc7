"""Fixtures of the worker tests: a live comfyfleet (real uvicorn, background services, workers
attached to the ComfyUI stand-in or to ``COMFYFLEET_TEST_COMFYUI_URL``) and a tenant whose plan
never rate-limits, so tests can poll as fast as they like."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest_asyncio

from comfyfleet.config import PlanLimits
from comfyfleet.runtime import Runtime
from tests.conftest import make_settings
from tests.fakes.fixtures import ComfyTarget
from tests.integration.worker.helpers import JobsClient
from tests.support.factories import TenantWithKey, make_tenant
from tests.support.live import LiveServer, live_server

UNLIMITED = PlanLimits(
    priority=0, max_running=10_000, max_queued=1_000_000, submit_rate="10000000/minute",
    read_rate="1000000000/minute",
)


@dataclass
class Service:
    server: LiveServer
    target: ComfyTarget
    tenant: TenantWithKey
    http: httpx.AsyncClient
    jobs: JobsClient

    @property
    def runtime(self) -> Runtime:
        return self.server.runtime

    async def other_tenant_client(self) -> httpx.AsyncClient:
        other = await make_tenant(self.runtime.engine, self.runtime.settings, plan="unlimited")
        return httpx.AsyncClient(base_url=self.server.url, headers=other.headers, timeout=30)


StartService = Callable[..., Awaitable[Service]]


@pytest_asyncio.fixture
async def start_service(
    db_url: str, tmp_path: Path, comfyui_target: ComfyTarget
) -> AsyncIterator[StartService]:
    """``await start_service(**settings_overrides)``: one live service per call, stopped at teardown."""
    async with contextlib.AsyncExitStack() as stack:

        async def start(**overrides: Any) -> Service:
            values: dict[str, Any] = {"comfyui_url": comfyui_target.url, "plans": {"unlimited": UNLIMITED}}
            values.update(overrides)
            settings = make_settings(db_url, tmp_path / "data", **values)
            runtime = await Runtime.create(settings)
            stack.push_async_callback(runtime.close)
            server = await stack.enter_async_context(live_server(runtime))
            tenant = await make_tenant(runtime.engine, settings, plan="unlimited")
            http = await stack.enter_async_context(
                httpx.AsyncClient(base_url=server.url, headers=tenant.headers, timeout=30)
            )
            return Service(server=server, target=comfyui_target, tenant=tenant, http=http, jobs=JobsClient(http))

        yield start


@pytest_asyncio.fixture
async def service(start_service: StartService) -> Service:
    return await start_service()
