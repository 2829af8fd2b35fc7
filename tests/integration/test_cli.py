"""The admin CLI end to end on an embedded database: tenant, key shown once in the documented form,
listing without the secret, revocation that the API honours."""

from __future__ import annotations

import re
from pathlib import Path

import httpx
import pytest
from typer.testing import CliRunner

from comfyfleet.cli.main import app
from comfyfleet.runtime import Runtime
from tests.conftest import TEST_SECRETS, api_client, make_settings

KEY_FORMAT = re.compile(r"^cf_test_[0-9A-Za-z]{44}$")


@pytest.fixture
def cli_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    url = f"sqlite+aiosqlite:///{tmp_path / 'cli.db'}"
    monkeypatch.setenv("COMFYFLEET_ENV", "test")
    monkeypatch.setenv("COMFYFLEET_DATABASE_URL", url)
    for name, value in TEST_SECRETS.items():
        monkeypatch.setenv(f"COMFYFLEET_{name.upper()}", value)
    monkeypatch.setenv("COMFYFLEET_WEBHOOK_ENCRYPTION_KEY", "test-webhook-key-0123456789abcdef")
    return url


def invoke(*args: str) -> str:
    result = CliRunner().invoke(app, list(args))
    assert result.exit_code == 0, result.output
    return result.output.strip()


def test_tenants_and_keys_lifecycle(cli_env: str, tmp_path: Path) -> None:
    invoke("db", "upgrade")
    tenant_line = invoke("tenants", "create", "acme", "--plan", "pro")
    tenant_id = tenant_line.split("\t")[0]
    key = invoke("keys", "create", "acme", "--scope", "jobs:read", "--scope", "jobs:write")
    assert KEY_FORMAT.match(key), key
    listing = invoke("keys", "list", "acme")
    assert key not in listing and key[8:] not in listing  # the secret is never shown again
    assert "jobs:read,jobs:write" in listing and "active" in listing
    assert tenant_id in invoke("tenants", "list")

    refused = CliRunner().invoke(app, ["keys", "create", "acme", "--scope", "root"])
    assert refused.exit_code != 0 and "unknown scope" in refused.output
    duplicate = CliRunner().invoke(app, ["tenants", "create", "acme"])
    assert duplicate.exit_code != 0
    key_id = listing.split("\t")[0]
    assert invoke("keys", "revoke", key_id) == "revoked"
    assert "revoked" in invoke("keys", "list")


async def test_a_cli_key_authenticates_until_revoked(cli_env: str, tmp_path: Path) -> None:
    import asyncio

    await asyncio.to_thread(invoke, "db", "upgrade")
    await asyncio.to_thread(invoke, "tenants", "create", "beta")
    key = await asyncio.to_thread(invoke, "keys", "create", "beta")
    settings = make_settings(cli_env, tmp_path / "data")
    runtime = await Runtime.create(settings)
    try:
        async with api_client(runtime) as api:
            headers = {"Authorization": f"Bearer {key}"}
            assert (await api.get("/api/v2/jobs", headers=headers)).status_code == 200
            listing = await asyncio.to_thread(invoke, "keys", "list", "beta")
            await asyncio.to_thread(invoke, "keys", "revoke", listing.split("\t")[0])
            response: httpx.Response = await api.get("/api/v2/jobs", headers=headers)
            assert response.status_code == 401
    finally:
        await runtime.close()
