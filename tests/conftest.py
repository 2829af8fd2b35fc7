"""Shared fixtures. Database tests run on SQLite and on PostgreSQL (``db_url`` is parametrized);
services that are missing skip with a reason, or fail under CI=true."""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import pytest_asyncio

from comfyfleet.api.app import create_app
from comfyfleet.config import Settings
from comfyfleet.runtime import Runtime
from tests.support import db as test_db
from tests.support.services import PG_HOST, PG_PORT, reachable, require

_HERE = Path(__file__).parent
pytest_plugins = [
    plugin
    for plugin, path in (
        ("tests.fakes.fixtures", "fakes/fixtures.py"),
        ("tests.fixtures.seaweedfs", "fixtures/seaweedfs.py"),
    )
    if (_HERE / path).exists()
]

TEST_SECRETS = {
    "key_pepper": "test-pepper-0123456789abcdef0123456789",
    "url_signing_key": "test-signing-0123456789abcdef012345678",
    "webhook_encryption_key": "test-webhook-0123456789abcdef01234567",
}


@pytest.fixture(scope="session")
def postgres_available() -> bool:
    return reachable(PG_HOST, PG_PORT)


@pytest.fixture(scope="session")
def pg_session_db(postgres_available: bool) -> Iterator[str | None]:
    """One PostgreSQL database for the session, migrated once; dropped at the end."""
    if not postgres_available:
        yield None
        return
    name, url = asyncio.run(test_db.create_pg_database())
    try:
        yield url
    finally:
        asyncio.run(test_db.drop_pg_database(name))


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def db_backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest_asyncio.fixture
async def db_url(db_backend: str, tmp_path: Path, pg_session_db: str | None) -> str:
    if db_backend == "sqlite":
        return await test_db.sqlite_database(tmp_path)
    require("PostgreSQL at 127.0.0.1:5432", pg_session_db is not None)
    url = pg_session_db
    assert url is not None
    await test_db.truncate_all(url)
    return url


@pytest_asyncio.fixture
async def sqlite_url(tmp_path: Path) -> str:
    return await test_db.sqlite_database(tmp_path)


def make_settings(db_url: str, data_dir: Path, **overrides: Any) -> Settings:
    values: dict[str, Any] = {
        "env": "test",
        "database_url": db_url,
        "data_dir": data_dir,
        "auth_cache_ttl_s": 0,
        "public_base_url": "http://testserver",
        "reaper_interval_s": 0.2,
        "heartbeat_s": 0.5,
        "cancel_poll_s": 0.2,
        "progress_interval_s": 0.0,
        **TEST_SECRETS,
    }
    values.update(overrides)
    return Settings(**values)


@pytest.fixture
def settings(db_url: str, tmp_path: Path) -> Settings:
    return make_settings(db_url, tmp_path / "data")


@pytest_asyncio.fixture
async def runtime(settings: Settings) -> AsyncIterator[Runtime]:
    rt = await Runtime.create(settings)
    try:
        yield rt
    finally:
        await rt.close()


AppClientFactory = Callable[..., Any]


@pytest_asyncio.fixture
async def api(runtime: Runtime) -> AsyncIterator[httpx.AsyncClient]:
    """The API in this event loop, without background services (tests drive workers and the reaper)."""
    async with api_client(runtime, background=False) as client:
        yield client


class api_client:
    """``async with api_client(runtime, background=...) as client``: app lifespan + httpx client."""

    def __init__(self, runtime: Runtime, *, background: bool = False) -> None:
        self.app = create_app(runtime.settings, runtime=runtime, background=background)
        self._lifespan: Any = None
        self._client: httpx.AsyncClient | None = None

    async def __aenter__(self) -> httpx.AsyncClient:
        self._lifespan = self.app.router.lifespan_context(self.app)
        await self._lifespan.__aenter__()
        self._client = httpx.AsyncClient(
            transport=httpx.ASGITransport(app=self.app), base_url="http://testserver", timeout=30
        )
        return self._client

    async def __aexit__(self, *exc: object) -> None:
        assert self._client is not None
        await self._client.aclose()
        await self._lifespan.__aexit__(None, None, None)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    # A run that collects nothing must not pass silently (pytest exits 5 then; .ci/run also checks).
    if not items and os.environ.get("CI", "").lower() == "true":
        raise pytest.UsageError("no tests collected")
