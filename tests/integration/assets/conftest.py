"""Fixtures for the asset tests: a runtime and API client per storage backend (local directory, S3 on
SeaweedFS), two tenants, and helpers that look at the database and the store directly."""

from __future__ import annotations

import io
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AsyncExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import pytest_asyncio
from PIL import Image
from sqlalchemy import func, select
from tests.conftest import api_client
from tests.fixtures.seaweedfs import SeaweedFS
from tests.support.factories import TenantWithKey, make_tenant
from tests.support.storage_backends import backend_settings, stored_keys

from comfyfleet.config import PlanLimits, default_plans
from comfyfleet.db.tables import assets, blobs
from comfyfleet.runtime import Runtime
from comfyfleet.storage.base import Storage

# A plan whose upload cap is tiny, for the 413 test.
TINY_UPLOAD = 4096


def png_bytes(width: int = 8, height: int = 6, seed: int = 0) -> bytes:
    image = Image.new("RGB", (width, height))
    pixels = [
        ((x * 31 + seed) % 256, (y * 17) % 256, seed % 256) for y in range(height) for x in range(width)
    ]
    image.putdata(pixels)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


@dataclass
class AssetEnv:
    backend: str
    runtime: Runtime
    client: httpx.AsyncClient
    alice: TenantWithKey
    bob: TenantWithKey
    seaweedfs: SeaweedFS | None
    # The backend as built, kept for inspection even when a test wraps ``runtime.storage``.
    backend_storage: Storage

    async def upload(
        self,
        tenant: TenantWithKey,
        data: bytes,
        *,
        filename: str = "photo.png",
        part_type: str = "image/png",
        fields: dict[str, Any] | None = None,
        headers: dict[str, str] | None = None,
    ) -> httpx.Response:
        return await self.client.post(
            "/api/v2/assets",
            files={"file": (filename, data, part_type)},
            data=fields or {},
            headers={**tenant.headers, **(headers or {})},
        )

    def keys(self, tenant: TenantWithKey) -> list[str]:
        return stored_keys(self.backend_storage, self.seaweedfs, f"tenants/{tenant.id}/")

    async def blob_count(self, tenant: TenantWithKey) -> int:
        async with self.runtime.engine.connect() as conn:
            query = select(func.count()).select_from(blobs).where(blobs.c.tenant_id == tenant.id)
            return int((await conn.execute(query)).scalar_one())

    async def asset_count(self, tenant: TenantWithKey) -> int:
        async with self.runtime.engine.connect() as conn:
            query = select(func.count()).select_from(assets).where(assets.c.tenant_id == tenant.id)
            return int((await conn.execute(query)).scalar_one())

    def spool_files(self) -> list[Path]:
        spool = self.runtime.settings.data_dir / "spool"
        return sorted(spool.iterdir()) if spool.exists() else []


@pytest.fixture(params=["local", pytest.param("s3", marks=pytest.mark.s3)])
def backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def weed(backend: str, request: pytest.FixtureRequest) -> SeaweedFS | None:
    # Looked up lazily so that local-only runs never start SeaweedFS.
    return request.getfixturevalue("seaweedfs") if backend == "s3" else None


AssetEnvFactory = Callable[..., Awaitable[AssetEnv]]


@pytest_asyncio.fixture
async def make_env(
    backend: str, weed: SeaweedFS | None, db_url: str, tmp_path: Path
) -> AsyncIterator[AssetEnvFactory]:
    """``await make_env(storage=..., **settings)``: a runtime on this backend, its API, two tenants."""
    async with AsyncExitStack() as stack:

        async def make(*, storage: Storage | None = None, **overrides: Any) -> AssetEnv:
            plans = {**default_plans(), "tiny": PlanLimits(max_upload_bytes=TINY_UPLOAD)}
            settings = backend_settings(backend, db_url, tmp_path / "data", weed, plans=plans, **overrides)
            runtime = await Runtime.create(settings, storage=storage)
            stack.push_async_callback(runtime.close)
            close_storage = getattr(runtime.storage, "close", None)
            if close_storage is not None:
                stack.push_async_callback(close_storage)
            client = await stack.enter_async_context(api_client(runtime, background=False))
            alice = await make_tenant(runtime.engine, settings, "alice")
            bob = await make_tenant(runtime.engine, settings, "bob")
            return AssetEnv(backend, runtime, client, alice, bob, weed, runtime.storage)

        yield make


@pytest_asyncio.fixture
async def env(make_env: AssetEnvFactory) -> AssetEnv:
    return await make_env()
