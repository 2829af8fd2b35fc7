"""POST /api/v2/assets/from-url: media fetched through the SSRF guard in the API tier."""

from __future__ import annotations

import io
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import pytest_asyncio
from aiohttp import web
from PIL import Image

from comfyfleet.runtime import Runtime
from tests.conftest import api_client, make_settings
from tests.support.factories import make_tenant


def png_bytes() -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (4, 4), (10, 20, 30)).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest_asyncio.fixture
async def media_server() -> AsyncIterator[str]:
    async def image(_request: web.Request) -> web.Response:
        return web.Response(body=png_bytes(), content_type="image/png")

    async def html(_request: web.Request) -> web.Response:
        return web.Response(text="<html></html>", content_type="text/html")

    async def redirect(_request: web.Request) -> web.Response:
        raise web.HTTPFound("http://169.254.169.254/latest/meta-data/")

    app = web.Application()
    app.router.add_get("/cat.png", image)
    app.router.add_get("/page", html)
    app.router.add_get("/redirect", redirect)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        await runner.cleanup()


@pytest.mark.parametrize("loopback_allowed", [True, False])
async def test_from_url(media_server: str, sqlite_url: str, tmp_path: Path, loopback_allowed: bool) -> None:
    port = int(media_server.rsplit(":", 1)[1])
    settings = make_settings(
        sqlite_url, tmp_path, allow_loopback_urls=loopback_allowed, url_allowed_ports=[80, 443, port]
    )
    runtime = await Runtime.create(settings)
    try:
        async with api_client(runtime) as api:
            tenant = await make_tenant(runtime.engine, settings)
            created = await api.post(
                "/api/v2/assets/from-url", json={"url": f"{media_server}/cat.png"}, headers=tenant.headers
            )
            if not loopback_allowed:
                assert created.status_code == 422
                assert created.json()["error"]["code"] == "url_not_allowed"
                return
            assert created.status_code == 201, created.text
            body = created.json()
            assert body["content_type"] == "image/png" and body["file_path"] == "cat.png"
            assert body["size_bytes"] == len(png_bytes())
            again = await api.post(
                "/api/v2/assets/from-url", json={"url": f"{media_server}/cat.png"}, headers=tenant.headers
            )
            assert again.status_code == 200 and again.json()["id"] == body["id"]
            content = await api.get(f"/api/v2/assets/{body['id']}/content", headers=tenant.headers)
            assert content.content == png_bytes()
            for path, code in (
                ("/page", "url_fetch_failed"),
                ("/missing", "url_fetch_failed"),
                ("/redirect", "url_not_allowed"),
            ):
                refused = await api.post(
                    "/api/v2/assets/from-url", json={"url": media_server + path}, headers=tenant.headers
                )
                assert refused.status_code == 422, refused.text
                assert refused.json()["error"]["code"] == code
            metadata = await api.post(
                "/api/v2/assets/from-url",
                json={"url": "http://metadata.google.internal/computeMetadata/v1/"},
                headers=tenant.headers,
            )
            assert metadata.json()["error"]["code"] == "url_not_allowed"
    finally:
        await runtime.close()
