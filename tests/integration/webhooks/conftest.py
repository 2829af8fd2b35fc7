"""Webhook test fixtures: a receiver on loopback, settings that let the SSRF guard reach it (loopback
switch on, its port allowed), and the API with the webhook routes."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import pytest_asyncio

from comfyfleet.config import Settings
from comfyfleet.runtime import Runtime
from tests.conftest import api_client, make_settings
from tests.integration.webhooks.receiver import Receiver

webhook_api = api_client  # create_app registers the webhook routes


@pytest_asyncio.fixture
async def receiver() -> AsyncIterator[Receiver]:
    server = Receiver()
    await server.start()
    try:
        yield server
    finally:
        await server.close()
    # The acceptance criterion: every delivery verifies with the standardwebhooks package.
    unverified = [d.webhook_id for d in server.deliveries if not d.verified]
    assert not unverified, f"deliveries that did not verify: {unverified}"


def webhook_settings(db_url: str, data_dir: Path, receiver: Receiver, **overrides: Any) -> Settings:
    values: dict[str, Any] = {"allow_loopback_urls": True, "url_allowed_ports": [receiver.port]}
    values.update(overrides)
    return make_settings(db_url, data_dir, **values)


@pytest.fixture
def settings_overrides() -> dict[str, Any]:
    return {}


@pytest.fixture
def settings(db_url: str, tmp_path: Path, receiver: Receiver, settings_overrides: dict[str, Any]) -> Settings:
    return webhook_settings(db_url, tmp_path / "data", receiver, **settings_overrides)


@pytest_asyncio.fixture
async def api(runtime: Runtime) -> AsyncIterator[httpx.AsyncClient]:
    async with webhook_api(runtime) as client:
        yield client
