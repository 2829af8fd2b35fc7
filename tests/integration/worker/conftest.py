"""Fixtures of the worker tests: a live comfyfleet (real uvicorn, background services, workers
attached to the ComfyUI stand-in or to ``COMFYFLEET_TEST_COMFYUI_URL``) and a tenant whose plan
never rate-limits, so tests can poll as fast as they like."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import socket
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest_asyncio

from comfyfleet.config import PlanLimits
from comfyfleet.db.engine import create_engine
from comfyfleet.runtime import Runtime
from tests.conftest import TEST_SECRETS, make_settings
from tests.fakes.fixtures import ComfyTarget
from tests.integration.worker.helpers import JobsClient
from tests.support.factories import TenantWithKey, make_tenant
from tests.support.live import LiveServer, live_server

UNLIMITED = PlanLimits(
    priority=0,
    max_running=10_000,
    max_queued=1_000_000,
    submit_rate="10000000/minute",
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

    async def runtime_job_status(self, job_id: str, timeout: float = 30.0) -> str:
        """The terminal status of any tenant's job, read from the database."""
        from comfyfleet.jobs import repository as job_repo
        from tests.integration.worker.helpers import TERMINAL

        deadline = asyncio.get_running_loop().time() + timeout
        while True:
            async with self.runtime.engine.connect() as conn:
                status = await job_repo.read_status(conn, job_id)
            if status in TERMINAL or asyncio.get_running_loop().time() > deadline:
                return str(status)
            await asyncio.sleep(0.02)

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
            return Service(
                server=server, target=comfyui_target, tenant=tenant, http=http, jobs=JobsClient(http)
            )

        yield start


@pytest_asyncio.fixture
async def service(start_service: StartService) -> Service:
    return await start_service()


@dataclass
class ServedService:
    """``comfyfleet serve`` in a process of its own, as deployed: its workers, API and the test's
    clients then use separate cores instead of sharing one event loop."""

    url: str
    tenant: TenantWithKey
    process: asyncio.subprocess.Process


StartServed = Callable[..., Awaitable[ServedService]]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest_asyncio.fixture
async def start_served(
    db_url: str, tmp_path: Path, comfyui_target: ComfyTarget
) -> AsyncIterator[StartServed]:
    """``await start_served(workers=4, **env_settings)``: the service as a child process."""
    processes: list[asyncio.subprocess.Process] = []

    async def start(*, workers: int = 1, **overrides: Any) -> ServedService:
        port = _free_port()
        values: dict[str, Any] = {
            "env": "test",
            "database_url": db_url,
            "data_dir": str(tmp_path / "served"),
            "plans": {"unlimited": UNLIMITED.model_dump()},
            "log_level": "WARNING",
            **TEST_SECRETS,
            **overrides,
        }
        env = {**os.environ}
        for name, value in values.items():
            env[f"COMFYFLEET_{name.upper()}"] = value if isinstance(value, str) else json.dumps(value)
        exe = Path(sys.executable).parent / "comfyfleet"
        process = await asyncio.create_subprocess_exec(
            str(exe),
            "serve",
            "--port",
            str(port),
            "--comfyui-url",
            comfyui_target.url,
            "--workers",
            str(workers),
            env=env,
            stdin=asyncio.subprocess.DEVNULL,
        )
        processes.append(process)
        url = f"http://127.0.0.1:{port}"
        async with httpx.AsyncClient(base_url=url) as probe, asyncio.timeout(60):
            while True:
                if process.returncode is not None:
                    raise RuntimeError(f"comfyfleet serve exited with {process.returncode}")
                with contextlib.suppress(httpx.TransportError):
                    if (await probe.get("/api/v2/health")).status_code == 200:
                        break
                await asyncio.sleep(0.05)
        engine = create_engine(db_url)
        try:
            settings = make_settings(db_url, tmp_path / "served")
            tenant = await make_tenant(engine, settings, plan="unlimited")
        finally:
            await engine.dispose()
        return ServedService(url=url, tenant=tenant, process=process)

    try:
        yield start
    finally:
        for process in processes:
            if process.returncode is None:
                process.terminate()
                try:
                    async with asyncio.timeout(15):
                        await process.wait()
                except TimeoutError:
                    process.kill()
                    await process.wait()
